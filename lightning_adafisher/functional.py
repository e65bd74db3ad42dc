"""Pure tensor math of AdaFisher: per-layer statistics, folding, Fisher assembly, the update.

Nothing here installs hooks, talks to other processes or knows about Lightning; every function
takes tensors and returns tensors. Imports torch, and :mod:`~lightning_adafisher.compat` (torch
only) for the private torch APIs it uses. The numerics are documented in ``docs/numerics.md``.

Shape conventions
-----------------
* ``x``: a module's forward input. Linear: ``[..., d_in]``; Conv2d: ``[B, C_in, H, W]``;
  norms: ``[B, C, ...]`` (BatchNorm) or ``[B, ..., D]`` (LayerNorm).
* ``g``: the gradient of the loss w.r.t. the module's output, same layout as the output.
* Raw statistics come back as ``(total, count)`` pairs: the statistic of a call is
  ``total / count``. Keeping the pair lets several calls (a module used twice in one forward,
  several micro-batches, several ranks) be pooled exactly by adding totals and counts.
* Factor vectors ``H`` (input side) and ``S`` (output side) are 1-D. For a weight of shape
  ``[out, in...]`` the Fisher diagonal is ``F[o, i] = S'[o]·H'[i] + λ`` with ``i`` the flattened
  trailing dims in the weight's memory order; a bias uses ``H'[-1]``. Norm layers have a
  two-entry ``H``: ``[weight entry, bias entry]``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_adafisher import compat

__all__ = [
    "stats_dtype",
    "linear_input_stats",
    "linear_output_stats",
    "WithEntry",
    "append_entries",
    "ColumnSum",
    "sum_columns",
    "WindowSums",
    "window_sums",
    "conv2d_padding",
    "conv2d_input_stats",
    "conv2d_output_stats",
    "batchnorm_input_stats",
    "batchnorm_output_stats",
    "layernorm_input_stats",
    "layernorm_output_stats",
    "norm_output_stats_from_bias_grad",
    "norm_input_stats_from_mean",
    "Segments",
    "min_max",
    "flush_subnormal_",
    "normalised",
    "unfoldable",
    "foldable",
    "statistics_ok",
    "fold_paper",
    "fold_reference",
    "adafisher_update",
    "KronFactors",
]

REFERENCE_MM_EPS = 1e-6
"""The ``ε`` of the released code's min-max normalisation (reference variant only)."""


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in at least float32 (bf16/fp16 activations under AMP)."""
    return torch.promote_types(dtype, torch.float32)


_STATS_DTYPES = (torch.float32, torch.float64)


def _as_stats(t: Tensor) -> Tensor:
    # Checked in Python: every dispatched op, even a no-op ``.to``, costs tens of µs inside a
    # hook on CPU, where the op's code is cold after the layer's own kernel (performance.md).
    return t if t.dtype in _STATS_DTYPES else t.to(stats_dtype(t.dtype))


# --------------------------------------------------------------------------------------------
# Sums of squares
# --------------------------------------------------------------------------------------------


NO_TEMPORARY_MIN = 1 << 20
"""From this many elements on (4 MiB in float32), on CPU, a conv's ``Σ_b x²`` and ``Σ G²`` are
taken without a temporary as large as the tensor. glibc serves such a block with ``mmap`` and
returns it to the kernel when it is freed, so every ``square()`` of a large activation pays for
fresh, page-faulted memory; below this size the one-kernel ``square().sum()`` is as fast
(docs/performance.md#no-tensor-sized-temporaries-for-large-sums-of-squares)."""

_DOT_MIN_SPATIAL = 256
"""On CPU, the least ``H·W`` for which a conv's ``Σ G²`` is taken as batched dot products
(smaller maps: many tiny dots, slower there than a square and a sum; on CUDA the one ``bmm``
kernel is taken whatever the size)."""


def _autocast_off() -> contextlib.AbstractContextManager[Any]:
    """Where the statistics' matmuls run: autocast off, so that a hook called inside an autocast
    region (a forward, or a ``backward()`` called in it) or a ``step()`` called in one keeps the
    statistics in float32/64 instead of autocast's bf16/fp16 (which also overflow: fp16 sums of
    squares pass 65504 easily). Nothing to enter, the usual case, costs two flag reads."""
    devices = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    if not devices:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for device in devices:
        stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def _without_temporary(t: Tensor) -> bool:
    return t.numel() >= NO_TEMPORARY_MIN and t.device.type == "cpu" and t.is_contiguous()


def _on_cpu(t: Tensor) -> bool:
    """Whether CPU-only tuning applies to ``t`` (``bench.ops.cuda_code_path`` turns it off)."""
    return t.device.type == "cpu"


_recent_square_sums: list[tuple[Any, int, bool, Tensor]] = []
"""``(weakref to x, x's version, over rows, Σ x²)`` of the last few :func:`_square_sum` calls
with ``reuse``, newest last."""

_RECENT_SQUARE_SUMS = 4
"""How many are kept: a ResNet block's shortcut reads its input after two other convs and the
q/k/v projections of a transformer block are called back to back."""


def _square_sum(x: Tensor, rows: bool, reuse: bool) -> Tensor:
    """``Σ x²`` over dim 0 of ``x`` (``rows``: over every dim but the last, as ``[N, d]``).

    With ``reuse`` (the hooks' path) the result is remembered, and returned again when a later
    call gets the same tensor object, unmodified since (its version counter unchanged): layers
    that read one input — a ResNet block's first conv and its downsampling shortcut, separate
    q/k/v projections — then pay for one pass over it instead of one each. The value returned
    may be shared by several callers, which must not modify it in place.
    """
    version = compat.tensor_version(x) if reuse else None
    if version is not None:  # unknown version: no reuse (x may have been modified)
        for ref, seen, over_rows, total in _recent_square_sums:
            if ref() is x and seen == version and over_rows == rows:
                return total
    t = _as_stats(x)
    if not rows and _without_temporary(t):
        # Σ_b x[b]² one sample at a time: the accumulator stays in cache, no x-sized temporary.
        total = torch.mul(t[0], t[0])
        for b in range(1, t.shape[0]):
            total.addcmul_(t[b], t[b])
    else:
        total = (t.reshape(-1, t.shape[-1]) if rows else t).square().sum(0)
    if version is not None:
        if len(_recent_square_sums) >= _RECENT_SQUARE_SUMS:
            del _recent_square_sums[0]
        _recent_square_sums.append((weakref.ref(x), version, rows, total))
    return total


# --------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------


def linear_input_stats(
    x: Tensor, bias: bool, reuse: bool = False, deferred: bool = False
) -> tuple[Tensor | WithEntry, float]:
    """Sum over rows of ``x̄²`` (``x`` flattened to ``[N, d_in]``, ones column if ``bias``);
    ``reuse``: see :func:`_square_sum`. With ``deferred`` the ones column's entry is left to
    :func:`append_entries` (a :class:`WithEntry`)."""
    n = math.prod(x.shape[:-1])
    # x.square().sum(0) is far faster on CPU than einsum or vector_norm.
    total = _square_sum(x, rows=True, reuse=reuse)
    if bias:
        return (WithEntry(total, float(n)) if deferred else F.pad(total, (0, 1), value=float(n))), float(n)
    return total, float(n)


class WithEntry(NamedTuple):
    """A total still missing its last entry, the ones column's (the row count): such totals of
    many layers are finished together by :func:`append_entries`."""

    total: Tensor
    entry: float

    def group(self) -> tuple[Any, ...]:
        return (self.total.device, self.total.dtype)

    @staticmethod
    def finish(parts: Sequence[WithEntry]) -> list[Tensor]:
        return append_entries(parts)


@functools.lru_cache(maxsize=256)
def _entry(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((1,), value, dtype=dtype).to(device)


def append_entries(parts: Sequence[WithEntry]) -> list[Tensor]:
    """Each ``total`` with its ``entry`` appended (all of one device and dtype), as one
    concatenation for all of them instead of one pad each: views of one vector, in order."""
    like = parts[0].total
    pieces = [piece for part in parts for piece in (part.total, _cached(_entry, part.entry, like.dtype, like.device))]
    return list(torch.cat(pieces).split_with_sizes([part.total.numel() + 1 for part in parts]))


def linear_output_stats(g: Tensor) -> tuple[Tensor, float]:
    """Sum over rows of ``G²`` with ``G`` flattened to ``[N, d_out]``."""
    rows = _as_stats(g).reshape(-1, g.shape[-1])
    return rows.square().sum(0), float(rows.shape[0])


# --------------------------------------------------------------------------------------------
# Conv2d
# --------------------------------------------------------------------------------------------


def conv2d_padding(
    padding: str | Sequence[int], kernel_size: Sequence[int], dilation: Sequence[int]
) -> tuple[int, int, int, int]:
    """Padding as ``(left, right, top, bottom)`` for ``F.pad``, resolving ``'same'``/``'valid'``."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            pads: list[int] = []
            for k, d in zip(reversed(tuple(kernel_size)), reversed(tuple(dilation))):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return (pads[0], pads[1], pads[2], pads[3])
        raise ValueError(f"Invalid conv padding: {padding!r}")
    ph, pw = padding
    return (pw, pw, ph, ph)


def _cached(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` from its ``lru_cache``; while ``torch.compile`` traces (a compiled
    model runs the hooks inside its graph), the uncached function: Dynamo cannot trace the
    cache, warns about it and traces the wrapped function anyway, and the constants it builds
    become part of the compiled graph."""
    if torch.compiler.is_compiling():
        return function.__wrapped__(*args)
    return function(*args)


@functools.lru_cache(maxsize=512)
def _window_selector(
    n: int, k: int, positions: int, stride: int, dilation: int, before: int,
    dtype: torch.dtype, device: torch.device,
) -> Tensor:
    """0/1 matrix ``A[i, y]`` = 1 where input coordinate ``y`` (of ``n``) is read by kernel
    offset ``i`` at one of the ``positions`` output positions (``before``: zero padding)."""
    i = torch.arange(k).unsqueeze(1)
    y = i * dilation + torch.arange(positions).unsqueeze(0) * stride - before
    valid = (y >= 0) & (y < n)
    a = torch.zeros(k, n, dtype=dtype)
    a[i.expand_as(y)[valid], y[valid]] = 1.0
    return a.to(device)


_WINDOW_KERNEL_MAX = 1 << 18
"""Largest ``H·W·kh·kw`` whose one-matmul window kernel is cached (1 MiB of float32)."""


@functools.lru_cache(maxsize=256)
def _window_kernel(
    rows_key: tuple[int, ...], cols_key: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``K[(y, x), (i, j)] = A[i, y]·B[j, x]``: ``xs.view(C, H·W) @ K`` is ``A · xs · Bᵀ``."""
    rows_sel = _cached(_window_selector, *rows_key, dtype, torch.device("cpu"))
    cols_sel = _cached(_window_selector, *cols_key, dtype, torch.device("cpu"))
    return torch.kron(rows_sel, cols_sel).T.contiguous().to(device)


def _channel_sum(t: Tensor) -> Tensor:
    """Sum of ``[B, C, ...]`` over every dim but 1. For small spatial sizes summing the batch
    first is 2–3× faster on CPU than one reduction over the outer and inner dims."""
    spatial = math.prod(t.shape[2:])
    if 1 < spatial <= 16:
        return t.sum(0).reshape(t.shape[1], spatial).sum(1)
    return t.sum([0, *range(2, t.dim())])


@functools.lru_cache(maxsize=256)
def _norm_input_constants(
    channels: int, batch: int, scale: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(k, base)`` with ``h = base + q·k = [q·scale, C / B²]`` (one fused kernel per call
    instead of five); ``q`` is the sum of squares the caller computed."""
    k = torch.tensor([scale, 0.0], dtype=dtype)
    base = torch.tensor([0.0, float(channels) / float(batch) ** 2], dtype=dtype)
    return k.to(device), base.to(device)


def conv2d_input_stats(
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    padding: tuple[int, int, int, int],
    padding_mode: str,
    groups: int,
    bias: bool,
    reference_normaliser: bool = False,
    deferred: bool = False,
    reuse: bool = False,
) -> tuple[Tensor | Callable[[], Tensor], float]:
    """Diagonal of the im2col second moment, without building im2col (docs/numerics.md).

    ``h[c, i, j] = Σ_b Σ_positions x_pad[b, c, p_h·s_h + i·d_h, p_w·s_w + j·d_w]²``: square and
    sum the input over the batch (and over groups, whose patches are stacked as rows); padding
    is an index mapping, so it commutes with squaring and summing. The window sums are
    separable: with ``A[i, y] = 1`` where row ``y`` is read by kernel row ``i`` at some output
    position (and ``B`` likewise for columns), ``h[c] = A · Σ_b x[b, c]² · Bᵀ`` — two thin
    matmuls over the batch-summed ``x²``, ~10× faster on CPU than the equivalent conv with a
    ones kernel (docs/performance.md). Zero padding is folded into ``A``/``B`` (padded
    entries are zero); other padding modes pad the summed ``x²`` first.

    Returns the total over rows (ones column last if ``bias``) and the count: the number of rows
    ``B·L·groups``, or with ``reference_normaliser`` the released code's ``B·L·(C_in/groups)·kh·kw``.
    With ``deferred`` the pass over ``x`` is made now and the total is returned as a function
    that finishes it (the window sums: a few small ops, run later at the optimizer step), as long
    as the batch-summed ``x²`` it keeps has at most ``DEFER_MAX`` entries. ``reuse``: see
    :func:`_square_sum`.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    b, c_in, _, _ = x.shape
    c_group = c_in // groups
    kh, kw = kernel_size
    (sh, sw), (dh, dw) = stride, dilation
    xs = _square_sum(x, rows=False, reuse=reuse)
    if groups > 1:
        xs = xs.view(groups, c_group, *xs.shape[1:]).sum(0)
    left, right, top, bottom = padding
    if any(padding) and padding_mode != "zeros":
        xs = F.pad(xs, padding, mode=padding_mode)
        left = right = top = bottom = 0
    h, w = xs.shape[-2:]
    lh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    lw = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    rows_key = (h, kh, lh, sh, dh, top)
    cols_key = (w, kw, lw, sw, dw, left)
    rows = b * lh * lw * groups
    count = float(b * lh * lw * c_group * kh * kw) if reference_normaliser else float(rows)

    def window_sums() -> Tensor:
        with _autocast_off():
            if h * w * kh * kw <= _WINDOW_KERNEL_MAX:
                # One matmul with the Kronecker product of the selectors (cached): fewer kernels.
                kernel = _cached(_window_kernel, rows_key, cols_key, xs.dtype, xs.device)
                total = torch.mm(xs.reshape(xs.shape[0], h * w), kernel).reshape(-1)
            else:
                rows_sel = _cached(_window_selector, *rows_key, xs.dtype, xs.device)
                cols_sel = _cached(_window_selector, *cols_key, xs.dtype, xs.device)
                total = torch.matmul(rows_sel, torch.matmul(xs, cols_sel.T)).reshape(-1)
        return F.pad(total, (0, 1), value=float(rows)) if bias else total

    if deferred and xs.numel() <= DEFER_MAX:
        if h * w * kh * kw <= _WINDOW_KERNEL_MAX:
            entry = float(rows) if bias else None
            return WindowSums(xs.reshape(xs.shape[0], h * w), rows_key, cols_key, entry), count
        return window_sums, count
    return window_sums(), count


DEFER_MAX = 1 << 18
"""Largest batch-summed ``x²`` (entries) a deferred conv statistic keeps until the step."""


class WindowSums(NamedTuple):
    """A conv's batch-summed ``x²`` (``[C, H·W]``) whose window sums — one matmul with the
    cached window kernel, then the ones column's entry if the conv has a bias — are still to be
    taken: :func:`window_sums` takes those of every conv of one window kernel in one matmul.
    Calling it takes its own."""

    xs: Tensor
    rows_key: tuple[int, ...]
    cols_key: tuple[int, ...]
    entry: float | None

    def __call__(self) -> Tensor:
        return window_sums([self])[0]

    def group(self) -> tuple[Any, ...]:
        return (self.xs.device, self.xs.dtype, self.rows_key, self.cols_key)

    @staticmethod
    def finish(parts: Sequence[WindowSums]) -> list[Tensor]:
        return window_sums(parts)


def window_sums(parts: Sequence[WindowSums]) -> list[Tensor]:
    """Each part's conv ``h`` total (all of one device, dtype and window kernel): the parts'
    ``x²`` stacked and multiplied by the kernel once."""
    first = parts[0]
    kernel = _cached(_window_kernel, first.rows_key, first.cols_key, first.xs.dtype, first.xs.device)
    xs = first.xs if len(parts) == 1 else torch.cat([part.xs for part in parts])
    with _autocast_off():
        sums = torch.mm(xs, kernel)
    totals = [t.reshape(-1) for t in sums.split_with_sizes([part.xs.shape[0] for part in parts])]
    return [
        total if part.entry is None else F.pad(total, (0, 1), value=part.entry)
        for total, part in zip(totals, parts)
    ]


def conv2d_output_stats(g: Tensor, deferred: bool = False) -> tuple[Tensor | ColumnSum, float]:
    """Sum over (batch, output positions) of ``G²`` per output channel.

    With ``deferred`` (the hooks' path) the per-sample sums are returned as a
    :class:`ColumnSum`, whose sum over the batch :func:`sum_columns` takes at the step together
    with every other layer's: one kernel in the hook instead of two or three (on CPU, for maps
    of at least :data:`_DOT_MIN_SPATIAL` positions)."""
    if g.dim() == 3:
        g = g.unsqueeze(0)
    g = _as_stats(g)
    b, c, h, w = g.shape
    count = float(b * h * w)
    small_on_cpu = h * w < _DOT_MIN_SPATIAL and _on_cpu(g)
    if not small_on_cpu and ((deferred and g.is_contiguous()) or _without_temporary(g)):
        # one dot product per (sample, channel) of G with itself: a read of G, no temporary
        rows = g.view(b * c, 1, h * w)
        with _autocast_off():
            dots = torch.bmm(rows, rows.transpose(1, 2)).view(b, c)
        return (ColumnSum(dots) if deferred else dots.sum(0)), count
    return _channel_sum(g.square()), count


class ColumnSum(NamedTuple):
    """A total still to be summed over the first dim of ``rows`` (``[B, n]``): such totals of
    many layers are summed together by :func:`sum_columns`."""

    rows: Tensor

    def group(self) -> tuple[Any, ...]:
        return (self.rows.device, self.rows.dtype, self.rows.shape[0])

    @staticmethod
    def finish(parts: Sequence[ColumnSum]) -> list[Tensor]:
        return sum_columns(parts)


def sum_columns(parts: Sequence[ColumnSum]) -> list[Tensor]:
    """Each part's ``rows.sum(0)`` (all of one device, dtype and first dim): side by side,
    one concatenation and one sum for all of them."""
    if len(parts) == 1:
        return [parts[0].rows.sum(0)]
    summed = torch.cat([part.rows for part in parts], 1).sum(0)
    return list(summed.split_with_sizes([part.rows.shape[1] for part in parts]))


# --------------------------------------------------------------------------------------------
# Normalisation layers (Proposition 3.1 of the paper; docs/numerics.md#raw-statistics-of-one-call)
# --------------------------------------------------------------------------------------------


def batchnorm_input_stats(x: Tensor) -> tuple[Tensor, float]:
    """``a_c = Σ_{b,spatial} x / (spatial size)²``; ``h = [Σ_c a_c², C] / B²`` (count 1).

    LayerNorm's ``h`` is the same formula over the same dims (:func:`layernorm_input_stats`).
    """
    x = _as_stats(x)
    total = _channel_sum(x)
    b, d = x.shape[0], math.prod(x.shape[2:])
    scale = 1.0 / (float(d) ** 4 * float(b) ** 2)
    k, base = _cached(_norm_input_constants, x.shape[1], b, scale, x.dtype, x.device)
    return torch.addcmul(base, torch.dot(total, total), k), 1.0


def norm_input_stats_from_mean(
    mean: Tensor, x_shape: Sequence[int], per_mean: int
) -> tuple[Tensor, float]:
    """A norm layer's ``h`` (:func:`batchnorm_input_stats`) from the mean its kernel saved for
    backward, without another pass over ``x`` (count 1).

    ``per_mean``: how many entries of ``x`` each mean averages. BatchNorm saves one mean per
    channel (over batch and spatial dims), so ``Σx = mean·per_mean``; LayerNorm saves one per
    row (shape ``x_shape[:-k] + (1,)*k``), whose sum over every dim but 1, times ``per_mean``,
    is ``Σx`` over every dim but 1 as long as dim 1 is not normalised.
    """
    return finish_norm_statistics([], [(mean, x_shape, per_mean)])[1][0], 1.0


def batchnorm_output_stats(g: Tensor) -> tuple[Tensor, float]:
    """``s_c = (Σ_{b,spatial} G)² / B`` (count 1)."""
    g = _as_stats(g)
    return _channel_sum(g).square_().div_(float(g.shape[0])), 1.0


def layernorm_input_stats(x: Tensor) -> tuple[Tensor, float]:
    """``a = Σ_{all dims but 1} x / D²`` (D: product of the summed non-batch dims);
    ``h = [Σ a², len(a)] / B²`` (count 1) — BatchNorm's formula."""
    return batchnorm_input_stats(x if x.dim() >= 2 else x.unsqueeze(0))


def layernorm_output_stats(g: Tensor) -> tuple[Tensor, float]:
    """``s = (Σ_{all dims but the last} G)² / B`` (count 1)."""
    g = _as_stats(g)
    if g.dim() < 2:
        g = g.unsqueeze(0)
    return g.reshape(-1, g.shape[-1]).sum(0).square() / float(g.shape[0]), 1.0


def norm_output_stats_from_bias_grad(grad_bias: Tensor, batch: int) -> tuple[Tensor, float]:
    """A norm layer's ``s`` from the gradient of its bias in one call (count 1).

    ``y = x̂·w + b`` broadcasts ``b`` over every dim it does not have, so the bias gradient is
    ``Σ G`` over those dims: BatchNorm's ``Σ_{b,spatial} G`` (shape ``[C]``), LayerNorm's sum
    over the leading dims (shape ``normalized_shape``, summed here to its last dim).
    """
    return finish_norm_statistics([(grad_bias, batch)], [])[0][0], 1.0


def _channel_sums(tensors: list[Tensor]) -> list[Tensor]:
    """:func:`_channel_sum` of every tensor of more than one dim (1-D ones as they are); those
    of one shape (a transformer's LayerNorm means) stacked and reduced in one kernel."""
    out = list(tensors)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.dim() > 1:
            by_shape.setdefault(tuple(t.shape), []).append(i)
    for indices in by_shape.values():
        if len(indices) == 1:
            out[indices[0]] = _channel_sum(tensors[indices[0]])
            continue
        stacked = torch.stack([tensors[i] for i in indices])
        for i, summed in zip(indices, stacked.sum([1, *range(3, stacked.dim())]).unbind(0)):
            out[i] = summed
    return out


@functools.lru_cache(maxsize=64)
def _norm_finish_constants(
    grad_pieces: tuple[tuple[int, int], ...], mean_pieces: tuple[tuple[int, float, float], ...],
    dtype: torch.dtype, device: torch.device,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """For :func:`finish_norm_statistics`: the batch size spread over the bias-gradient pieces
    ``(length, batch)``; the piece ids, the scale of ``Σ mean²`` and the constant second entry
    ``C / B²`` of the mean pieces ``(length, scale, C / B²)``."""
    batches = ids = scales = second = None
    if grad_pieces:
        batches = torch.repeat_interleave(
            torch.tensor([float(b) for _, b in grad_pieces], dtype=dtype),
            torch.tensor([n for n, _ in grad_pieces]),
        ).to(device)
    if mean_pieces:
        ids = torch.repeat_interleave(
            torch.arange(len(mean_pieces)), torch.tensor([n for n, _, _ in mean_pieces])
        ).to(device)
        scales = torch.tensor([c for _, c, _ in mean_pieces], dtype=dtype).to(device)
        second = torch.tensor([v for _, _, v in mean_pieces], dtype=dtype).to(device)
    return batches, ids, scales, second


def finish_norm_statistics(
    bias_grads: Sequence[tuple[Tensor, int]], means: Sequence[tuple[Tensor, Sequence[int], int]],
) -> tuple[list[Tensor], list[Tensor]]:
    """Many norm-layer calls' ``s`` (:func:`norm_output_stats_from_bias_grad`, from
    ``(grad_bias, batch)``) and ``h`` (:func:`norm_input_stats_from_mean`, from ``(mean,
    x_shape, per_mean)``), all of one device and dtype, computed together: a handful of kernels
    for every norm layer of a model instead of a few per layer (each dispatched op costs
    5–40 µs on CPU, docs/performance.md). Returns the totals in order (the counts are all 1).
    """
    grads = [_as_stats(g) for g, _ in bias_grads]
    grads = [g.reshape(-1, g.shape[-1]).sum(0) if g.dim() > 1 else g for g in grads]
    sums = _channel_sums([_as_stats(m) for m, _, _ in means])
    mean_pieces = []
    for m, (_, shape, per_mean) in zip(sums, means):
        b, d = float(shape[0]), float(math.prod(shape[2:]))
        mean_pieces.append((m.numel(), float(per_mean) ** 2 / (d**4 * b**2), float(shape[1]) / b**2))
    like = (grads or sums)[0]
    batches, ids, scales, second = _cached(
        _norm_finish_constants,
        tuple((g.numel(), b) for g, (_, b) in zip(grads, bias_grads)), tuple(mean_pieces),
        like.dtype, like.device,
    )
    s_totals: list[Tensor] = []
    if grads:
        s_totals = list(torch.cat(grads).square_().div_(batches).split_with_sizes([g.numel() for g in grads]))
    h_totals: list[Tensor] = []
    if sums:
        squares = torch.cat(sums).square_()
        q = torch.zeros(len(sums), dtype=like.dtype, device=like.device).index_add_(0, ids, squares)
        h_totals = list(torch.stack([q * scales, second], 1).unbind(0))
    return s_totals, h_totals


# --------------------------------------------------------------------------------------------
# Folding statistics into factors (docs/numerics.md#folding-statistics-into-factors)
# --------------------------------------------------------------------------------------------


class Segments:
    """A flat vector read as consecutive pieces of fixed lengths (one factor vector each).

    Folding every layer's factors as one vector costs a dozen kernels per statistics step
    instead of a dozen per layer (docs/performance.md). Per-piece reductions are
    ``scatter_reduce`` over :attr:`ids`; per-piece constants are spread to the elements.
    """

    def __init__(self, lengths: Sequence[int], device: torch.device) -> None:
        self.lengths = tuple(int(n) for n in lengths)
        self.device = device
        sizes = torch.tensor(self.lengths)
        self.ids = torch.repeat_interleave(torch.arange(len(self.lengths)), sizes).to(device)
        """Piece index of every element."""
        self._constants: dict[tuple[Any, ...], Tensor] = {}

    def __len__(self) -> int:
        return len(self.lengths)

    def spread(self, per_piece: Tensor) -> Tensor:
        """A per-piece vector repeated over each piece's elements."""
        return per_piece.index_select(0, self.ids)

    def constants(self, values: Sequence[float | bool], dtype: torch.dtype) -> Tensor:
        """Per-piece Python values spread to the elements, in ``dtype``; cached.

        Made from the Python values (not computed on device), so an element sees exactly the
        scalar a per-piece operation would have used; copied to the device without a sync.
        """
        key = (tuple(values), dtype)
        found = self._constants.get(key)
        if found is None:
            if len(self._constants) >= 16:  # e.g. counts of a varying batch size: bounded
                self._constants.clear()
            per_piece = torch.tensor(list(values), dtype=dtype).to(self.device, non_blocking=True)
            found = self._constants[key] = self.spread(per_piece)
        return found

    def aminmax(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """Every element's piece minimum and maximum."""
        lo, hi = self.piece_aminmax(v)
        return self.spread(lo), self.spread(hi)

    def piece_aminmax(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """Each piece's minimum and maximum (vectors of ``len(self)``). The reductions start
        from ±inf: with ``include_self=False`` torch fills the output itself (the same kernels
        on CUDA, four times slower on CPU)."""
        n = len(self)
        lo = v.new_full((n,), math.inf).scatter_reduce_(0, self.ids, v, "amin")
        hi = v.new_full((n,), -math.inf).scatter_reduce_(0, self.ids, v, "amax")
        return lo, hi

    def sum(self, v: Tensor) -> Tensor:
        """Each piece's sum (a vector of ``len(self)``)."""
        return v.new_zeros(len(self)).index_add_(0, self.ids, v)

    def any(self, flags: Tensor) -> Tensor:
        """Per piece: whether any of its elements is set (bool vector of ``len(self)``)."""
        hits = torch.zeros(len(self), dtype=torch.uint8, device=flags.device)
        return hits.scatter_reduce_(0, self.ids, flags.to(torch.uint8), "amax").bool()

    def split(self, v: Tensor) -> tuple[Tensor, ...]:
        return v.split_with_sizes(self.lengths)


def min_max(v: Tensor, segments: Segments | None = None) -> Tensor:
    """``(v − min v) / (max v − min v)``, all ones where ``max v == min v`` (paper variant);
    per piece when ``segments`` is given."""
    lo, hi = torch.aminmax(v) if segments is None else segments.piece_aminmax(v)
    span = hi - lo
    if segments is not None:
        lo, span = segments.spread(lo), segments.spread(span)
    # Where span is 0 the quotient is 0/0, replaced by the ones.
    return torch.where(span > 0, (v - lo) / span, 1.0)


def flush_subnormal_(v: Tensor) -> Tensor:
    """Set non-negative values below the dtype's smallest normal number to zero, in place.

    Factor entries that see no signal decay geometrically (``γ`` or ``0.1γ`` per statistics
    step) into the subnormal range, where every later multiply is ~50× slower on CPU (docs/numerics.md).
    """
    return torch.threshold_(v, _below_normal(v.dtype), 0.0)


@functools.lru_cache(maxsize=8)
def _below_normal(dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` below its smallest normal number: ``x ≤`` it exactly when
    ``x <`` the smallest normal (one ``threshold_`` kernel instead of a compare and a fill)."""
    tiny = torch.tensor(torch.finfo(dtype).tiny, dtype=dtype)
    return torch.nextafter(tiny, torch.zeros((), dtype=dtype)).item()


def normalised(variant: str, factor: Tensor, segments: Segments | None = None) -> Tensor:
    """``H'`` from ``H`` (same for ``S``): min-max normalised and flushed in the paper variant
    (per piece with ``segments``), the factor itself in the reference variant."""
    if variant == "paper":
        return flush_subnormal_(min_max(factor, segments))
    return factor


def unfoldable(variant: str, stat: Tensor) -> Tensor:
    """Elementwise: entries that stop a layer's statistics from being folded.

    Paper variant: inf and NaN. Reference variant: NaN only (it maps ±inf itself).
    """
    return ~torch.isfinite(stat) if variant == "paper" else torch.isnan(stat)


def foldable(variant: str, stat: Tensor, segments: Segments) -> Tensor:
    """Per piece of ``segments``: whether none of its entries is :func:`unfoldable` (a bool
    vector, decided on device). Each entry is marked 0 (foldable) or NaN, and the marks are
    summed per piece: four kernels for every layer at once."""
    if variant == "paper":
        marks = stat * 0.0  # inf·0 and NaN·0 are NaN
    else:
        marks = torch.nan_to_num(stat, nan=math.nan, posinf=0.0, neginf=0.0).mul_(0.0)
    return segments.sum(marks) == 0


def statistics_ok(variant: str, *stats: Tensor) -> Tensor:
    """Whether a layer's statistics may be folded (0-dim bool tensor, decided on device)."""
    ok = ~unfoldable(variant, stats[0]).any()
    for s in stats[1:]:
        ok = ok & ~unfoldable(variant, s).any()
    return ok


def _coefficients(
    gamma: float | Sequence[float], scale: Callable[[float], float], like: Tensor,
    segments: Segments | None,
) -> float | Tensor:
    if segments is None:
        return scale(gamma)  # type: ignore[arg-type]
    return segments.constants([scale(g) for g in gamma], like.dtype)  # type: ignore[union-attr]


def fold_paper(
    factor: Tensor | None, stat: Tensor, gamma: float | Sequence[float], ok: Tensor,
    first: Tensor | None = None, segments: Segments | None = None,
) -> Tensor:
    """Paper variant (Eq. 3): ``F ← γ·F + (1−γ)·stat``; the first statistics step takes ``stat``.

    Where ``ok`` is False the factor is returned unchanged (all ones if there was none yet).
    Flat form (``segments``): ``gamma`` has one value per piece, ``ok`` and ``first`` (pieces
    folded for the first time, whose ``factor`` entries hold ones) are per element.
    """
    if factor is None:
        new = torch.where(ok, stat, 1.0)
    else:
        keep = _coefficients(gamma, lambda g: g, stat, segments)
        take = _coefficients(gamma, lambda g: 1.0 - g, stat, segments)
        blend = factor * keep + stat * take
        if first is not None:
            blend = torch.where(first, stat, blend)
        new = torch.where(ok, blend, factor)
    return flush_subnormal_(new)


def fold_reference(
    factor: Tensor | None, stat: Tensor, gamma: float | Sequence[float], ok: Tensor,
    segments: Segments | None = None,
) -> Tensor:
    """Reference variant: ``F ← 0.1γ·F + 0.01γ·mm_ε(stat)``, starting from all ones.

    ``+inf → 1`` and ``−inf → 0`` before normalising, as in the released code. Where ``ok`` is
    False (a NaN) the factor is returned unchanged. Flat form as in :func:`fold_paper` (pieces
    folded for the first time hold ones in ``factor``).
    """
    if factor is None:
        factor = torch.ones_like(stat)
    v = torch.nan_to_num(stat, nan=0.0, posinf=1.0, neginf=0.0)
    lo, hi = torch.aminmax(v) if segments is None else segments.aminmax(v)
    normalised = (v - lo) / (hi - lo + REFERENCE_MM_EPS)
    keep = _coefficients(gamma, lambda g: 0.1 * g, stat, segments)
    take = _coefficients(gamma, lambda g: 0.01 * g, stat, segments)
    new = torch.where(ok, factor * keep + normalised * take, factor)
    return flush_subnormal_(new)


# --------------------------------------------------------------------------------------------
# Fisher assembly
# --------------------------------------------------------------------------------------------


class KronFactors(NamedTuple):
    """A parameter's Fisher diagonal, left unmaterialised: over the parameter viewed as
    ``[-1, len(cols)]``, ``F[i, j] = rows[i]·cols[j] + damping``; a one-entry ``rows``
    broadcasts over every row.

    Every built-in layer's ``F`` has this form (``layers.LayerHelper.kron_factors``): a weight
    ``[out, in...]`` is ``(S', H'[:in])``, its bias ``(S', H'[-1:])``, a norm layer's weight
    ``(H'[0:1], S')``, the identity ``(1, 1)`` with ``damping`` such that ``F = 1 + λ`` or ``1``.
    """

    rows: Tensor
    cols: Tensor
    damping: float

    def materialise(self, shape: Sequence[int]) -> Tensor:
        """``F`` as a tensor of ``shape`` (a parameter-sized temporary)."""
        cols = self.cols.numel()
        f = torch.mul(self.rows.unsqueeze(1), self.cols.unsqueeze(0)).add_(self.damping)
        return f.expand(math.prod(shape) // cols, cols).reshape(shape)


# --------------------------------------------------------------------------------------------
# The update (docs/numerics.md#the-update)
# --------------------------------------------------------------------------------------------


def _fused_group_step(
    params: list[Tensor], exp_avgs: list[Tensor], grads: list[Tensor], rows: list[Tensor],
    cols: list[Tensor], scalars: Tensor,
) -> None:
    """Every parameter's whole update, written so that a compiler fuses each into one pass:
    ``m ← lerp(m, g + l2·p, 1−β)``, ``p ← decay·p − step·m / (rows⊗cols + λ)``, with
    ``scalars[i] = (1−β, λ, step, decay, l2)`` (a tensor, so new values never recompile)."""
    for i in range(len(params)):
        p, m, g = params[i], exp_avgs[i], grads[i]
        one_minus_beta, damping, step_size, decay, l2 = scalars[i].unbind()
        m_new = torch.lerp(m, g + l2 * p, one_minus_beta)
        p_new = p * decay - step_size * m_new / (rows[i][:, None] * cols[i][None, :] + damping)
        m.copy_(m_new)
        p.copy_(p_new)


_compiled_group_step: Callable[..., None] | None = None


def _fused_step() -> Callable[..., None]:
    """:func:`_fused_group_step` compiled once with ``torch.compile``: one graph per list of
    shapes (a model's parameter list is fixed, so it compiles on the first step)."""
    global _compiled_group_step
    if _compiled_group_step is None:
        _compiled_group_step = torch.compile(_fused_group_step, dynamic=False)
    return _compiled_group_step


UPDATE_BLOCK = 1 << 22
"""Most elements of ``F`` the eager Kronecker update materialises at once (16 MiB of float32):
weights larger than this are updated in blocks of rows, which bounds the scratch buffer.
Smaller blocks, sized for the caches, were measured slower on CPU: each block's kernel launches
and thread fork/joins cost more than the memory traffic they save (docs/performance.md)."""


def adafisher_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    denominators: list[Tensor | float | KronFactors],
    steps: list[int],
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    decoupled: bool,
    foreach: bool,
    fused: bool = False,
    workspace: Callable[[int, torch.dtype, torch.device], Tensor] | None = None,
) -> None:
    """Apply one AdaFisher(W) update in place.

    ``denominators[i]`` is the parameter's Fisher diagonal ``F``: a tensor, a float for the
    identity fallback, or :class:`KronFactors`, whose ``F`` is never materialised whole. Those
    are updated

    * with ``fused``: all in one compiled call (one pass per parameter: moment, decay and
      preconditioned step);
    * on the single-tensor path: ``F`` written into ``workspace(numel, dtype, device)`` (one
      reusable scratch buffer) right before it is used, in blocks of at most
      :data:`UPDATE_BLOCK` elements;
    * on the multi-tensor path: the moments of all parameters in one set of ``_foreach``
      kernels, then ``F`` of consecutive parameters written into views of ``workspace`` until
      :data:`UPDATE_BLOCK` elements are filled and one ``_foreach_addcdiv_`` per such chunk (a
      weight larger than a chunk takes the blocked single-tensor path).

    Without a ``workspace``, a fresh buffer serves each block or chunk. A tensor or float ``F``
    and a non-contiguous parameter take the plain path (``F`` materialised). All give the same
    numbers as the plain formula (the eager paths bitwise, the fused one to rounding).
    ``steps[i]`` is the parameter's own update count including this one.
    """
    if not params:
        return
    foreach = foreach and compat.has_foreach_ops()
    kwargs = dict(lr=lr, beta=beta, weight_decay=weight_decay, decoupled=decoupled)
    scratch = workspace if workspace is not None else _fresh_workspace
    # One partition: every parameter takes exactly one of four paths.
    kron = [
        i for i, d in enumerate(denominators)
        if isinstance(d, KronFactors) and params[i].is_contiguous() and exp_avgs[i].is_contiguous()
    ]
    fused_ok = fused and _fused_update(
        [params[i] for i in kron], [grads[i] for i in kron], [exp_avgs[i] for i in kron],
        [denominators[i] for i in kron], [steps[i] for i in kron], **kwargs,  # type: ignore[misc]
    )
    chunked = [] if fused_ok or not foreach else [i for i in kron if params[i].numel() <= UPDATE_BLOCK]
    in_chunks = set(chunked)
    blocked = [] if fused_ok else [i for i in kron if i not in in_chunks]
    done = set(kron)
    plain = [i for i in range(len(params)) if i not in done]
    # The multi-tensor paths' moments (and decay) need no F: one set of kernels for them all.
    together = chunked + (plain if foreach else [])
    if together:
        _multi_tensor_moments(
            [params[i] for i in together], [grads[i] for i in together], [exp_avgs[i] for i in together],
            **kwargs,
        )
    for chunk in _chunks(chunked, params, denominators):
        _chunked_multi_tensor_step(
            [params[i] for i in chunk], [exp_avgs[i] for i in chunk],
            [denominators[i] for i in chunk], [steps[i] for i in chunk],  # type: ignore[misc]
            lr=lr, beta=beta, workspace=scratch,
        )
    for i in blocked:
        _blocked_kron_update(params[i], grads[i], exp_avgs[i], denominators[i], steps[i],  # type: ignore[arg-type]
                             workspace=scratch, **kwargs)
    if plain:
        plain_denominators = [_materialised(denominators[i], params[i]) for i in plain]
        if foreach:
            _multi_tensor_step(
                [params[i] for i in plain], [exp_avgs[i] for i in plain], plain_denominators,
                [steps[i] for i in plain], lr=lr, beta=beta,
            )
        else:
            _single_tensor_update(
                [params[i] for i in plain], [grads[i] for i in plain], [exp_avgs[i] for i in plain],
                plain_denominators, [steps[i] for i in plain], **kwargs,
            )


def _materialised(denominator: Tensor | float | KronFactors, p: Tensor) -> Tensor | float:
    if isinstance(denominator, KronFactors):
        return denominator.materialise(p.shape).to(p.dtype)
    return denominator


def _fresh_workspace(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The scratch buffer when the caller keeps none: a new one each time."""
    return torch.empty(numel, dtype=dtype, device=device)


_fused_failure: str | None = None
"""Why ``torch.compile`` of the fused update failed in this process (then the eager path runs)."""


def _fused_update(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], kron: list[KronFactors],
    steps: list[int], *, lr: float, beta: float, weight_decay: float, decoupled: bool,
) -> bool:
    """The fused update of ``params``; False when ``torch.compile`` failed to trace or compile
    it, now or earlier in this process (:func:`fused_failure` says why), and the caller must
    run the eager update instead. Raises ``RuntimeError`` when the compiled code failed while
    running (it may have written part of the update: redoing the step would apply it twice)."""
    global _fused_failure
    if _fused_failure is not None:
        return False
    if not params:
        return True
    scalars = torch.tensor(
        [
            (1.0 - beta, k.damping, lr / (1.0 - beta**t),
             1.0 - lr * weight_decay if decoupled else 1.0, 0.0 if decoupled else weight_decay)
            for k, t in zip(kron, steps)
        ],
        dtype=params[0].dtype,
    ).to(params[0].device, non_blocking=True)
    widths = [k.cols.numel() for k in kron]
    written = [*params, *exp_avgs]
    versions = [compat.tensor_version(t) for t in written]
    try:
        _fused_step()(
            [p.view(-1, n) for p, n in zip(params, widths)],
            [m.view(-1, n) for m, n in zip(exp_avgs, widths)],
            [g.reshape(-1, n) for g, n in zip(grads, widths)],
            [k.rows.to(p.dtype) for p, k in zip(params, kron)],
            [k.cols.to(p.dtype) for p, k in zip(params, kron)],
            scalars,
        )
    except Exception as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        untouched = all(v is not None and v == compat.tensor_version(t) for v, t in zip(versions, written))
        if not (compat.is_compile_error(error) and untouched):
            # The compiled update itself failed, possibly after writing some parameters or
            # moments: running the eager update now would apply part of this step twice.
            raise RuntimeError(
                f"AdaFisher(fused=True): the compiled update failed while running ({reason}); "
                "parameters and exp_avg may be partly updated, so this step cannot be redone. "
                "Reload the last checkpoint, or pass fused=False."
            ) from error
        # Tracing/compiling failed (no C++ compiler, an unsupported platform) before the
        # compiled code ran, and nothing was written: the eager update does this step and
        # every later one (the optimizer warns, once).
        _fused_failure = reason
        return False
    return True


def fused_failure() -> str | None:
    """Why ``torch.compile`` of the fused update failed in this process, or ``None``."""
    return _fused_failure


def _blocked_kron_update(
    p: Tensor, g: Tensor, m: Tensor, kron: KronFactors, t: int, *,
    lr: float, beta: float, weight_decay: float, decoupled: bool,
    workspace: Callable[[int, torch.dtype, torch.device], Tensor],
) -> None:
    """The single-tensor update of one parameter with Kronecker factors, over blocks of rows.

    Per block: ``m ← lerp(m, g (+ κp), 1−β)``, decoupled decay, ``F = rows⊗cols + λ`` into the
    scratch buffer, ``p ← p − step·m/F``. Each element sees exactly the ops of the unblocked
    update, so the result is bitwise the same whatever the block size.
    """
    cols = kron.cols.numel()
    rows = p.numel() // cols
    p2, g2, m2 = p.view(rows, cols), g.reshape(rows, cols), m.view(rows, cols)
    r_all = kron.rows if kron.rows.dtype == p.dtype else kron.rows.to(p.dtype)
    c_all = (kron.cols if kron.cols.dtype == p.dtype else kron.cols.to(p.dtype)).unsqueeze(0)
    step_size = lr / (1.0 - beta**t)
    block_rows = max(1, min(rows, UPDATE_BLOCK // cols))
    scratch = workspace(block_rows * cols, p.dtype, p.device)
    r_block = r_all if r_all.numel() == rows else r_all.expand(rows)
    for pb, gb, mb, rb in _row_blocks(block_rows, p2, g2, m2, r_block):
        if weight_decay != 0.0 and not decoupled:
            gb = gb.add(pb, alpha=weight_decay)
        mb.lerp_(gb, 1.0 - beta)
        if weight_decay != 0.0 and decoupled:
            pb.mul_(1.0 - lr * weight_decay)
        n = pb.shape[0]
        denom = scratch[: n * cols].view(n, cols)
        torch.mul(rb.unsqueeze(1), c_all, out=denom)
        denom.add_(kron.damping)
        pb.addcdiv_(mb, denom, value=-step_size)


def _row_blocks(block_rows: int, *tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """The tensors (same first dim) cut into blocks of ``block_rows`` rows; when one block
    holds them all (the usual case), the tensors themselves, without dispatching a slice each
    (host time: docs/performance.md)."""
    rows = tensors[0].shape[0]
    if block_rows >= rows:
        yield tensors
        return
    for r0 in range(0, rows, block_rows):
        yield tuple(t[r0 : r0 + block_rows] for t in tensors)


def _chunks(indices: list[int], params: list[Tensor], kron: Sequence[Any]) -> list[list[int]]:
    """``indices`` cut into runs of one device and dtype holding at most :data:`UPDATE_BLOCK`
    elements in all (every parameter here is at most that large), ordered so that parameters
    whose ``F`` is built together (:func:`_kron_denominators`: same width, same damping) are
    neighbours."""
    names: dict[tuple[torch.device, torch.dtype], tuple[str, str]] = {}

    def key(i: int) -> tuple[Any, ...]:
        p = params[i]
        where = (p.device, p.dtype)
        name = names.get(where)
        if name is None:  # str() of a device or dtype costs a µs: once per pair, not per parameter
            name = names[where] = (str(p.device), str(p.dtype))
        return (*name, kron[i].cols.numel(), kron[i].damping)

    chunks: list[list[int]] = []
    filled, device_dtype = 0, None
    for i in sorted(indices, key=key):
        p = params[i]
        if not chunks or (p.device, p.dtype) != device_dtype or filled + p.numel() > UPDATE_BLOCK:
            chunks.append([])
            filled, device_dtype = 0, (p.device, p.dtype)
        chunks[-1].append(i)
        filled += p.numel()
    return chunks


@functools.lru_cache(maxsize=64)
def _row_owners(rows: tuple[int, ...], device: torch.device) -> Tensor:
    """For rows ``rows[k]`` of member ``k`` stacked: the member index of every row."""
    return torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows)).to(device)


class _Run(NamedTuple):
    """Consecutive parameters ``start:stop`` of one width and damping in a chunk, and where
    their ``F`` goes: ``f`` (``[Σ rows, width]``) and one view of it per parameter."""

    start: int
    stop: int
    width: int
    damping: float
    rows: tuple[int, ...]
    f: Tensor
    views: tuple[Tensor, ...]


_scratch_layouts: dict[tuple[int, tuple[Any, ...]], list[_Run]] = {}
"""Per live scratch buffer (by id, dropped when the buffer is freed) and chunk layout, the
views :func:`_kron_denominators` writes into: a chunk's views are the same every step, and
making them costs two or three dispatched view ops per parameter."""


def _runs(params: list[Tensor], kron: list[KronFactors], scratch: Tensor, cache: bool) -> list[_Run]:
    """The runs of a chunk (:func:`_kron_denominators`) laid out in ``scratch``; with
    ``cache`` (a scratch buffer its owner keeps), made once per buffer and layout."""
    layout = tuple((p.shape, k.cols.numel(), k.damping) for p, k in zip(params, kron))
    key = (id(scratch), layout)
    found = _scratch_layouts.get(key) if cache else None
    if found is not None:
        return found
    # Views of a detached alias: a view keeps its base alive, and the cache must not keep the
    # buffer itself, whose end drops the entry (the alias shares its memory, freed with it).
    source = scratch.detach() if cache else scratch
    runs: list[_Run] = []
    offset, start = 0, 0
    while start < len(params):
        _, width, damping = layout[start]
        stop = start + 1
        while stop < len(params) and layout[stop][1:] == (width, damping):
            stop += 1
        rows = tuple(params[i].numel() // width for i in range(start, stop))
        f = source[offset : offset + sum(rows) * width].view(-1, width)
        views = tuple(
            piece.view(params[i].shape) for i, piece in zip(range(start, stop), f.split(rows))
        )
        runs.append(_Run(start, stop, width, damping, rows, f, views))
        offset += sum(rows) * width
        start = stop
    if cache:
        if not any(k[0] == key[0] for k in _scratch_layouts):  # first layout of this buffer
            weakref.finalize(scratch, _forget_scratch, key[0])
        _scratch_layouts[key] = runs
    return runs


def _forget_scratch(scratch_id: int) -> None:
    for key in [k for k in _scratch_layouts if k[0] == scratch_id]:
        del _scratch_layouts[key]


def _kron_denominators(
    params: list[Tensor], kron: list[KronFactors], scratch: Tensor, cache: bool = False
) -> list[Tensor]:
    """Every ``F = rows⊗cols + λ`` of ``params`` written into consecutive views of ``scratch``
    (with ``cache``, views made once per buffer and layout: :func:`_runs`).

    Parameters of one width (``len(cols)``) and damping, neighbours in the list, share their
    ``F``'s kernels: their cols and rows are concatenated, each row's cols gathered into the
    scratch buffer (one ``index_select``), multiplied by the row's entry and damped — four
    kernels for the run instead of two per parameter. Each element is ``r·c + λ``, rounded as
    in :meth:`KronFactors.materialise`, so the numbers are the same bits.
    """
    denominators: list[Tensor] = []
    for start, stop, width, damping, rows, f, views in _runs(params, kron, scratch, cache):
        dtype = params[start].dtype
        members = kron[start:stop]
        # A one-entry rows (a norm layer's) broadcast over the parameter's rows; a norm
        # layer's parameter is one row, where that expand would be a dispatched no-op.
        row_factors = [k.rows if k.rows.numel() == n else k.rows.expand(n) for k, n in zip(members, rows)]
        if stop - start == 1:
            torch.mul(row_factors[0].to(dtype).unsqueeze(1), members[0].cols.to(dtype).unsqueeze(0), out=f)
        else:
            both = torch.cat([k.cols for k in members] + row_factors).to(dtype)
            cols, row_entries = both.split_with_sizes([width * len(members), sum(rows)])
            torch.index_select(cols.view(-1, width), 0, _cached(_row_owners, rows, f.device), out=f)
            f.mul_(row_entries.unsqueeze(1))
        f.add_(damping)
        denominators += views
    return denominators


def _chunked_multi_tensor_step(
    params: list[Tensor], exp_avgs: list[Tensor], kron: list[KronFactors], steps: list[int], *,
    lr: float, beta: float, workspace: Callable[[int, torch.dtype, torch.device], Tensor],
) -> None:
    """The multi-tensor step of one chunk (moments already updated), each ``F`` written into its
    slice of the scratch buffer (:func:`_kron_denominators`: the numbers of
    :meth:`KronFactors.materialise`)."""
    scratch = workspace(sum(p.numel() for p in params), params[0].dtype, params[0].device)
    denominators = _kron_denominators(params, kron, scratch, cache=workspace is not _fresh_workspace)
    _multi_tensor_step(params, exp_avgs, denominators, steps, lr=lr, beta=beta)  # type: ignore[arg-type]


def _single_tensor_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    denominators: list[Tensor | float],
    steps: list[int],
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    decoupled: bool,
) -> None:
    for p, g, m, denom, t in zip(params, grads, exp_avgs, denominators, steps):
        if weight_decay != 0.0 and not decoupled:
            g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1.0 - beta)
        step_size = lr / (1.0 - beta**t)
        if weight_decay != 0.0 and decoupled:
            p.mul_(1.0 - lr * weight_decay)
        if isinstance(denom, Tensor):
            p.addcdiv_(m, denom, value=-step_size)
        else:
            p.add_(m, alpha=-step_size / denom)


def _multi_tensor_moments(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *,
    lr: float, beta: float, weight_decay: float, decoupled: bool,
) -> None:
    """The multi-tensor update's first half: ``m ← lerp(m, g (+ κp), 1−β)``, decoupled decay."""
    if weight_decay != 0.0 and not decoupled:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta)
    if weight_decay != 0.0 and decoupled:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)


def _multi_tensor_step(
    params: list[Tensor], exp_avgs: list[Tensor], denominators: list[Tensor | float],
    steps: list[int], *, lr: float, beta: float,
) -> None:
    """The multi-tensor update's second half, after :func:`_multi_tensor_moments`:
    ``p ← p − step·m/F``."""
    kron = [i for i, d in enumerate(denominators) if isinstance(d, Tensor)]
    ident = [i for i, d in enumerate(denominators) if not isinstance(d, Tensor)]
    if kron:
        torch._foreach_addcdiv_(
            [params[i] for i in kron],
            [exp_avgs[i] for i in kron],
            [denominators[i] for i in kron],  # type: ignore[misc]
            [-lr / (1.0 - beta ** steps[i]) for i in kron],
        )
    if ident:
        scaled = torch._foreach_mul(
            [exp_avgs[i] for i in ident],
            [-lr / (1.0 - beta ** steps[i]) / denominators[i] for i in ident],  # type: ignore[operator]
        )
        torch._foreach_add_([params[i] for i in ident], scaled)
