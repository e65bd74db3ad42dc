"""``ImageClassifier``: cross-entropy training with top-1/top-5 accuracy (torchmetrics).

It defines no ``configure_optimizers``: recipes choose the optimizer and schedule in YAML
(``optimizer:`` / ``lr_scheduler:``), so the same task runs AdaFisher and its baselines.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_adafisher.tasks.models import build_image_model

__all__ = ["ImageClassifier"]


class ImageClassifier(pl.LightningModule):
    """Image classification over a named network (see ``models.build_image_model``).

    Args:
        model: ``cifar_resnet18|50|101``, ``cifar_densenet121``, ``cifar_mobilenet_v3``,
            ``digits_cnn`` or any torchvision classification model name (e.g. ``resnet50``).
        num_classes: number of classes (10 for CIFAR-10/digits, 100, 1000 for ImageNet).
        label_smoothing: passed to the cross-entropy.
    """

    def __init__(self, model: str = "cifar_resnet18", num_classes: int = 10, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_image_model(model, num_classes)
        self.label_smoothing = label_smoothing
        top5 = min(5, num_classes)
        for stage in ("val", "test"):
            setattr(self, f"{stage}_top1", MulticlassAccuracy(num_classes, top_k=1, average="micro"))
            setattr(self, f"{stage}_top5", MulticlassAccuracy(num_classes, top_k=top5, average="micro"))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.label_smoothing)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        top1, top5 = getattr(self, f"{stage}_top1"), getattr(self, f"{stage}_top5")
        top1(logits, y)
        top5(logits, y)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}_acc", top1, prog_bar=True)
        self.log(f"{stage}_acc_top5", top5)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")
