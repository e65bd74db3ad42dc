"""Statistics hooks: install, gate, accumulate, hand over, remove.

For every bound layer a forward hook reads the input ``x`` (unchanged at that point: in-place ops
such as ``nn.ReLU(inplace=True)`` or a residual ``+=`` run after the module returns) and, on a
statistics step, registers a tensor hook on the output that receives ``G``. Tensor hooks fire with
the gradient of the output as it was produced, even when it is later modified in place, which is
why full backward hooks (which fail on in-place ops) are not used.

Norm layers need only ``Σ G`` per channel, which is exactly the bias gradient their backward
computes anyway; when the output comes straight from a norm kernel's autograd node, a post-hook
on that node reads this call's bias gradient instead, so ``G`` itself is never touched
(docs/performance.md). Everything else about counting is the same.

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
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_adafisher import compat
from lightning_adafisher import functional as fn
from lightning_adafisher.layers import LayerHelper

__all__ = ["BoundLayer", "PendingStats", "StatisticsCollector"]

_NORM_KERNEL_NODE = re.compile(r"(BatchNorm|LayerNorm)\w*Backward\d*$")
"""Autograd nodes of the norm kernels (native, cuDNN, MIOpen), whose inputs are ``(x, w, b)``."""


def _norm_kernel_node(output: Tensor) -> Any | None:
    """The autograd node of the norm kernel that produced ``output`` (C++ nodes only: a Python
    ``autograd.Function`` such as ``SyncBatchNorm``'s lays its hook arguments out by its own
    ``forward`` signature), or ``None`` (a custom ``forward``, an output changed after the kernel)."""
    node = output.grad_fn
    if node is None or isinstance(node, torch.autograd.function.BackwardCFunction):
        return None
    return node if _NORM_KERNEL_NODE.search(type(node).__name__) else None


def _bias_slot(node: Any, module: nn.Module) -> int | None:
    """Which input of ``node`` is the module's trainable bias: its post-hook then receives this
    call's bias gradient. ``None`` for a frozen or missing bias."""
    bias = getattr(module, "bias", None)
    if not isinstance(bias, Tensor) or not bias.requires_grad:
        return None
    for i, (next_node, _) in enumerate(node.next_functions):
        if getattr(next_node, "variable", None) is bias:
            return i
    return None


def _saved_mean(node: Any, expected_shape: tuple[int, ...]) -> Tensor | None:
    """The mean a norm kernel saved for backward (its second output), or ``None``.

    Not read while saved-tensor hooks are active (activation checkpointing, offloading): their
    unpack hook would run in the forward. A mean of an unexpected shape is not used either.
    """
    mean = compat.saved_norm_mean(node)
    return mean if mean is not None and tuple(mean.shape) == expected_shape else None


def _deferred_total(finish: Callable[[], Tensor]) -> Callable[[], Tensor]:
    def run() -> Tensor:
        with torch.no_grad():
            return finish()

    return run


def _deferred(function: Callable[..., tuple[Tensor, float]], *args: Any) -> Callable[[], Tensor]:
    """The total of ``function(*args)``, computed when first read."""
    return _deferred_total(lambda: function(*args)[0])


class NormPart(NamedTuple):
    """One norm-layer call's total, kept as data until the optimizer step, where every such part
    of a step is finished together (:func:`functional.finish_norm_statistics`): ``s`` from the
    call's bias gradient (``args = (grad_bias, batch)``) or ``h`` from the saved mean
    (``args = (mean, x_shape, per_mean)``)."""

    from_bias_grad: bool
    args: tuple[Any, ...]

    def finish(self) -> Tensor:
        """This part alone (the same ops as the batched form)."""
        with torch.no_grad():
            if self.from_bias_grad:
                return fn.norm_output_stats_from_bias_grad(*self.args)[0]
            return fn.norm_input_stats_from_mean(*self.args)[0]


