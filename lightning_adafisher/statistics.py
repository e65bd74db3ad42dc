"""Statistics hooks: install, gate, accumulate, hand over, remove.

For every bound layer a forward hook reads the input ``x`` (unchanged at that point: in-place ops
such as ``nn.ReLU(inplace=True)`` or a residual ``+=`` run after the module returns) and, on a
statistics step, registers a tensor hook on the output that receives ``G``. Tensor hooks fire with
the gradient of the output as it was produced, even when it is later modified in place, which is
why full backward hooks (which fail on in-place ops) are not used.

Norm layers need only ``Σ G`` per channel, which is exactly the bias gradient their backward
computes anyway; when the output comes straight from a norm kernel's autograd node, a post-hook
on that node reads this call's bias gradient instead, so ``G`` itself is never touched
(docs/performance.md, "Third round"). Everything else about counting is the same.

Gating: a call counts only when the collector is active (the optimizer turns it on for statistics
steps), the module is in training mode and grad is enabled. A forward that runs *inside* a
backward pass is an activation-checkpoint recomputation: it is skipped when the original forward
was counted (non-reentrant checkpointing) and counted when it was not (reentrant checkpointing,
whose first forward runs without grad), so each call is counted exactly once.

Statistics accumulate as ``(total, count)`` over every call and backward pass until
:meth:`StatisticsCollector.consume` hands them to the optimizer, which is how gradient
accumulation and modules called several times per forward are pooled.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_adafisher.layers import LayerHelper

__all__ = ["BoundLayer", "PendingStats", "StatisticsCollector"]

_NORM_KERNEL_NODE = re.compile(r"(BatchNorm|LayerNorm)\w*Backward\d*$")
"""Autograd nodes of the norm kernels (native, cuDNN, MIOpen), whose inputs are ``(x, w, b)``."""


def _bias_grad_slot(module: nn.Module, output: Tensor) -> tuple[Any, int] | None:
    """``(node, i)`` when ``output`` comes straight from a norm kernel's autograd node whose
    ``i``-th input is the module's trainable bias: the node's post-hook then receives this
    call's bias gradient. ``None`` otherwise (a custom ``forward``, a frozen bias, a Python
    ``autograd.Function`` such as ``SyncBatchNorm``'s, whose hook arguments are laid out by
    its ``forward`` signature)."""
    node, bias = output.grad_fn, getattr(module, "bias", None)
    if node is None or not isinstance(bias, Tensor) or not bias.requires_grad:
        return None
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        return None
    if not _NORM_KERNEL_NODE.search(type(node).__name__):
        return None
    for i, (next_node, _) in enumerate(node.next_functions):
        if getattr(next_node, "variable", None) is bias:
            return node, i
    return None


@dataclass(eq=False)
class BoundLayer:
    """A module whose parameters get Kronecker factors."""

    name: str
    module: nn.Module
    helper: LayerHelper
    params: dict[str, nn.Parameter]
    """Role (``"weight"``/``"bias"``) → trainable parameter in the optimizer."""

    @property
    def primary(self) -> nn.Parameter:
        """The parameter whose optimizer state holds the layer's factors."""
        return next(iter(self.params.values()))

    @property
    def sizes(self) -> tuple[int, int]:
        return self.helper.factor_sizes(self.module)


@dataclass
class PendingStats:
    """Pooled raw statistics of one layer: ``h = h_total / h_count`` (same for ``s``)."""

    h_total: Tensor | None = None
    h_count: float = 0.0
    s_total: Tensor | None = None
    s_count: float = 0.0

    def add_h(self, total: Tensor, count: float) -> None:
        self.h_total = total if self.h_total is None else self.h_total + total
        self.h_count += count

    def add_s(self, total: Tensor, count: float) -> None:
        self.s_total = total if self.s_total is None else self.s_total + total
        self.s_count += count

    @property
    def complete(self) -> bool:
        return self.h_count > 0 and self.s_count > 0


@dataclass(eq=False)
class StatisticsCollector:
    """Owns the hooks of a set of layers and the statistics they gather."""

    layers: list[BoundLayer]
    variant: str
    active: bool = True
    pending: dict[str, PendingStats] = field(default_factory=dict)
    timed: bool = False
    """Accumulate the host time spent computing statistics in :attr:`seconds` (diagnostics)."""
    seconds: float = 0.0
    _handles: list[RemovableHandle] = field(default_factory=list)
    _counted_forwards: dict[str, int] = field(default_factory=dict)

    def install(self) -> None:
        """Register one forward hook per layer (idempotent)."""
        if self._handles:
            return
        for layer in self.layers:
            hook = self._make_forward_hook(layer)
            self._handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        """Remove every hook this collector registered and drop pending statistics."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.discard()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def discard(self) -> None:
        """Forget statistics gathered since the last :meth:`consume` (e.g. a skipped AMP step)."""
        self.pending.clear()
        self._counted_forwards.clear()

    def consume(self) -> dict[str, PendingStats]:
        """Hand over the pooled statistics and start a new window."""
        pending = self.pending
        self.pending = {}
        self._counted_forwards.clear()
        return pending

    # ----------------------------------------------------------------------------------------

    def _make_forward_hook(self, layer: BoundLayer) -> Callable[..., None]:
        name, helper, variant = layer.name, layer.helper, self.variant

        def on_grad(g: Tensor) -> None:
            start = time.perf_counter() if self.timed else 0.0
            with torch.no_grad():  # cheaper than a dispatched .detach() (create_graph backward)
                total, count = helper.output_stats(layer.module, g, variant)
            self.pending.setdefault(name, PendingStats()).add_s(total, count)
            if self.timed:
                self.seconds += time.perf_counter() - start

        def on_bias_grad(slot: int, batch: int, grad_inputs: tuple[Tensor | None, ...]) -> None:
            grad_bias = grad_inputs[slot]
            if grad_bias is None:  # a backward that does not reach the bias (autograd.grad)
                return
            start = time.perf_counter() if self.timed else 0.0
            with torch.no_grad():
                total, count = helper.output_stats_from_bias_grad(layer.module, grad_bias, batch)
            self.pending.setdefault(name, PendingStats()).add_s(total, count)
            if self.timed:
                self.seconds += time.perf_counter() - start

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not (self.active and module.training and torch.is_grad_enabled()):
                return
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            if torch._C._current_graph_task_id() != -1:
                # Forward inside backward: an activation-checkpoint recomputation.
                if self._counted_forwards.get(name, 0) > 0:
                    self._counted_forwards[name] -= 1
                    return
            else:
                self._counted_forwards[name] = self._counted_forwards.get(name, 0) + 1
            start = time.perf_counter() if self.timed else 0.0
            x = args[0] if args else next(iter(kwargs.values()))
            with torch.no_grad():
                total, count = helper.input_stats(module, x, variant)
            self.pending.setdefault(name, PendingStats()).add_h(total, count)
            slot = _bias_grad_slot(module, output) if helper.s_from_bias_grad else None
            if slot is None:
                output.register_hook(on_grad)
            else:
                node, index = slot
                batch = output.shape[0] if output.dim() >= 2 else 1
                node.register_hook(
                    lambda grad_inputs, grad_outputs: on_bias_grad(index, batch, grad_inputs)
                )
            if self.timed:
                self.seconds += time.perf_counter() - start

        return hook
