"""FSDP2 (``torch.distributed.fsdp.fully_shard``): each rank updates the rows it holds.

Under FSDP2 a parameter is a ``DTensor`` sharded on dim 0 over a 1-D data-parallel mesh: rank
``r`` of ``n`` holds rows ``[r·c, min((r+1)·c, rows))`` with ``c = ⌈rows / n⌉`` (``torch.chunk``
semantics; the last ranks may hold fewer rows, or none). Nothing else about AdaFisher changes:

* the statistics hooks run inside the module's forward, where FSDP2 has unsharded the
  parameters, so ``x`` and ``G`` are those of the whole layer;
* the factors ``H``, ``S`` are vectors of a layer's input and output sizes: they are reduced over
  the data-parallel ranks exactly as under DDP (one flat all-reduce per statistics step,
  :func:`statistics_reducer`) and kept whole on every rank;
* the update takes each parameter's local shard (``DTensor.to_local()``) and the rows of ``F``
  that belong to it (:func:`local_update_lists`); ``exp_avg`` is created with
  ``zeros_like(parameter)`` and so is a ``DTensor`` sharded like it, which is what
  ``torch.distributed.checkpoint`` saves and restores shard by shard.

The factors and the optimizer-wide counters are the same on every rank: they are saved once,
by name, with :func:`replicated_state` (``AdaFisherCallback`` puts them in its own checkpoint
state) and restored with :func:`load_replicated_state`; :func:`exclude_replicated_state` keeps the
counters out of ``optimizer.state_dict()``, which ``torch.distributed.checkpoint`` could not key,
and :func:`prepare_sharded` creates the sharded moments a checkpoint is loaded into.

Refused with a ``ValueError``: ``variant="eigen"`` (its rotation ``Q_Gᵀ ∇W Q_A`` mixes the rows
FSDP2 shards; see :data:`EIGEN_MESSAGE`), and any mesh or placement other than ``Shard(0)`` on a
1-D mesh (HSDP, tensor parallelism). Collectives stay in :mod:`lightning_adafisher.distributed`;
this module only reads ``DTensor`` metadata.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from lightning_adafisher import functional as fn
from lightning_adafisher.state_keys import EXP_AVG, FACTOR_H, FACTOR_S, FACTOR_UPDATES, GLOBAL, STEP

try:  # DTensor is public from torch 2.5 on; FSDP2 needs it
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]

__all__ = [
    "EIGEN_MESSAGE",
    "check_parameters",
    "exclude_replicated_state",
    "is_sharded",
    "load_replicated_state",
    "prepare_sharded",
    "local_update_lists",
    "replicated_state",
    "row_range",
    "statistics_reducer",
]

EIGEN_MESSAGE = (
    "AdaFisher: variant='eigen' is not supported with FSDP2 (fully_shard / "
    "ModelParallelStrategy): its update rotates each weight's gradient by the eigenbases of "
    "both factors (Q_Gᵀ ∇W Q_A), which mixes the rows FSDP2 shards across ranks. Pass "
    "variant='paper' (or 'reference'): their Fisher diagonal is per entry, so each rank updates "
    "the rows it holds."
)
_REPLICATED_KEYS = (FACTOR_H, FACTOR_S, FACTOR_UPDATES)


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 parameter, or state created like one)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def check_parameters(params: Iterable[Tensor], variant: str) -> None:
    """Raise ``ValueError`` for sharded parameters AdaFisher cannot update.

    Supported: ``Shard(0)`` on a 1-D mesh (FSDP2's data parallelism), with ``variant`` ``"paper"``
    or ``"reference"``.
    """
    for p in params:
        if not is_sharded(p):
            continue
        if variant == "eigen":
            raise ValueError(EIGEN_MESSAGE)
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                "AdaFisher supports FSDP2 parameters sharded on dim 0 over a 1-D data-parallel "
                f"mesh only; got placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D "
                "mesh. Tensor parallelism and HSDP (replicate × shard) are not supported: use "
                "fully_shard over one data-parallel mesh (ModelParallelStrategy("
                "data_parallel_size=N, tensor_parallel_size=1))."
            )


def row_range(p: Tensor) -> tuple[int, int]:
    """Rows ``[start, stop)`` of dim 0 of ``p`` that this rank holds (``torch.chunk`` semantics)."""
    mesh = p.device_mesh
    rows, n = p.shape[0], mesh.size()
    chunk = -(-rows // n)
    start = min(mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    local = p.to_local()
    if local.shape[0] != stop - start:
        raise RuntimeError(
            f"AdaFisher: the local shard has {local.shape[0]} rows, torch.chunk semantics give "
            f"{stop - start} (rows {start}:{stop} of {rows} over {n} ranks)"
        )
    return start, stop


def _local_denominator(
    denom: Tensor | float | fn.KronFactors, p: Tensor, start: int, stop: int, local: Tensor
) -> Tensor | float | fn.KronFactors:
    """The entries of ``F`` (of the whole parameter ``p``) that belong to rows ``start:stop``."""
    if isinstance(denom, float):
        return denom
    if isinstance(denom, fn.KronFactors):
        rows, cols, damping = denom
        per_row = math.prod(p.shape[1:])  # entries of one dim-0 row of p
        n_cols = cols.numel()
        if per_row % n_cols == 0:  # a dim-0 row spans whole rows of the [-1, len(cols)] view
            if rows.numel() == 1:
                return denom  # one factor broadcast over every row
            k = per_row // n_cols
            return fn.KronFactors(rows[start * k : stop * k], cols, damping)
        # A view row spans several dim-0 rows (a norm layer's weight): F of the local entries.
        flat = torch.arange(start * per_row, stop * per_row, device=cols.device)
        row_of = rows if rows.numel() == 1 else rows[flat // n_cols]
        return (row_of * cols[flat % n_cols] + damping).reshape(local.shape).to(local.dtype)
    if denom.is_meta:
        raise ValueError(
            "AdaFisher: a LayerHelper that overrides denominator() is not supported with FSDP2 "
            "(it would need the whole parameter on every rank); override kron_factors() instead"
        )
    return denom[start:stop]


def local_update_lists(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], steps: list[int],
    denominator: Callable[[Tensor, Tensor], Tensor | float | fn.KronFactors],
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Any], list[int]]:
    """The update's lists with every sharded parameter replaced by its local shard.

    ``denominator(p, like)`` returns ``F`` of parameter ``p`` with the layer helper reading
    shapes off ``like`` (a meta tensor of the whole parameter's shape, so that no helper indexes
    a ``DTensor``). Shards with no rows on this rank are left out.
    """
    out: tuple[list[Any], ...] = ([], [], [], [], [])
    for p, g, m, step in zip(params, grads, exp_avgs, steps):
        if not is_sharded(p):
            out_p, out_g, out_m, denom = p, g, m, denominator(p, p)
        else:
            local = p.to_local()
            if local.numel() == 0:
                continue
            start, stop = row_range(p)
            like = torch.empty(p.shape, dtype=p.dtype, device="meta")
            denom = _local_denominator(denominator(p, like), p, start, stop, local)
            out_p = local
            out_g = g.to_local() if is_sharded(g) else g
            out_m = m.to_local() if is_sharded(m) else m
        for lst, value in zip(out, (out_p, out_g, out_m, denom, step)):
            lst.append(value)
    return out  # type: ignore[return-value]


def statistics_reducer(optimizer: Any) -> Callable[..., Any] | None:
    """A statistics reducer over the data-parallel mesh of ``optimizer``'s sharded parameters
    (``None`` when none is sharded): set it as ``optimizer.statistics_reducer`` when using
    ``fully_shard`` without Lightning. FSDP2 averages gradients over that mesh as DDP does, so
    ``s`` is scaled exactly as under DDP, and the pooled counts likewise stay on the device
    (:func:`lightning_adafisher.distributed.unpack`)."""
    from lightning_adafisher.distributed import make_reducer, torch_distributed_all_reduce_sum

    sharded = [p for group in optimizer.param_groups for p in group["params"] if is_sharded(p)]
    if not sharded:
        return None
    check_parameters(sharded, optimizer.variant)
    mesh = sharded[0].device_mesh
    group = mesh.get_group()
    device = sharded[0].to_local().device
    return make_reducer(
        lambda t: torch_distributed_all_reduce_sum(t, group=group), device, mesh.size()
    )


# --- checkpoints ----------------------------------------------------------------------------


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}


def replicated_state(optimizer: Any, model: nn.Module) -> dict[str, Any]:
    """The state every rank holds whole: each layer's factors (keyed by parameter name) and the
    optimizer-wide counters. Tensors are copied to the CPU."""
    names = _names(model)
    factors: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            kept = {
                k: (v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else v)
                for k, v in state.items() if k in _REPLICATED_KEYS
            }
            if kept and id(p) in names:
                factors[names[id(p)]] = kept
    glob = copy.deepcopy(optimizer.state.get(GLOBAL, {}))  # type: ignore[call-overload]
    return {"factors": factors, "global": glob}


def load_replicated_state(optimizer: Any, model: nn.Module, saved: dict[str, Any]) -> None:
    """Inverse of :func:`replicated_state` (after the sharded state has been loaded)."""
    params = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    by_name = {name: params[i] for i, name in _names(model).items() if i in params}
    for name, kept in saved.get("factors", {}).items():
        p = by_name.get(name)
        if p is None:
            raise KeyError(f"AdaFisher: saved factors for {name!r}, which this optimizer does not train")
        device = p.to_local().device if is_sharded(p) else p.device
        for key, value in kept.items():
            optimizer.state[p][key] = (
                value.to(device=device, dtype=fn.stats_dtype(p.dtype), copy=True)
                if isinstance(value, Tensor) else value
            )
    optimizer.state[GLOBAL] = copy.deepcopy(saved.get("global", {}))  # type: ignore[index]
    optimizer.state_changed()


def exclude_replicated_state(optimizer: Any) -> Any:
    """Keep the optimizer-wide counters (a non-parameter key) out of ``optimizer.state_dict()``,
    which ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keys by parameter
    name; returns the hook's handle. Save them with :func:`replicated_state` instead."""

    def drop(opt: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict["state"].pop(GLOBAL, None)
        return state_dict

    return optimizer.register_state_dict_post_hook(drop)


def prepare_sharded(optimizer: Any) -> bool:
    """Create every sharded parameter's ``step`` and ``exp_avg`` now (as the first step would),
    so that the optimizer state dict a distributed checkpoint loads *into* already holds them
    (``torch.distributed.checkpoint`` restores only the entries the target has; an empty state
    would make it take a zero-learning-rate step first). Returns whether any is sharded."""
    sharded = [p for group in optimizer.param_groups for p in group["params"] if is_sharded(p)]
    for p in sharded:
        if p.requires_grad:
            state = optimizer.state[p]
            if STEP not in state:
                state[STEP] = 0
                state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return bool(sharded)
