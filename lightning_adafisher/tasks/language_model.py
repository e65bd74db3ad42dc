"""``CausalLM``: next-token language modelling with loss and perplexity (val and test).

The network is the paper's 4-layer GPT-1 by default (``models.GPT``); its vocabulary size is
taken from the data module (``datamodule.vocab_size``) when not given, so it is built in
``configure_model`` once the tokenizer exists. Perplexity is ``exp`` of the token-averaged
cross-entropy over the whole split. The CLI tests at the best validation checkpoint after
``fit`` (see ``lightning_adafisher.cli``).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_adafisher.tasks.models import GPT

__all__ = ["CausalLM"]


class CausalLM(pl.LightningModule):
    """Causal LM over ``(input_ids[B, T], targets[B, T])`` batches.

    Args:
        vocab_size: tokenizer vocabulary; ``None`` reads ``trainer.datamodule.vocab_size``.
        context_length, n_layer, n_embd, n_head, d_ff, dropout: the GPT (defaults: the paper's
            4-layer GPT-1, context 256).
        pretrained_embeddings: local path of an ``openai-gpt`` checkpoint whose token/position
            embeddings are loaded (needs the GPT-1 BPE tokenizer).
        freeze_pretrained: freeze loaded embeddings (the paper's setting). Without pretrained
            embeddings they are trained (and AdaFisher gives them factors).
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        context_length: int = 256,
        n_layer: int = 4,
        n_embd: int = 768,
        n_head: int = 12,
        d_ff: int = 3072,
        dropout: float = 0.1,
        pretrained_embeddings: str | None = None,
        freeze_pretrained: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: GPT | None = None
        self._sums: dict[str, list[float]] = {}
        if vocab_size is not None:
            self._build(vocab_size)

    def _build(self, vocab_size: int) -> None:
        hp = self.hparams
        self.net = GPT(vocab_size, hp.context_length, hp.n_layer, hp.n_embd, hp.n_head, hp.d_ff, hp.dropout)
        if hp.pretrained_embeddings:
            self.net.load_pretrained_embeddings(hp.pretrained_embeddings, freeze=hp.freeze_pretrained)

    def build_from_datamodule(self, datamodule: object) -> None:
        """Build the network with ``datamodule.vocab_size`` if it was not built yet (called by
        the CLI before it creates the optimizer from ``model.parameters()``)."""
        if self.net is None:
            self._build_from(datamodule)

    def configure_model(self) -> None:
        if self.net is None:
            self._build_from(getattr(self.trainer, "datamodule", None))

    def _build_from(self, datamodule: object) -> None:
        vocab = getattr(datamodule, "vocab_size", None)
        if not isinstance(vocab, int):
            raise ValueError(
                "CausalLM needs vocab_size: pass model.vocab_size or use a data module with a "
                "vocab_size attribute (lightning_adafisher.tasks.TextDataModule)"
            )
        self._build(vocab)

    def forward(self, ids: Tensor) -> Tensor:
        assert self.net is not None, "call configure_model() first"
        return self.net(ids)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        ids, targets = batch
        logits = self(ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _accumulate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        loss = self._loss(batch)
        tokens = batch[1].numel()
        sums = self._sums.setdefault(stage, [0.0, 0.0])
        sums[0] += loss.item() * tokens
        sums[1] += tokens

    def _report(self, stage: str) -> None:
        total, tokens = self._sums.pop(stage, [0.0, 0.0])
        stats = torch.tensor([total, tokens], dtype=torch.float64, device=self.device)
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum") if self.trainer.world_size > 1 else stats
        mean = (stats[0] / stats[1].clamp_min(1)).item()
        self.log(f"{stage}_loss", mean, sync_dist=False)
        self.log(f"{stage}_ppl", math.exp(min(mean, 50.0)), prog_bar=True, sync_dist=False)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._accumulate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._accumulate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._report("test")
