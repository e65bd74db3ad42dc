"""Count the compute ops a training step dispatches: on a GPU, where a small step is bound by
kernel launches, this is the number that matters; it can be taken on any machine.

``lightning-adafisher bench speed --count-ops`` adds an ``ops`` column: the ops one step (zero_grad,
forward, backward, ``step()``) dispatches, taken on the code path CUDA runs (see
:func:`cuda_code_path`) whatever the device, after the timed rounds.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "count_ops", "cuda_code_path"]

_NOT_COMPUTE = frozenset({
    # allocation, aliasing and metadata: no kernel runs
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "set_", "resize_", "is_same_size", "promote_types", "result_type",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_has_compatible_shallow_copy_type",
    "_record_function_enter_new", "_record_function_exit", "_local_scalar_dense",
})
"""Ops that dispatch but launch no compute kernel (views are recognised by their schema)."""


class OpCounter(TorchDispatchMode):
    """Counts, per ATen op, the compute ops dispatched while it is active (views, allocations and
    metadata queries skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NOT_COMPUTE:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_ops(fn: Callable[[], Any]) -> OpCounter:
    """Run ``fn`` once under an :class:`OpCounter` and return it."""
    with OpCounter() as counter:
        fn()
    return counter


@contextlib.contextmanager
def cuda_code_path(optimizers: list[Any]) -> Iterator[None]:
    """Run AdaFisher's CUDA code path on any device, for counting: the multi-tensor (``foreach``)
    update, the deferred read of the non-finite-statistics flags, and no CPU-only tuning
    (no-temporary square sums, a per-sample loop that trades ops for memory; square-and-sum
    instead of dot products for small maps)."""
    from lightning_adafisher import functional
    from lightning_adafisher.optim import AdaFisher

    ours = [opt for opt in optimizers if isinstance(opt, AdaFisher)]
    saved = [([group["foreach"] for group in opt.param_groups], opt.defer_skip_check) for opt in ours]
    without_temporary, on_cpu = functional._without_temporary, functional._on_cpu
    try:
        functional._without_temporary = lambda t: False
        functional._on_cpu = lambda t: False
        for opt in ours:
            for group in opt.param_groups:
                group["foreach"] = True
            opt.defer_skip_check = True
        yield
    finally:
        functional._without_temporary, functional._on_cpu = without_temporary, on_cpu
        for opt, (foreach, defer) in zip(ours, saved):
            for group, value in zip(opt.param_groups, foreach):
                group["foreach"] = value
            opt.defer_skip_check = defer
