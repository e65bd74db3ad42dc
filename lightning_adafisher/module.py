"""``AdaFisherMixin``: a LightningModule that trains with AdaFisherW without boilerplate.

Put the mixin first in the bases and forward keyword arguments to it::

    class Net(AdaFisherMixin, L.LightningModule):
        def __init__(self, hidden: int = 64, **kwargs):
            super().__init__(**kwargs)           # lr, weight_decay, gamma, ... go to the mixin
            self.save_hyperparameters()
            ...

The mixin's arguments are plain ``str``/``float``/``int``/``bool``, so LightningCLI lists them
(``--model.lr 3e-3``) and writes them to YAML. ``configure_optimizers`` returns AdaFisherW with
a per-step cosine schedule (or none) and ``configure_callbacks`` adds ``AdaFisherCallback``.
A run without a finite length (``max_time`` alone, or ``max_epochs=-1`` without ``max_steps``)
gives the cosine schedule nothing to decay over: it then trains at constant ``lr`` and warns.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_adafisher.callbacks import AdaFisherCallback
from lightning_adafisher.compat import batchnorm_types, instancenorm_types
from lightning_adafisher.optim import AdaFisherW

__all__ = ["AdaFisherMixin"]

_NORMS = (*batchnorm_types(), nn.LayerNorm, nn.GroupNorm, *instancenorm_types())


class AdaFisherMixin:
    """Mixin for ``LightningModule``: AdaFisherW + cosine schedule + the callback.

    Args:
        lr, beta, gamma, damping, weight_decay, update_interval, variant, beta2, eps,
            eigen_interval, max_factor_size, gradient_factors: AdaFisherW's hyperparameters
            (see :class:`~lightning_adafisher.AdaFisherW`; the last five are
            ``variant="eigen"``'s).
        no_decay_bias_and_norm: put biases and normalisation-layer parameters in a second
            param group with ``weight_decay=0``.
        scheduler: ``"cosine"`` (per optimizer step, down to 0 over
            ``trainer.estimated_stepping_batches``) or ``"none"``. When the run has no finite
            length (``Trainer(max_time=...)`` alone or ``max_epochs=-1``, without ``max_steps``),
            ``"cosine"`` keeps ``lr`` constant and warns: set ``max_steps`` or ``max_epochs``
            for the cosine decay.
    """

    def __init__(
        self,
        *args: Any,
        lr: float | None = None,
        beta: float = 0.9,
        gamma: float = 0.92,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        update_interval: int = 1,
        variant: str = "eigen",
        beta2: float = 0.95,
        eps: float = 1e-8,
        eigen_interval: int = 10,
        max_factor_size: int = 2048,
        gradient_factors: bool = True,
        no_decay_bias_and_norm: bool = False,
        scheduler: str = "cosine",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if scheduler not in ("cosine", "none"):
            raise ValueError(f"Invalid scheduler: {scheduler!r} (expected 'cosine' or 'none')")
        self.adafisher_config = dict(
            lr=lr, beta=beta, gamma=gamma, damping=damping, weight_decay=weight_decay,
            update_interval=update_interval, variant=variant, beta2=beta2, eps=eps,
            eigen_interval=eigen_interval, max_factor_size=max_factor_size,
            gradient_factors=gradient_factors,
        )
        self.no_decay_bias_and_norm = no_decay_bias_and_norm
        self.scheduler_name = scheduler

    def adafisher_param_groups(self) -> list[dict[str, Any]]:
        """All trainable parameters; with ``no_decay_bias_and_norm`` split into two groups."""
        module: nn.Module = self  # type: ignore[assignment]
        if not self.no_decay_bias_and_norm:
            return [{"params": [p for p in module.parameters() if p.requires_grad]}]
        no_decay: set[int] = set()
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, _NORMS) or name == "bias":
                    no_decay.add(id(p))
        params = [p for p in module.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if id(p) not in no_decay]},
            {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        optimizer = AdaFisherW(self.adafisher_param_groups(), **self.adafisher_config)
        if self.scheduler_name == "none":
            return optimizer
        estimated = self.trainer.estimated_stepping_batches  # type: ignore[attr-defined]
        if not math.isfinite(estimated):
            rank_zero_warn(
                "AdaFisherMixin: the run has no finite length (max_time only, or max_epochs=-1, "
                "and no max_steps), so the cosine schedule cannot be sized; training at constant "
                "lr. Set Trainer(max_steps=...) or max_epochs for the cosine decay, or "
                "scheduler='none' to silence this."
            )
            return optimizer
        total = max(int(estimated), 1)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_callbacks(self) -> list[Any]:
        return [AdaFisherCallback()]
