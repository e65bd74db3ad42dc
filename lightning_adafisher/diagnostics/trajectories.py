"""Optimization paths of two chosen weights on a loss surface (paper Appendix C, Figs. 1 and 13).

Pipeline: train identical copies of one model (same initial weights, same mini-batch order) with
several optimizers; after every epoch record two chosen scalar weights ``w = (w_a, w_b)`` and the
full-data loss; draw each path on a contour plot of the loss over ``w``.

Two surfaces are offered, because they answer different questions:

* ``slice`` (default): the loss as a function of ``w`` alone, every other weight held at the
  values of a given model (the experiment uses the shared *initial* model, the one point every
  optimizer has in common). The loss is evaluated at scattered points of the plotted box and
  interpolated onto a 200×200 grid with ``scipy.interpolate.griddata(method="cubic")``. It is a
  true function of the two plotted weights, but the paths do not move on it: while ``w`` moves,
  so do all the other weights.
* ``paper``: Appendix C's construction: ``griddata`` through the recorded ``(w, loss)`` pairs of
  all optimizers and epochs. Every point lies on its optimizer's actual loss, but the surface
  between paths mixes models whose other weights differ, and it is undefined (blank) outside the
  convex hull of the recorded points.

Shapes: ``x`` ``[N, ...]`` inputs, ``y`` ``[N]`` targets, points ``[P, 2]``, grids ``[R, R]``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_adafisher.diagnostics._common import (
    iris_2d, new_figure, optional, save_figure, write_json,
)
from lightning_adafisher.optim import AdaFisher

__all__ = [
    "Coordinates",
    "Trajectory",
    "resolve_coordinates",
    "bounding_box",
    "read_coordinates",
    "record_trajectories",
    "slice_losses",
    "slice_surface",
    "paper_surface",
    "plot_trajectories",
    "iris_mlp",
    "iris_experiment",
]

Coordinates = str | Sequence[tuple[str, int | tuple[int, ...]]]
"""The two plotted weights: the name of a parameter with exactly two entries (``"0.weight"``),
or two ``(parameter name, index)`` pairs, e.g. ``[("fc.weight", (0, 3)), ("fc.bias", 0)]``."""

LossFn = Callable[[Tensor, Tensor], Tensor]
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
RESOLUTION = 200


@dataclass
class Trajectory:
    """One optimizer's path: ``weights[e]`` and ``losses[e]`` after epoch ``e`` (0: initial)."""

    name: str
    weights: Tensor
    """``[epochs + 1, 2]``."""
    losses: Tensor
    """``[epochs + 1]``: the full-data loss at that point (eval mode, no grad)."""
    model: nn.Module = field(repr=False)
    optimizer: torch.optim.Optimizer = field(repr=False)


def resolve_coordinates(model: nn.Module, coordinates: Coordinates) -> list[tuple[str, int]]:
    """``[(parameter name, flat index)] * 2``; ``ValueError`` if they do not name 2 weights."""
    params = dict(model.named_parameters())
    if isinstance(coordinates, str):
        if coordinates not in params:
            raise ValueError(f"Invalid coordinates: no parameter named {coordinates!r}")
        if params[coordinates].numel() != 2:
            raise ValueError(
                f"Invalid coordinates: {coordinates!r} has {params[coordinates].numel()} entries; "
                "name a 2-entry parameter or give two (name, index) pairs"
            )
        return [(coordinates, 0), (coordinates, 1)]
    pairs = list(coordinates)
    if len(pairs) != 2:
        raise ValueError(f"Invalid coordinates: expected two (name, index) pairs, got {len(pairs)}")
    resolved = []
    for name, index in pairs:
        if name not in params:
            raise ValueError(f"Invalid coordinates: no parameter named {name!r}")
        p = params[name]
        index = (index,) if isinstance(index, int) else tuple(index)
        if len(index) == 1:
            flat = index[0]  # a flat (row-major) index, whatever the parameter's shape
        elif len(index) == p.dim() and all(0 <= i < n for i, n in zip(index, p.shape)):
            flat = 0
            for i, n in zip(index, p.shape):
                flat = flat * n + i
        else:
            flat = -1
        if not 0 <= flat < p.numel():
            raise ValueError(f"Invalid coordinates: index {index} out of range for {name} {tuple(p.shape)}")
        resolved.append((name, flat))
    if resolved[0] == resolved[1]:
        raise ValueError("Invalid coordinates: the two weights are the same entry")
    return resolved


