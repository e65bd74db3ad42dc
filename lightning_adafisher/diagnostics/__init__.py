"""Diagnostics that reproduce the paper's analysis figures (optional extra ``diagnostics``).

``lightning-adafisher diagnostics <command> --out DIR`` (or
``python -m lightning_adafisher.diagnostics <command> ...``), each writing PNGs and a JSON of the numbers
behind them; see ``docs/diagnostics.md``:

* ``trajectories`` — optimization paths on a loss surface (Appendix C, Figs. 1 and 13):
  :mod:`~lightning_adafisher.diagnostics.trajectories`.
* ``histograms`` — distribution of the preconditioner diagonal over training (Figs. 4 and 11):
  :class:`FisherHistogramCallback` in :mod:`~lightning_adafisher.diagnostics.histograms`.
* ``kronecker`` — full Kronecker factors: Gershgorin discs, eigenvalue shift under off-diagonal
  noise, SNR of Eq. 7, heat maps and FFTs (Figs. 3, 7, 8, 9):
  :mod:`~lightning_adafisher.diagnostics.kronecker`.
* ``true-fisher`` — MAE between the Kronecker-factored diagonal and the true Fisher diagonal
  (Fig. 12, panel D in the text): :mod:`~lightning_adafisher.diagnostics.true_fisher`.

Nothing here is imported by ``import lightning_adafisher``. matplotlib, scipy and scikit-learn
are imported inside the functions that need them; only ``histograms`` imports Lightning.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["FisherHistogramCallback", "histograms", "kronecker", "trajectories", "true_fisher"]

_SUBMODULES = ("histograms", "kronecker", "trajectories", "true_fisher")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return import_module(f"lightning_adafisher.diagnostics.{name}")
    if name == "FisherHistogramCallback":
        return import_module("lightning_adafisher.diagnostics.histograms").FisherHistogramCallback
    raise AttributeError(f"module 'lightning_adafisher.diagnostics' has no attribute {name!r}")
