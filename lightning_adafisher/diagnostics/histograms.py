"""``FisherHistogramCallback``: the preconditioner diagonal over training (paper Figs. 4, 11).

For the first, middle and last supported layer (Linear, Conv2d, norms; or the layers named),
every ``every_n_steps`` optimizer steps the callback reads the diagonal the optimizer divides
the weight's update by (AdaFisher's ``F``; Adam's bias-corrected ``exp_avg_sq`` for comparison,
see :mod:`~lightning_adafisher.diagnostics.preconditioner`), keeps a compact summary of its
distribution, sends the full values to every logger whose ``experiment`` offers
``add_histogram`` (``TensorBoardLogger``: a histogram per layer under
``fisher_diagonal/<label>/<layer>``) and the summary numbers (mean, std, zero fraction,
quantiles) as scalars ``fisher_diagonal/<label>/<layer>/<stat>`` to every other logger
(``CSVLogger``: columns of ``metrics.csv``), and at the end of ``fit`` writes
``<filename>.png`` and ``<filename>.json`` under ``out_dir``.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_adafisher.diagnostics._common import (
    digits_cnn, digits_tensors, save_figure, write_json,
)
from lightning_adafisher.diagnostics.preconditioner import (
    first_middle_last, plot_histograms, preconditioner_diagonal, summarise, supported_layers,
)
from lightning_adafisher.optim import AdaFisher

__all__ = ["FisherHistogramCallback", "DigitsModule", "digits_experiment"]


def _unwrap(optimizer: Any) -> Any:
    return getattr(optimizer, "_optimizer", optimizer)


class FisherHistogramCallback(Callback):
    """Records the distribution of the preconditioner diagonal of three layers over training.

    Args:
        every_n_steps: record after optimizer steps ``1, 1 + n, 1 + 2n, ...``.
        layers: module names to watch (default: first, middle and last supported layer).
        out_dir: where the PNG and JSON go at the end of ``fit`` (default: the trainer's
            ``log_dir``, else ``default_root_dir``); ``""`` writes nothing.
        filename: stem of the PNG and JSON files.
        label: name of the run in titles and tags (default: the optimizer's class name).
        optimizer_index: which of ``trainer.optimizers`` to read.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        layers: list[str] | None = None,
        out_dir: str | None = None,
        filename: str = "fisher_histograms",
        label: str | None = None,
        optimizer_index: int = 0,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"Invalid every_n_steps: {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.out_dir = out_dir
        self.filename = filename
        self.label = label
        self.optimizer_index = optimizer_index
        self.records: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        """Layer name → ``[(optimizer step, summarise(diagonal))]``."""
        self._watched: list[tuple[str, nn.Module]] | None = None
        self._last_step = 0

    @property
    def run_label(self) -> str:
        return self.label or "run"

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.optimizer_index >= len(trainer.optimizers):
            raise MisconfigurationException(
                f"FisherHistogramCallback: optimizer_index={self.optimizer_index} but the trainer "
                f"has {len(trainer.optimizers)} optimizer(s)"
            )
        opt = _unwrap(trainer.optimizers[self.optimizer_index])
        if self.label is None:
            self.label = type(opt).__name__
        self._watched = None  # resolved at the first record: AdaFisherCallback may attach later
        self._last_step = 0

    def _resolve(self, pl_module: pl.LightningModule, opt: torch.optim.Optimizer) -> list[tuple[str, nn.Module]]:
        candidates = supported_layers(pl_module, opt)
        if self.layers is not None:
            by_name = dict(candidates)
            missing = [n for n in self.layers if n not in by_name]
            if missing:
                raise MisconfigurationException(
                    f"FisherHistogramCallback: no supported layer trained by the optimizer is named "
                    f"{', '.join(missing)} (supported: {', '.join(by_name) or 'none'})"
                )
            return [(n, by_name[n]) for n in self.layers]
        if not candidates:
            raise MisconfigurationException(
                "FisherHistogramCallback: the model has no Linear/Conv2d/norm layer trained by the optimizer"
            )
        return first_middle_last(candidates)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or (step - 1) % self.every_n_steps != 0:
            return  # no optimizer step since the last record (accumulation), or not due
        self._last_step = step
        opt = _unwrap(trainer.optimizers[self.optimizer_index])
        if self._watched is None:
            self._watched = self._resolve(pl_module, opt)
        writers, scalar_loggers = [], []
        for logger in trainer.loggers if trainer.is_global_zero else []:
            writer = getattr(logger, "experiment", None)
            if callable(getattr(writer, "add_histogram", None)):
                writers.append(writer)
            else:  # CSV and the like: the summary numbers as scalars
                scalar_loggers.append(logger)
        for name, module in self._watched:
            try:
                diag = preconditioner_diagonal(opt, module)
            except TypeError as err:
                raise MisconfigurationException(f"FisherHistogramCallback: {err}") from err
            if diag is None:
                continue
            values = diag.detach().float().reshape(-1).cpu()
            summary = summarise(values)
            self.records.setdefault(name, []).append((step, summary))
            tag = f"fisher_diagonal/{self.run_label}/{name}"
            for writer in writers:
                writer.add_histogram(tag, values, step)
            if scalar_loggers:
                scalars = {f"{tag}/{k}": float(v) for k, v in summary.items() if k not in ("quantiles", "numel")}
                for logger in scalar_loggers:
                    logger.log_metrics(scalars, step=step)

    def _output_dir(self, trainer: pl.Trainer) -> Path | None:
        if self.out_dir == "":
            return None
        if self.out_dir is not None:
            return Path(self.out_dir)
        return Path(trainer.log_dir or trainer.default_root_dir)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = self._output_dir(trainer)
        if out is None or not trainer.is_global_zero or not self.records:
            return
        self.export(out)

    def export(self, out: str | Path) -> tuple[Path, Path]:
        """Write ``<filename>.png`` and ``<filename>.json`` under ``out``."""
        out = Path(out)
        fig = plot_histograms({self.run_label: self.records},
                              title=f"preconditioner diagonal over training — {self.run_label}")
        png = save_figure(fig, out / f"{self.filename}.png")
        js = write_json({self.run_label: _records_json(self.records)}, out / f"{self.filename}.json")
        return png, js


def _records_json(records: dict[str, list[tuple[int, dict[str, Any]]]]) -> dict[str, Any]:
    return {
        layer: [{"step": step, **{k: v for k, v in s.items() if k != "quantiles"}} for step, s in recs]
        for layer, recs in records.items()
    }


# --------------------------------------------------------------------------------------------
# The experiment: Adam vs AdaFisher on scikit-learn's digits
# --------------------------------------------------------------------------------------------


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's INFO banners (GPU available, ...) for the duration of a run."""
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


class DigitsModule(pl.LightningModule):
    """:func:`~lightning_adafisher.diagnostics._common.digits_cnn` with ``"adam"`` or
    ``"adafisher"`` (paper variant) at one learning rate."""

    def __init__(self, optimizer: str = "adafisher", lr: float = 1e-3) -> None:
        super().__init__()
        if optimizer not in ("adam", "adafisher"):
            raise ValueError(f"Invalid optimizer: {optimizer!r} (expected 'adam' or 'adafisher')")
        self.optimizer_name, self.lr = optimizer, lr
        self.net = digits_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return AdaFisher(self.parameters(), lr=self.lr, variant="paper")


def digits_experiment(
    out: str | Path, epochs: int = 6, batch_size: int = 64, lr: float = 1e-3,
    every_n_steps: int = 5, seed: int = 0,
) -> dict[str, Any]:
    """Train the digits CNN with Adam and with AdaFisher (same initial weights and batches),
    each with a :class:`FisherHistogramCallback`; write ``fisher_histograms.png`` (both runs)
    and ``fisher_histograms.json`` under ``out``."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_adafisher.callbacks import AdaFisherCallback

    out = Path(out)
    x_train, y_train, _, _ = digits_tensors(seed)
    runs: dict[str, dict[str, list[tuple[int, dict[str, Any]]]]] = {}
    for name, label in (("adam", "Adam"), ("adafisher", "AdaFisher")):
        pl.seed_everything(seed, verbose=False)
        module = DigitsModule(name, lr)
        loader = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        recorder = FisherHistogramCallback(every_n_steps, out_dir="", label=label)
        callbacks: list[Callback] = [recorder] + ([AdaFisherCallback()] if name == "adafisher" else [])
        with _quiet_lightning():
            trainer = pl.Trainer(
                accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                callbacks=callbacks, default_root_dir=str(out),
            )
        with warnings.catch_warnings(), _quiet_lightning():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            trainer.fit(module, loader)
        runs[label] = recorder.records
    fig = plot_histograms(runs, title=f"digits CNN, lr={lr:g}, {epochs} epochs, batch {batch_size}: "
                                      "AdaFisher's F vs Adam's bias-corrected exp_avg_sq")
    save_figure(fig, out / "fisher_histograms.png")
    numbers = {
        "settings": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "every_n_steps": every_n_steps,
                     "seed": seed, "model": str(digits_cnn())},
        "runs": {label: _records_json(records) for label, records in runs.items()},
    }
    write_json(numbers, out / "fisher_histograms.json")
    return numbers