def finish_norm_parts(pending: dict[str, PendingStats]) -> None:
    """Finish every :class:`NormPart` in ``pending`` together, per device and dtype."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[list[Part], int, NormPart]]] = {}
    for stats in pending.values():
        for parts in (stats._h, stats._s):
            for i, part in enumerate(parts):
                if isinstance(part, NormPart):
                    t = part.args[0]
                    groups.setdefault((t.device, fn.stats_dtype(t.dtype)), []).append((parts, i, part))
    with torch.no_grad():
        for items in groups.values():
            s, h = fn.finish_norm_statistics(
                [part.args for _, _, part in items if part.from_bias_grad],
                [part.args for _, _, part in items if not part.from_bias_grad],
            )
            s_iter, h_iter = iter(s), iter(h)
            for parts, i, part in items:
                parts[i] = next(s_iter) if part.from_bias_grad else next(h_iter)


@dataclass(eq=False)
class BoundLayer:
    """A module whose parameters get Kronecker factors."""

    name: str
    module: nn.Module
    helper: LayerHelper
    params: dict[str, nn.Parameter]
    """Role (``"weight"``/``"bias"``) → trainable parameter in the optimizer."""
    eigen_sides: tuple[bool, bool] | None = None
    """``variant="eigen"`` only: whether the input (``h``) and output (``s``) sides keep a full
    factor (a side above the size limit keeps the identity and gathers nothing)."""

    @property
    def primary(self) -> nn.Parameter:
        """The parameter whose optimizer state holds the layer's factors."""
        return next(iter(self.params.values()))

    @property
    def sizes(self) -> tuple[int, int]:
        """Entries of the raw ``h`` and ``s`` totals (``n²`` for a full factor, 0 for a side
        that keeps the identity)."""
        n_h, n_s = self.helper.factor_sizes(self.module)
        if self.eigen_sides is None:
            return n_h, n_s
        return (n_h * n_h if self.eigen_sides[0] else 0), (n_s * n_s if self.eigen_sides[1] else 0)


Part = Tensor | Callable[[], Tensor] | NormPart
"""One call's total, or what computes it later (finished at the optimizer step)."""


