"""Averaging statistics across data-parallel ranks: one all-reduce of one flat buffer per step.

The only module that touches ``torch.distributed``; everything works uninitialised. The buffer
has a fixed layout on every rank, decided by the bound layers alone (the same model on every
rank): every layer's ``h_total (len H), s_total (len S)`` in layer order, then every layer's
``h_count, s_count``. A layer that a rank did not use contributes zeros, so no rank waits for a
collective the others skip and the pooled mean ``Σ totals / Σ counts`` only counts ranks that
saw the layer. The counts travel as one tensor made on the host (one copy to the device, not
one small op per layer) and come back as device tensors: nothing is read back to the host, and
which layers are folded is decided from what the host already knows (docs/numerics.md).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from lightning_adafisher.functional import stats_dtype
from lightning_adafisher.statistics import BoundLayer, LayerStats

__all__ = ["pack", "unpack", "make_reducer", "torch_distributed_all_reduce_sum", "is_rank_zero"]


def _buffer_dtype(layers: list[BoundLayer]) -> torch.dtype:
    dtype = torch.float32
    for layer in layers:
        dtype = torch.promote_types(dtype, stats_dtype(layer.primary.dtype))
    return dtype


def pack(
    layers: list[BoundLayer], pending: dict[str, LayerStats], device: torch.device
) -> Tensor:
    """Lay the pending statistics out in one flat buffer (zeros where a layer saw nothing)."""
    dtype = _buffer_dtype(layers)
    totals: list[Tensor] = []
    counts: list[float] = []
    for layer in layers:
        n_h, n_s = layer.sizes
        stats = pending.get(layer.name)
        for total, count, n in (
            (stats.h_total if stats else None, stats.h_count if stats else 0.0, n_h),
            (stats.s_total if stats else None, stats.s_count if stats else 0.0, n_s),
        ):
            if total is None:
                totals.append(torch.zeros(n, dtype=dtype, device=device))
                counts.append(0.0)
            else:
                same = total.dtype == dtype and total.device == device
                totals.append(total if same else total.to(device=device, dtype=dtype))
                counts.append(count)
    totals.append(torch.tensor(counts, dtype=dtype).to(device, non_blocking=True))
    return torch.cat(totals)


def unpack(layers: list[BoundLayer], buffer: Tensor) -> dict[str, LayerStats]:
    """Inverse of :func:`pack`, for every layer: totals and counts are views of ``buffer``.

    The counts stay on the device as 0-dim tensors (nothing is read back to the host): a layer
    whose count is zero on every rank comes back with zero totals and zero counts, and the fold
    leaves its factors exactly as they were (:meth:`AdaFisher._fold`).
    """
    sizes = [n for layer in layers for n in layer.sizes]
    expected = sum(sizes) + len(sizes)
    if expected != buffer.numel():
        raise RuntimeError(
            f"statistics buffer has {buffer.numel()} entries, the layout expects {expected}: "
            "the ranks do not hold the same model"
        )
    counts = buffer[expected - len(sizes) :].unbind()
    parts = buffer[: expected - len(sizes)].split(sizes)
    return {
        layer.name: LayerStats(parts[2 * k], counts[2 * k], parts[2 * k + 1], counts[2 * k + 1])
        for k, layer in enumerate(layers)
    }


def make_reducer(
    all_reduce_sum: Callable[[Tensor], Tensor],
    device: torch.device | Callable[[], torch.device],
    world_size: int,
) -> Callable[[list[BoundLayer], dict[str, LayerStats]], dict[str, LayerStats]]:
    """A statistics reducer for :attr:`AdaFisher.statistics_reducer` from a sum all-reduce.

    Each rank's hooks see ``G`` of its *local* loss, which DDP's gradient averaging turns into
    ``1/world_size`` of the gradient of the global loss. ``s`` is therefore divided by
    ``world_size²``, so that N ranks of B samples give exactly the statistics of one batch of
    N·B (``h`` needs nothing: inputs are not scaled).
    """
    s_scale = 1.0 / float(world_size) ** 2

    def reduce(layers: list[BoundLayer], pending: dict[str, LayerStats]) -> dict[str, LayerStats]:
        dev = device() if callable(device) else device
        pooled = unpack(layers, all_reduce_sum(pack(layers, pending, dev)))
        return {name: stats._replace(s_total=stats.s_total * s_scale) for name, stats in pooled.items()}  # type: ignore[operator]

    return reduce


def torch_distributed_all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """``dist.all_reduce(SUM)`` over ``group`` (default: the world) when a process group is
    initialised, else the identity."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def is_rank_zero() -> bool:
    """Whether this process is rank zero of the default process group, or runs without one
    (the optimizer's warnings are printed there only, not once per rank)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)
