"""The diagonal an optimizer divides the update by, per layer (paper Figs. 4 and 11).

* AdaFisher/AdaFisherW: ``F = S'[o]·H'[i] + λ`` (docs/numerics.md#the-fisher-diagonal), as
  ``AdaFisher.fisher_diagonal`` returns it: from the optimizer's folded factors exactly as its
  step builds it (``None`` before a layer's first statistics step).
* Adam/AdamW (comparison): the bias-corrected second moment ``v̂ = exp_avg_sq / (1 − β₂^t)``,
  the quantity Adam's update divides by after a square root.

Plain torch; the Lightning callback that records these over training is
:class:`lightning_adafisher.diagnostics.histograms.FisherHistogramCallback`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lightning_adafisher.diagnostics._common import new_figure, optional
from lightning_adafisher.layers import layer_helper_for
from lightning_adafisher.optim import AdaFisher

__all__ = [
    "supported_layers",
    "first_middle_last",
    "preconditioner_diagonal",
    "summarise",
    "plot_histograms",
]

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
DECADES = 10.0
"""Histogram x-range: at most this many decades below the largest entry (smaller ones, and
zeros, are counted in the leftmost bin)."""


def supported_layers(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, nn.Module]]:
    """Modules with an AdaFisher layer helper whose ``weight`` the optimizer trains, in
    ``named_modules`` order (the order AdaFisher binds them)."""
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if layer_helper_for(module) is not None and isinstance(weight, Tensor) and id(weight) in trained:
            found.append((name, module))
    return found


def first_middle_last(items: Sequence[Any]) -> list[Any]:
    """The first, middle (``(n − 1) // 2``) and last item, without repeats."""
    picks = [0, (len(items) - 1) // 2, len(items) - 1] if items else []
    return [items[i] for i in sorted(set(picks))]


@torch.no_grad()
def preconditioner_diagonal(
    optimizer: torch.optim.Optimizer, module: nn.Module, role: str = "weight"
) -> Tensor | None:
    """The diagonal ``optimizer`` divides ``module.<role>``'s update by (see module docstring),
    same shape as the parameter; ``None`` when the optimizer has not built it yet.

    Raises ``TypeError`` for optimizers other than AdaFisher(W) and Adam-like ones (with
    ``betas`` and ``exp_avg_sq``: Adam, AdamW, NAdam, RAdam).
    """
    param = getattr(module, role)
    if isinstance(optimizer, AdaFisher):
        return optimizer.fisher_diagonal(param)  # None: identity preconditioner (so far)
    group = next((g for g in optimizer.param_groups if any(q is param for q in g["params"])), None)
    if group is None:
        raise ValueError(f"{type(module).__name__}.{role} is not trained by this optimizer")
    if "betas" not in group:
        raise TypeError(
            f"{type(optimizer).__name__} keeps no preconditioner diagonal that this diagnostic "
            "knows: use AdaFisher/AdaFisherW or an Adam-like optimizer (exp_avg_sq state)"
        )
    state = optimizer.state.get(param, {})
    if "exp_avg_sq" not in state:
        return None  # before the parameter's first step
    return state["exp_avg_sq"] / (1.0 - group["betas"][1] ** float(state["step"]))


def summarise(values: Tensor, n_quantiles: int = 512) -> dict[str, Any]:
    """Summary numbers of one diagonal, plus ``n_quantiles`` evenly spaced quantiles (enough to
    redraw its histogram without keeping every entry)."""
    v = values.detach().reshape(-1).to(torch.float64).cpu()
    sorted_v = v.sort().values
    levels = torch.linspace(0, 1, min(n_quantiles, v.numel()), dtype=torch.float64)
    idx = (levels * (v.numel() - 1)).round().long()
    return {
        "numel": v.numel(),
        "mean": float(v.mean()),
        "std": float(v.std()) if v.numel() > 1 else 0.0,
        "zero_fraction": float((v == 0).double().mean()),
        **{f"q{int(q * 100):02d}": float(torch.quantile(v, q)) for q in QUANTILES},
        "quantiles": sorted_v[idx],
    }


def plot_histograms(
    runs: dict[str, dict[str, list[tuple[int, dict[str, Any]]]]],
    bins: int = 60,
    title: str = "",
) -> Any:
    """Rows: runs (optimizer name → layer name → ``[(step, summarise(...))]``); columns: layers.

    Each panel is the histogram of ``log10`` of the diagonal (x) at every recorded step (y),
    coloured by the fraction of entries, with the median as a white line. Entries ≤ 0 or more
    than ``DECADES`` below the largest are counted in the leftmost bin. Returns a ``Figure``.
    """
    np = optional("numpy")
    colors = optional("matplotlib.colors")
    n_rows = len(runs)
    n_cols = max(len(layers) for layers in runs.values())
    fig = new_figure(4.6 * n_cols + 0.6, 3.6 * n_rows + 0.5)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for row, (run, layers) in zip(axes, runs.items()):
        for ax, (layer, records) in zip(row, layers.items()):
            steps = [step for step, _ in records]
            logs = [
                np.log10(np.maximum(summary["quantiles"].numpy(), np.finfo(np.float64).tiny))
                for _, summary in records
            ]
            positive = np.concatenate([q[np.isfinite(q) & (q > -300)] for q in logs])
            hi = float(positive.max()) if positive.size else 0.0
            lo = max(float(positive.min()), hi - DECADES) if positive.size else -1.0
            if hi - lo < 1e-6:
                lo, hi = lo - 0.5, hi + 0.5
            edges = np.linspace(lo, hi, bins + 1)
            image = np.stack([
                np.histogram(np.clip(q, lo, hi), bins=edges)[0] / max(len(q), 1) for q in logs
            ])
            y_edges = _step_edges(steps)
            mesh = ax.pcolormesh(edges, y_edges, image, cmap="viridis",
                                 norm=colors.PowerNorm(0.5, vmin=0.0, vmax=max(float(image.max()), 1e-12)))
            medians = [math.log10(max(s["q50"], 1e-300)) for _, s in records]
            ax.plot(np.clip(medians, lo, hi), steps, color="white", lw=1.2, label="median")
            fig.colorbar(mesh, ax=ax, label="fraction of entries")
            ax.set_title(f"{run}: {layer}", fontsize=9)
            ax.set_xlabel("log10 of diagonal entry")
            ax.set_ylabel("optimizer step")
            ax.legend(fontsize=7, loc="upper right")
        for ax in row[len(layers):]:
            ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def _step_edges(steps: list[int]) -> Any:
    np = optional("numpy")
    s = np.asarray(steps, dtype=float)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])