class PendingStats:
    """Pooled raw statistics of one layer: ``h = h_total / h_count`` (same for ``s``).

    A hook may add a *deferred* total (a zero-argument function): the small finishing ops of a
    norm layer's or a conv's statistic then run back to back at the optimizer step instead of
    one by one inside the hooks, where every op costs tens of µs on CPU because its code is cold
    after the layer's own kernel (docs/performance.md). Totals are resolved, and
    summed, on first read of :attr:`h_total`/:attr:`s_total`.
    """

    __slots__ = ("_h", "h_count", "_s", "s_count")

    def __init__(
        self, h_total: Tensor | None = None, h_count: float = 0.0,
        s_total: Tensor | None = None, s_count: float = 0.0,
    ) -> None:
        self._h: list[Part] = [] if h_total is None else [h_total]
        self._s: list[Part] = [] if s_total is None else [s_total]
        self.h_count, self.s_count = h_count, s_count

    def __repr__(self) -> str:
        return f"PendingStats(h_count={self.h_count}, s_count={self.s_count})"

    def add_h(self, total: Part, count: float) -> None:
        self._h.append(total)
        self.h_count += count

    def add_s(self, total: Part, count: float) -> None:
        self._s.append(total)
        self.s_count += count

    @staticmethod
    def _resolve(parts: list[Part]) -> Tensor | None:
        if not parts:
            return None
        if len(parts) > 1 or not isinstance(parts[0], Tensor):
            values = [
                part.finish() if isinstance(part, NormPart) else part() if callable(part) else part
                for part in parts
            ]
            total = values[0]
            for value in values[1:]:
                total = total + value
            parts[:] = [total]
        return parts[0]  # type: ignore[return-value]

    @property
    def h_total(self) -> Tensor | None:
        return self._resolve(self._h)

    @h_total.setter
    def h_total(self, value: Tensor) -> None:
        self._h = [value]

    @property
    def s_total(self) -> Tensor | None:
        return self._resolve(self._s)

    @s_total.setter
    def s_total(self, value: Tensor) -> None:
        self._s = [value]

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
        finish_norm_parts(pending)
        return pending

    # ----------------------------------------------------------------------------------------

    def _make_forward_hook(self, layer: BoundLayer) -> Callable[..., None]:
        name, helper, variant = layer.name, layer.helper, self.variant
        builtin_bias_grad = helper.s_from_bias_grad_batched

        sides = layer.eigen_sides

        def on_grad(g: Tensor) -> None:
            start = time.perf_counter() if self.timed else 0.0
            with torch.no_grad():  # cheaper than a dispatched .detach() (create_graph backward)
                if sides is None:
                    total, count = helper.output_stats(layer.module, g, variant)
                elif sides[1]:
                    total, count = helper.output_cov(layer.module, g)
                else:
                    total, count = g.new_zeros(0, dtype=fn.stats_dtype(g.dtype)), 1.0
            self.pending.setdefault(name, PendingStats()).add_s(total, count)
            if self.timed:
                self.seconds += time.perf_counter() - start

        def on_bias_grad(slot: int, batch: int, grad_inputs: tuple[Tensor | None, ...]) -> None:
            grad_bias = grad_inputs[slot]
            if grad_bias is None:  # a backward that does not reach the bias (autograd.grad)
                return
            # Finished at the optimizer step. Holding the gradient is safe: autograd hands it to
            # AccumulateGrad, which copies it (it steals a gradient only if nobody else holds
            # it), and hooks must not modify their argument in place (torch's hook contract).
            if builtin_bias_grad:
                total: Part = NormPart(True, (grad_bias, batch))
            else:
                total = _deferred(helper.output_stats_from_bias_grad, layer.module, grad_bias, batch)
            self.pending.setdefault(name, PendingStats()).add_s(total, 1.0)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not (self.active and module.training and torch.is_grad_enabled()):
                return
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            if compat.in_backward():
                # Forward inside backward: an activation-checkpoint recomputation.
                if self._counted_forwards.get(name, 0) > 0:
                    self._counted_forwards[name] -= 1
                    return
            else:
                self._counted_forwards[name] = self._counted_forwards.get(name, 0) + 1
            start = time.perf_counter() if self.timed else 0.0
            x = args[0] if args else next(iter(kwargs.values()))
            if sides is not None:
                # Full factors (variant="eigen"): no norm-kernel shortcuts apply.
                with torch.no_grad():
                    if sides[0]:
                        total, count = helper.input_cov(module, x)
                    else:
                        total, count = x.new_zeros(0, dtype=fn.stats_dtype(output.dtype)), 1.0
                self.pending.setdefault(name, PendingStats()).add_h(total, count)
                output.register_hook(on_grad)
                if self.timed:
                    self.seconds += time.perf_counter() - start
                return
            node = _norm_kernel_node(output) if helper.s_from_bias_grad or helper.h_from_saved_mean else None
            pending = self.pending.setdefault(name, PendingStats())
            shape = tuple(x.shape)
            layout = helper.saved_mean_layout(module, shape) if node is not None and helper.h_from_saved_mean else None
            mean = None if layout is None else _saved_mean(node, layout[0])
            if mean is not None:
                pending.add_h(NormPart(False, (mean, shape, layout[1])), 1.0)
            else:
                with torch.no_grad():
                    total, count = helper.input_stats_in_hook(module, x, variant)
                if callable(total):
                    total = _deferred_total(total)
                pending.add_h(total, count)
            slot = _bias_slot(node, module) if node is not None and helper.s_from_bias_grad else None
            if slot is None:
                output.register_hook(on_grad)
            else:
                batch = output.shape[0] if output.dim() >= 2 else 1
                node.register_hook(
                    lambda grad_inputs, grad_outputs: on_bias_grad(slot, batch, grad_inputs)
                )
            if self.timed:
                self.seconds += time.perf_counter() - start

        return hook
