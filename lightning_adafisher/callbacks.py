"""``AdaFisherCallback``: AdaFisher inside a Lightning ``Trainer``.

What it does, in Lightning's own order (see ``docs/lightning.md`` for the why):

* ``setup``: refuses FSDP1 (``FSDPStrategy``) and DeepSpeed for ``fit`` (evaluation runs no
  optimizer step, so ``validate``/``test``/``predict`` are fine); FSDP2 runs through
  ``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model`` (:mod:`.fsdp`).
* ``on_fit_start`` (after the strategy created and wrapped everything, before optimizer state is
  restored from a checkpoint): finds every AdaFisher/AdaFisherW in ``trainer.optimizers``,
  attaches the statistics hooks to the unwrapped LightningModule and, when there is more than
  one process, gives the optimizer a reducer that sums the step's statistics over ranks through
  ``trainer.strategy.reduce`` in one flat buffer.
* ``on_before_optimizer_step`` (gradients unscaled and clipped, step not yet taken): tells the
  optimizer the loss scale the hooks' ``G`` carried under ``16-mixed``.
* ``on_train_batch_end``: if a step was due but did not happen (``GradScaler`` skipped it on
  inf/NaN), the statistics of that step are discarded.
* ``teardown``: removes the hooks it installed.

Its diagnostic counters (discarded statistics steps, statistics steps, communication seconds) are
its ``state_dict``: Lightning saves them in checkpoints and restores them on resume.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_adafisher import fsdp
from lightning_adafisher.compat import grad_scaler_scale
from lightning_adafisher.distributed import make_reducer
from lightning_adafisher.optim import GLOBAL, GLOBAL_SKIPPED, GLOBAL_STEPS, AdaFisher
from lightning_adafisher.statistics import BoundLayer, LayerStats

__all__ = ["AdaFisherCallback"]

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy")


def _unwrap(optimizer: Any) -> Any:
    return getattr(optimizer, "_optimizer", optimizer)


class AdaFisherCallback(Callback):
    """Binds AdaFisher's statistics hooks to the model a ``Trainer`` fits.

    Args:
        log_diagnostics: on every statistics step, log per layer type the min/max/mean of the
            normalised factors, the fraction of statistics steps discarded (steps GradScaler
            skipped), how many layer statistics were dropped as non-finite, and the seconds spent
            gathering and all-reducing statistics since the last log.
    """

    def __init__(self, log_diagnostics: bool = False) -> None:
        self.log_diagnostics = log_diagnostics
        self._attached: list[AdaFisher] = []
        self._steps_before: dict[int, int] = {}
        self._discarded = 0
        self._statistics_steps = 0
        self._comm_seconds = 0.0
        self._sharded: list[tuple[int, AdaFisher, Any]] = []
        """FSDP2: (index in trainer.optimizers, optimizer, state-dict hook handle)."""
        self._module: pl.LightningModule | None = None

    # --- set-up and teardown ------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if stage == "fit" and any(s in name for s in _SHARDED):
            raise MisconfigurationException(
                f"AdaFisherCallback does not support the sharded strategy {name}: its "
                "statistics hooks need whole parameters. Use strategy='ddp', or shard with FSDP2: "
                "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) and "
                "torch.distributed.fsdp.fully_shard in configure_model."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = [_unwrap(o) for o in trainer.optimizers]
        found = [o for o in optimizers if isinstance(o, AdaFisher)]
        if not found:
            names = ", ".join(type(o).__name__ for o in optimizers) or "no optimizer"
            raise MisconfigurationException(
                "AdaFisherCallback found no AdaFisher/AdaFisherW among the trainer's optimizers "
                f"(found: {names}). Return lightning_adafisher.AdaFisherW from "
                "configure_optimizers, or remove the callback."
            )
        self._module = pl_module
        for _, _, handle in self._sharded:
            handle.remove()
        self._sharded.clear()
        for i, opt in enumerate(optimizers):
            if isinstance(opt, AdaFisher) and fsdp.prepare_sharded(opt):
                self._sharded.append((i, opt, fsdp.exclude_replicated_state(opt)))
        if "ModelParallelStrategy" in type(trainer.strategy).__name__ and trainer.world_size > 1 and not self._sharded:
            raise MisconfigurationException(
                "AdaFisherCallback with ModelParallelStrategy needs the model sharded by FSDP2: "
                "apply torch.distributed.fsdp.fully_shard in configure_model (without it no rank "
                "averages gradients, and AdaFisher's parameters are not DTensors)."
            )
        for opt in found:
            if opt.collector is None:
                opt.attach(pl_module)  # its warnings print on rank zero only
                self._attached.append(opt)
            if trainer.world_size > 1:
                opt.statistics_reducer = self._make_reducer(trainer)
            if self.log_diagnostics and opt.collector is not None:
                opt.collector.timed = True

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for opt in self._attached:
            opt.detach()
            opt.statistics_reducer = None
        self._attached.clear()
        # self._sharded stays until the next fit: trainer.save_checkpoint() after fit needs it.

    # --- checkpointed state -------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "discarded": self._discarded,
            "statistics_steps": self._statistics_steps,
            "comm_seconds": self._comm_seconds,
        }
        if self._sharded and self._module is not None:
            # FSDP2: the factors and counters every rank holds whole (the distributed checkpoint
            # saves the sharded moments with the optimizer).
            state["fsdp"] = {i: fsdp.replicated_state(opt, self._module) for i, opt, _ in self._sharded}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._discarded = int(state_dict.get("discarded", 0))
        self._statistics_steps = int(state_dict.get("statistics_steps", 0))
        self._comm_seconds = float(state_dict.get("comm_seconds", 0.0))
        # Called after the strategy loaded the optimizer state (ModelParallelStrategy restores
        # after on_fit_start, so the optimizers are known by now).
        saved = state_dict.get("fsdp", {})
        for i, opt, _ in self._sharded:
            if i in saved and self._module is not None:
                fsdp.load_replicated_state(opt, self._module, saved[i])

    def _make_reducer(self, trainer: pl.Trainer):
        strategy = trainer.strategy
        inner = make_reducer(
            lambda t: strategy.reduce(t, reduce_op="sum"),
            lambda: strategy.root_device,
            trainer.world_size,
        )

        def timed(layers: list[BoundLayer], pending: dict[str, LayerStats]):
            start = time.perf_counter()
            out = inner(layers, pending)
            self._comm_seconds += time.perf_counter() - start
            return out

        return timed

    # --- every optimizer step -----------------------------------------------------------------

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        opt = _unwrap(optimizer)
        if not isinstance(opt, AdaFisher):
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # The hooks saw G of the scaled loss; keep the scale on device (no sync).
            opt.statistics_grad_scale = grad_scaler_scale(scaler)
        self._steps_before[id(opt)] = opt.state[GLOBAL].get(GLOBAL_STEPS, 0)  # type: ignore[index]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        for optimizer in trainer.optimizers:
            opt = _unwrap(optimizer)
            before = self._steps_before.pop(id(opt), None)
            if before is None or not isinstance(opt, AdaFisher):
                continue
            after = opt.state[GLOBAL].get(GLOBAL_STEPS, 0)  # type: ignore[index]
            statistics_step = opt.is_statistics_step(before + 1)
            if after == before:
                # The step was due but did not run (GradScaler found inf/NaN gradients).
                opt.discard_statistics()
                self._discarded += statistics_step
            self._statistics_steps += statistics_step
            if self.log_diagnostics and statistics_step:
                self._log(pl_module, opt)

    # --- diagnostics --------------------------------------------------------------------------

    def _log(self, pl_module: pl.LightningModule, opt: AdaFisher) -> None:
        by_type: dict[str, list[torch.Tensor]] = defaultdict(list)
        collector = opt.collector
        if collector is None:
            return
        for layer in collector.layers:
            factors = opt.layer_factors(layer.primary)
            if factors is not None:
                kind = type(layer.module).__name__
                by_type[f"{kind}/H"].append(factors[0].float())
                by_type[f"{kind}/S"].append(factors[1].float())
        metrics: dict[str, Any] = {}
        for key, vectors in by_type.items():
            flat = torch.cat(vectors)
            metrics[f"adafisher/{key}_min"] = flat.min()
            metrics[f"adafisher/{key}_max"] = flat.max()
            metrics[f"adafisher/{key}_mean"] = flat.mean()
        skipped = opt.state[GLOBAL].get(GLOBAL_SKIPPED, {})  # type: ignore[index]
        metrics["adafisher/discarded_step_fraction"] = self._discarded / max(self._statistics_steps, 1)
        metrics["adafisher/nonfinite_layer_skips"] = float(sum(skipped.values()))
        metrics["adafisher/collect_seconds"] = collector.seconds
        metrics["adafisher/communicate_seconds"] = self._comm_seconds
        collector.seconds = 0.0
        self._comm_seconds = 0.0
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