def read_coordinates(model: nn.Module, resolved: list[tuple[str, int]]) -> Tensor:
    """The two weights' current values as a float64 ``[2]`` tensor."""
    params = dict(model.named_parameters())
    return torch.tensor(
        [params[name].detach().reshape(-1)[i].item() for name, i in resolved], dtype=torch.float64
    )


@torch.no_grad()
def _full_loss(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> float:
    was_training = model.training
    model.eval()
    try:
        return float(loss_fn(model(x), y))
    finally:
        model.train(was_training)


def record_trajectories(
    model_factory: Callable[[], nn.Module],
    optimizers: Mapping[str, OptimizerFactory],
    coordinates: Coordinates,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    epochs: int = 20,
    batch_size: int | None = None,
    seed: int = 0,
) -> dict[str, Trajectory]:
    """Train one copy of ``model_factory()`` per optimizer and record the two weights per epoch.

    Every copy starts from the same weights (one model is built under ``torch.manual_seed(seed)``
    and deep-copied) and sees the same mini-batches in the same order. ``optimizers`` maps a name
    to a function of the model (so AdaFisher can be given the model:
    ``lambda m: AdaFisher(m, lr=1e-2)``). ``batch_size=None`` trains full-batch.
    """
    if epochs < 1:
        raise ValueError(f"Invalid epochs: {epochs}")
    torch.manual_seed(seed)
    initial = model_factory()
    resolved = resolve_coordinates(initial, coordinates)
    n = len(x)
    batch = n if batch_size is None else batch_size
    result: dict[str, Trajectory] = {}
    for name, make in optimizers.items():
        model = copy.deepcopy(initial)
        model.train()
        optimizer = make(model)
        order = torch.Generator().manual_seed(seed)
        weights = [read_coordinates(model, resolved)]
        losses = [_full_loss(model, x, y, loss_fn)]
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=order).split(batch):
                optimizer.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                optimizer.step()
            weights.append(read_coordinates(model, resolved))
            losses.append(_full_loss(model, x, y, loss_fn))
        result[name] = Trajectory(
            name, torch.stack(weights), torch.tensor(losses, dtype=torch.float64), model, optimizer
        )
    return result


@torch.no_grad()
def slice_losses(
    model: nn.Module,
    coordinates: Coordinates,
    x: Tensor,
    y: Tensor,
    points: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    chunk_size: int | None = 256,
) -> Tensor:
    """The loss at each of ``points`` (``[P, 2]``) with the two weights replaced, every other
    weight as in ``model`` (evaluated in eval mode; ``model`` itself is not modified).

    Points are batched with ``torch.vmap`` (``chunk_size`` at a time), one by one for models
    with operations vmap cannot batch."""
    resolved = resolve_coordinates(model, coordinates)
    base = {k: v.detach() for k, v in model.named_parameters()}
    base.update({k: v for k, v in model.named_buffers()})
    dtype = base[resolved[0][0]].dtype

    def loss_at(point: Tensor) -> Tensor:
        params = dict(base)
        for k, (name, i) in enumerate(resolved):
            flat = params[name].reshape(-1)
            onehot = torch.zeros_like(flat)
            onehot[i] = 1.0
            # Arithmetic, not indexing, so the same code runs under vmap.
            params[name] = (flat + onehot * (point[k] - flat[i])).view_as(base[name])
        return loss_fn(functional_call(model, params, (x,)), y)

    was_training = model.training
    model.eval()
    pts = points.to(dtype)
    try:
        try:
            out = torch.vmap(loss_at, chunk_size=chunk_size)(pts)
        except (RuntimeError, NotImplementedError):  # an op without a batching rule
            out = torch.stack([loss_at(p) for p in pts])
    finally:
        model.train(was_training)
    return out.to(torch.float64)


def bounding_box(
    trajectories: Mapping[str, Trajectory] | Tensor, margin: float = 0.25
) -> tuple[float, float, float, float]:
    """``(x_min, x_max, y_min, y_max)`` around every recorded point (or an ``[P, 2]`` tensor),
    widened by ``margin`` times the extent on each side (at least 0.05)."""
    if isinstance(trajectories, Tensor):
        weights = trajectories
    else:
        weights = torch.cat([t.weights for t in trajectories.values()])
    lo, hi = weights.min(0).values, weights.max(0).values
    pad = torch.clamp((hi - lo) * margin, min=0.05)
    return (float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1]))


def _grid(box: tuple[float, float, float, float], resolution: int) -> tuple[Any, Any]:
    np = optional("numpy")
    gx = np.linspace(box[0], box[1], resolution)
    gy = np.linspace(box[2], box[3], resolution)
    return np.meshgrid(gx, gy)


