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

Reading order: :meth:`StatisticsCollector._make_forward_hook` gates a call and hands it to one
route per kind of layer (``_tensor_route``, ``_norm_kernel_route``, ``_eigen_route``); a route
appends each call's ``h`` and ``s`` to the layer's :class:`Window` as a tensor, a function that
finishes it, or a part of a :data:`BATCHED` kind (finished with every layer's at the step).
Calls pool over every forward and backward pass (gradient
accumulation, modules called several times) until :meth:`StatisticsCollector.consume`, where
:func:`resolve`, the one place deferred work runs, turns each window into a
:class:`LayerStats` of ``(total, count)``.
"""

from __future__ import annotations

import functools
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

__all__ = ["BoundLayer", "LayerStats", "PendingStats", "StatisticsCollector", "resolve"]

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


class NormPart(NamedTuple):
    """One norm-layer call's total, kept as data until :func:`resolve`, which finishes every
    such part of a step in one batch (:func:`functional.finish_norm_statistics`): ``s`` from
    the call's bias gradient (``args = (grad_bias, batch)``) or ``h`` from the saved mean
    (``args = (mean, x_shape, per_mean)``)."""

    from_bias_grad: bool
    args: tuple[Any, ...]

    def group(self) -> tuple[Any, ...]:
        t = self.args[0]
        return (t.device, fn.stats_dtype(t.dtype))

    @staticmethod
    def finish(parts: list[NormPart]) -> list[Tensor]:
        s, h = fn.finish_norm_statistics(
            [part.args for part in parts if part.from_bias_grad],
            [part.args for part in parts if not part.from_bias_grad],
        )
        s_iter, h_iter = iter(s), iter(h)
        return [next(s_iter) if part.from_bias_grad else next(h_iter) for part in parts]


BATCHED = (NormPart, fn.WithEntry, fn.ColumnSum, fn.WindowSums)
"""Parts left as data, finished by :func:`resolve` with every part of their kind and
``group()`` in one batch (``finish``): a handful of kernels per step instead of some per call."""

Part = Tensor | Callable[[], Tensor] | NormPart | fn.WithEntry | fn.ColumnSum | fn.WindowSums
"""One call's total: a tensor, a function that finishes it, or a part of a :data:`BATCHED`
kind (see :func:`resolve`)."""


class LayerStats(NamedTuple):
    """One layer's statistics pooled over a window: ``h = h_total / h_count`` (same for ``s``).

    Counts are Python floats from the collector; after a data-parallel reducer they are 0-dim
    device tensors (pooled over the ranks, never read back to the host)."""

    h_total: Tensor | None
    h_count: float | Tensor
    s_total: Tensor | None
    s_count: float | Tensor

    @property
    def complete(self) -> bool:
        """Both sides counted (host counts only: on device counts this would read them back)."""
        return self.h_count > 0 and self.s_count > 0


PendingStats = LayerStats
"""The name the optimizer, the reducers and the callbacks use for a layer's pooled statistics."""


@dataclass(eq=False)
class Window:
    """One layer's calls since the last :meth:`StatisticsCollector.consume`, unresolved."""

    h: list[Part] = field(default_factory=list)
    h_count: float = 0.0
    s: list[Part] = field(default_factory=list)
    s_count: float = 0.0

    def add_h(self, part: Part, count: float) -> None:
        self.h.append(part)
        self.h_count += count

    def add_s(self, part: Part, count: float) -> None:
        self.s.append(part)
        self.s_count += count


def resolve(windows: dict[str, Window]) -> dict[str, LayerStats]:
    """Turn every layer's window into ``(total, count)`` tensors: the one place where deferred
    work runs. The parts of each :data:`BATCHED` kind (norm parts, ones-column entries, sums
    over the batch, conv window sums) of all layers are finished together, per group (device,
    dtype, ...): a handful of kernels for the whole model instead of a few per call. The
    functions a hook left run back to back; a layer's calls are summed in call order."""
    # Each side's parts are copied into a list whose batched entries are overwritten in place
    # by their finished totals: no per-part keys to build and look up.
    sides: list[tuple[str, Window, list[Any], list[Any]]] = []
    groups: dict[tuple[Any, ...], tuple[list[list[Any]], list[int], list[Any]]] = {}
    for name, window in windows.items():
        h, s = list(window.h), list(window.s)
        sides.append((name, window, h, s))
        for values in (h, s):
            for i, part in enumerate(values):
                if isinstance(part, BATCHED):
                    key = (type(part), *part.group())
                    group = groups.get(key)
                    if group is None:
                        group = groups[key] = ([], [], [])
                    group[0].append(values)
                    group[1].append(i)
                    group[2].append(part)
    with torch.no_grad():
        for (kind, *_), (owners, slots, parts) in groups.items():
            for values, i, total in zip(owners, slots, kind.finish(parts)):
                values[i] = total
        out: dict[str, LayerStats] = {}
        for name, window, h, s in sides:
            out[name] = LayerStats(_sum_parts(h), window.h_count, _sum_parts(s), window.s_count)
    return out


def _sum_parts(values: list[Any]) -> Tensor | None:
    """A layer side's calls summed in call order (batched parts already finished)."""
    total: Tensor | None = None
    for value in values:
        if callable(value):
            value = value()  # a function a hook left
        total = value if total is None else total + value
    return total


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

    @functools.cached_property
    def primary(self) -> nn.Parameter:
        """The parameter whose optimizer state holds the layer's factors (read on every step:
        found once; :attr:`params` is fixed once the layer is bound)."""
        return next(iter(self.params.values()))

    @property
    def sizes(self) -> tuple[int, int]:
        """Entries of the raw ``h`` and ``s`` totals (``n²`` for a full factor, 0 for a side
        that keeps the identity)."""
        n_h, n_s = self.helper.factor_sizes(self.module)
        if self.eigen_sides is None:
            return n_h, n_s
        return (n_h * n_h if self.eigen_sides[0] else 0), (n_s * n_s if self.eigen_sides[1] else 0)


@dataclass(eq=False)
class StatisticsCollector:
    """Owns the hooks of a set of layers and the statistics they gather."""

    layers: list[BoundLayer]
    variant: str
    active: bool = True
    pending: dict[str, Window] = field(default_factory=dict)
    """Per layer name, the calls gathered since the last :meth:`consume` (read-only outside)."""
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

    def peek(self) -> dict[str, LayerStats]:
        """The statistics gathered so far, resolved, without starting a new window."""
        return resolve(self.pending)

    def consume(self) -> dict[str, LayerStats]:
        """Hand over the pooled statistics and start a new window."""
        windows = self.pending
        self.pending = {}
        self._counted_forwards.clear()
        return resolve(windows)

    # ----------------------------------------------------------------------------------------

    def _window(self, name: str) -> Window:
        window = self.pending.get(name)
        if window is None:  # not setdefault: that would build a Window on every call
            window = self.pending[name] = Window()
        return window

    def _counts(self, name: str) -> bool:
        """Whether this call counts: a forward inside backward is an activation-checkpoint
        recomputation, skipped when the original forward was counted."""
        if compat.in_backward():
            if self._counted_forwards.get(name, 0) > 0:
                self._counted_forwards[name] -= 1
                return False
        else:
            self._counted_forwards[name] = self._counted_forwards.get(name, 0) + 1
        return True

    def _make_forward_hook(self, layer: BoundLayer) -> Callable[..., None]:
        route = (
            self._eigen_route if layer.eigen_sides is not None
            else self._norm_kernel_route if layer.helper.s_from_bias_grad or layer.helper.h_from_saved_mean
            else self._tensor_route
        )

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not (self.active and module.training and torch.is_grad_enabled()):
                return
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            if not self._counts(layer.name):
                return
            start = time.perf_counter() if self.timed else 0.0
            route(layer, args[0] if args else next(iter(kwargs.values())), output)
            if self.timed:
                self.seconds += time.perf_counter() - start

        return hook

    def _on_grad(self, layer: BoundLayer, g: Tensor) -> None:
        """``s`` from the output gradient ``G`` (a tensor hook on the output)."""
        start = time.perf_counter() if self.timed else 0.0
        sides = layer.eigen_sides
        with torch.no_grad():  # cheaper than a dispatched .detach() (create_graph backward)
            if sides is None:
                total, count = layer.helper.output_stats_in_hook(layer.module, g, self.variant)
            elif sides[1]:
                total, count = layer.helper.output_cov(layer.module, g)
            else:
                total, count = g.new_zeros(0, dtype=fn.stats_dtype(g.dtype)), 1.0
        self._window(layer.name).add_s(total, count)
        if self.timed:
            self.seconds += time.perf_counter() - start

    def _eigen_route(self, layer: BoundLayer, x: Tensor, output: Tensor) -> None:
        """Full factors (``variant="eigen"``): ``x xᵀ`` now, ``G Gᵀ`` in the tensor hook."""
        assert layer.eigen_sides is not None
        with torch.no_grad():
            if layer.eigen_sides[0]:
                total, count = layer.helper.input_cov(layer.module, x)
            else:
                total, count = x.new_zeros(0, dtype=fn.stats_dtype(output.dtype)), 1.0
        self._window(layer.name).add_h(total, count)
        output.register_hook(functools.partial(self._on_grad, layer))

    def _tensor_route(self, layer: BoundLayer, x: Tensor, output: Tensor) -> None:
        """Diagonal statistics from ``x`` now (its small finishing ops may be left to
        :func:`resolve`) and from ``G`` in a tensor hook on the output."""
        with torch.no_grad():
            total, count = layer.helper.input_stats_in_hook(layer.module, x, self.variant)
        self._window(layer.name).add_h(total, count)
        output.register_hook(functools.partial(self._on_grad, layer))

    def _norm_kernel_route(self, layer: BoundLayer, x: Tensor, output: Tensor) -> None:
        """A norm layer whose output comes from its kernel: ``h`` from the mean the kernel saved
        and ``s`` from the bias gradient its backward computes, both finished in one batch by
        :func:`resolve`; each falls back to the :meth:`_tensor_route` pass when unavailable."""
        helper, module = layer.helper, layer.module
        node = _norm_kernel_node(output)
        shape = tuple(x.shape)
        layout = helper.saved_mean_layout(module, shape) if node is not None and helper.h_from_saved_mean else None
        mean = None if layout is None else _saved_mean(node, layout[0])
        if mean is not None:
            self._window(layer.name).add_h(NormPart(False, (mean, shape, layout[1])), 1.0)
        else:
            with torch.no_grad():
                total, count = helper.input_stats_in_hook(module, x, self.variant)
            self._window(layer.name).add_h(total, count)
        slot = _bias_slot(node, module) if node is not None and helper.s_from_bias_grad else None
        if slot is None:
            output.register_hook(functools.partial(self._on_grad, layer))
        else:
            batch = output.shape[0] if output.dim() >= 2 else 1
            node.register_hook(lambda grad_inputs, _: self._on_bias_grad(layer, slot, batch, grad_inputs))

    def _on_bias_grad(self, layer: BoundLayer, slot: int, batch: int, grad_inputs: tuple[Tensor | None, ...]) -> None:
        """``s`` from this call's bias gradient (a post-hook on the norm kernel's node), kept
        for :func:`resolve`. Holding the gradient is safe: autograd hands it to AccumulateGrad,
        which copies it (it steals a gradient only if nobody else holds it), and hooks must not
        modify their argument in place (torch's hook contract)."""
        grad_bias = grad_inputs[slot]
        if grad_bias is None:  # a backward that does not reach the bias (autograd.grad)
            return
        helper = layer.helper
        if helper.s_from_bias_grad_batched:
            part: Part = NormPart(True, (grad_bias, batch))
        else:
            part = lambda: helper.output_stats_from_bias_grad(layer.module, grad_bias, batch)[0]  # noqa: E731
        self._window(layer.name).add_s(part, 1.0)