def slice_surface(
    model: nn.Module,
    coordinates: Coordinates,
    x: Tensor,
    y: Tensor,
    box: tuple[float, float, float, float],
    loss_fn: LossFn = F.cross_entropy,
    n_points: int = 1500,
    extra_points: Tensor | None = None,
    resolution: int = RESOLUTION,
    seed: int = 0,
) -> dict[str, Any]:
    """Loss slice over ``box = (x_min, x_max, y_min, y_max)``, interpolated onto a grid.

    The loss is evaluated at ``n_points`` uniform random points, the box's corners and
    ``extra_points`` (e.g. the trajectories), then ``griddata(method="cubic")`` fills a
    ``resolution × resolution`` grid. Returns ``X, Y, Z`` (numpy grids) and the scattered
    ``points``/``values`` behind them.
    """
    interpolate = optional("scipy.interpolate")
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([box[0], box[2]], dtype=torch.float64)
    hi = torch.tensor([box[1], box[3]], dtype=torch.float64)
    random = lo + (hi - lo) * torch.rand(n_points, 2, generator=g, dtype=torch.float64)
    corners = torch.tensor([[box[0], box[2]], [box[0], box[3]], [box[1], box[2]], [box[1], box[3]]],
                           dtype=torch.float64)
    parts = [corners, random] + ([extra_points.to(torch.float64)] if extra_points is not None else [])
    points = torch.cat(parts)
    values = slice_losses(model, coordinates, x, y, points, loss_fn)
    gx, gy = _grid(box, resolution)
    z = interpolate.griddata(points.numpy(), values.numpy(), (gx, gy), method="cubic")
    return {"X": gx, "Y": gy, "Z": z, "points": points, "values": values}


def paper_surface(
    trajectories: Mapping[str, Trajectory],
    box: tuple[float, float, float, float] | None = None,
    resolution: int = RESOLUTION,
) -> dict[str, Any]:
    """Appendix C: ``griddata`` (cubic) through every recorded ``(weights, loss)`` pair.

    Duplicate points (an optimizer that did not move) are merged, keeping the mean loss.
    Grid cells outside the convex hull of the points are NaN.
    """
    np = optional("numpy")
    interpolate = optional("scipy.interpolate")
    w = torch.cat([t.weights for t in trajectories.values()]).numpy()
    loss = torch.cat([t.losses for t in trajectories.values()]).numpy()
    unique, inverse = np.unique(w, axis=0, return_inverse=True)
    merged = np.bincount(inverse.ravel(), weights=loss) / np.bincount(inverse.ravel())
    if box is None:
        box = bounding_box(torch.as_tensor(unique), 0.0)
    gx, gy = _grid(box, resolution)
    if len(unique) < 4:
        z = np.full_like(gx, np.nan)
    else:
        z = interpolate.griddata(unique, merged, (gx, gy), method="cubic")
    return {"X": gx, "Y": gy, "Z": z}


_COLOURS = {"Adam": "tab:blue", "SGD": "tab:green", "AdaFisher": "tab:red"}


def _draw_paths(ax: Any, trajectories: Mapping[str, Trajectory]) -> None:
    for k, (name, t) in enumerate(trajectories.items()):
        colour = _COLOURS.get(name, f"C{k + 3}")
        w = t.weights.numpy()
        ax.plot(w[:, 0], w[:, 1], "-o", color=colour, ms=3, lw=1.6, label=name)
        ax.plot(w[-1, 0], w[-1, 1], "X", color=colour, ms=11, mec="black", mew=0.8)
    first = next(iter(trajectories.values())).weights[0].numpy()
    ax.plot(first[0], first[1], "*", color="gold", ms=16, mec="black", mew=0.8, label="shared start")


def plot_trajectories(
    trajectories: Mapping[str, Trajectory],
    slice_: Mapping[str, Any] | None,
    paper: Mapping[str, Any] | None,
    labels: tuple[str, str] = ("$w_1$", "$w_2$"),
    title: str = "",
    slice_label: str = "loss slice (every other weight fixed)",
) -> Any:
    """Contour panels (slice, paper-style; either may be None) with every path, plus the loss
    per epoch. Returns a matplotlib ``Figure`` (16 × 5 in)."""
    np = optional("numpy")
    surfaces = [(s, t) for s, t in (
        (slice_, slice_label),
        (paper, "Appendix C surface (griddata of the recorded losses)"),
    ) if s is not None]
    fig = new_figure(16, 5)
    axes = fig.subplots(1, len(surfaces) + 1, width_ratios=[1.25] * len(surfaces) + [1])
    for ax, (surface, sub) in zip(axes, surfaces):
        z = np.ma.masked_invalid(surface["Z"])
        filled = ax.contourf(surface["X"], surface["Y"], z, levels=30, cmap="viridis")
        ax.contour(surface["X"], surface["Y"], z, levels=12, colors="white", linewidths=0.4, alpha=0.6)
        fig.colorbar(filled, ax=ax, label="loss")
        _draw_paths(ax, trajectories)
        ax.set_xlabel(labels[0])
        ax.set_ylabel(labels[1])
        ax.set_title(sub, fontsize=10)
        ax.legend(loc="best", fontsize=8, framealpha=0.85)
    ax = axes[-1]
    for k, (name, t) in enumerate(trajectories.items()):
        ax.plot(t.losses.numpy(), "-o", ms=3, color=_COLOURS.get(name, f"C{k + 3}"), label=name)
    ax.set_xlabel("epoch (0: shared initialisation)")
    ax.set_ylabel("full-data loss")
    ax.set_title("loss per epoch", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------
# The paper's experiment: Iris → PCA(2) → 2-layer MLP whose first layer has 2 weights
# --------------------------------------------------------------------------------------------


def iris_mlp() -> nn.Sequential:
    """``Linear(2, 1, bias=False) → Tanh → Linear(1, 3)``: the first layer is ``W_1 ∈ R²``."""
    return nn.Sequential(nn.Linear(2, 1, bias=False), nn.Tanh(), nn.Linear(1, 3))


def iris_experiment(
    out: str | Path,
    lr: float = 1e-3,
    epochs: int = 20,
    batch_size: int | None = 16,
    seed: int = 0,
    n_points: int = 1500,
    tag: str = "",
) -> dict[str, Any]:
    """Adam, SGD and AdaFisher (paper variant, defaults but ``lr``) on Iris; writes
    ``trajectories[_tag].png`` and ``.json`` under ``out`` and returns the numbers.

    The default ``lr=1e-3`` is the paper's (App. C); with mini-batches of 16 (10 steps per
    epoch) every optimizer moves visibly in 20 epochs, SGD the least."""
    x, y = iris_2d()

    def adafisher(m: nn.Module) -> torch.optim.Optimizer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Tanh has no parameters; nothing to warn about
            return AdaFisher(m, lr=lr, variant="paper")

    optimizers: dict[str, OptimizerFactory] = {
        "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=lr),
        "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=lr),
        "AdaFisher": adafisher,
    }
    trajectories = record_trajectories(
        iris_mlp, optimizers, "0.weight", x, y, epochs=epochs, batch_size=batch_size, seed=seed
    )
    torch.manual_seed(seed)
    initial = iris_mlp()  # the shared initialisation (same seed as record_trajectories)
    all_w = torch.cat([t.weights for t in trajectories.values()])
    box = bounding_box(trajectories)
    sl = slice_surface(initial, "0.weight", x, y, box, n_points=n_points, extra_points=all_w, seed=seed)
    pa = paper_surface(trajectories, box)
    batches = "full batch" if batch_size is None else f"batch {batch_size}"
    fig = plot_trajectories(
        trajectories, sl, pa, labels=("$W_1[0]$ (PC1 weight)", "$W_1[1]$ (PC2 weight)"),
        title=f"Iris (PCA 2-D), MLP 2→1→3, lr={lr:g}, {epochs} epochs, {batches}, seed {seed}",
        slice_label="loss slice (other weights at the shared initial values)",
    )
    out = Path(out)
    stem = f"trajectories_{tag}" if tag else "trajectories"
    save_figure(fig, out / f"{stem}.png")
    ada = trajectories["AdaFisher"].optimizer
    assert isinstance(ada, AdaFisher) and ada.collector is not None
    first = ada.collector.layers[0]
    factors = ada.layer_factors(first.primary)
    numbers: dict[str, Any] = {
        "settings": {"lr": lr, "epochs": epochs, "batch_size": batch_size, "seed": seed,
                     "model": "Linear(2,1,bias=False)-Tanh-Linear(1,3)", "data": "iris, standardised, PCA(2)",
                     "slice_other_weights": "shared initial values", "slice_points": int(len(sl["points"]))},
        "trajectories": {
            name: {"weights": t.weights, "losses": t.losses} for name, t in trajectories.items()
        },
        "adafisher_first_layer_final": None if factors is None else {
            "H_normalised": factors[0], "S_normalised": factors[1],
            "F": ada.fisher_diagonal(first.primary).reshape(-1),
        },
        "slice_min": {"loss": float(sl["values"].min()),
                      "at": sl["points"][int(sl["values"].argmin())]},
    }
    write_json(numbers, out / f"{stem}.json")
    return numbers
