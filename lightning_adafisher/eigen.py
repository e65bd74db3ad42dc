"""Pure tensor math of the eigenbasis variant (``variant="eigen"``).

The paper's variants keep only the *diagonals* of the Kronecker factors. This variant keeps the
full factors of a layer whose weight is viewed as a matrix ``W`` of shape ``[n_s, n_h]``
(output side × input side, a bias as the last input column):

* ``A = E[ā āᵀ]`` over the layer's input rows ``ā`` (``[n_h, n_h]``; ones entry for the bias),
* ``G = E[g gᵀ]`` over the rows of the output gradient (``[n_s, n_s]``),

and runs Adam in the eigenbasis of the two: with ``A = Q_A Λ_A Q_Aᵀ`` and ``G = Q_G Λ_G Q_Gᵀ``
the gradient is rotated, ``R = Q_Gᵀ ∇W Q_A``, Adam's first and second moments are kept in that
basis, and the step ``U = m̂ / (√v̂ + ε)`` is rotated back, ``Q_G U Q_Aᵀ``. In the eigenbasis the
Kronecker-factored Fisher is exactly diagonal, so the second moment there estimates its
diagonal without the min-max rescaling of the paper's variant.

A side larger than the size limit keeps the identity as its basis (no statistics are gathered
for it); a layer with both sides above the limit is plain Adam.

Shape conventions are those of :mod:`lightning_adafisher.functional`. Covariance totals come
back as ``(total, count)`` with ``total`` flattened to 1-D (``n²`` entries) so that they pool,
all-reduce and checkpoint exactly like the diagonal statistics.

Nothing here installs hooks, talks to other processes or knows about Lightning.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_adafisher.functional import _as_stats, _autocast_off

__all__ = [
    "linear_input_cov",
    "linear_output_cov",
    "conv2d_input_cov",
    "conv2d_output_cov",
    "finite_units",
    "fold_covariance",
    "fold_covariances",
    "eigenbasis",
    "change_basis",
    "rotate_in",
    "rotate_out",
    "eigen_adam_moments",
]


# --------------------------------------------------------------------------------------------
# Covariance statistics
# --------------------------------------------------------------------------------------------


def _gram_with_ones(rows: Tensor, bias: bool) -> Tensor:
    """``Σ_r ā_r ā_rᵀ`` for ``rows`` ``[N, d]``, ``ā = [a, 1]`` if ``bias``, without building ``ā``."""
    with _autocast_off():
        gram = rows.T @ rows
        if not bias:
            return gram
        d = rows.shape[1]
        out = rows.new_empty(d + 1, d + 1)
        out[:d, :d] = gram
        col = rows.sum(0)
        out[:d, d] = col
        out[d, :d] = col
        out[d, d] = float(rows.shape[0])
        return out


def linear_input_cov(x: Tensor, bias: bool) -> tuple[Tensor, float]:
    """``Σ ā āᵀ`` over the rows of ``x`` flattened to ``[N, d_in]`` (ones entry last if ``bias``)."""
    rows = _as_stats(x).reshape(-1, x.shape[-1])
    return _gram_with_ones(rows, bias).reshape(-1), float(rows.shape[0])


def linear_output_cov(g: Tensor) -> tuple[Tensor, float]:
    """``Σ g gᵀ`` over the rows of ``G`` flattened to ``[N, d_out]``."""
    rows = _as_stats(g).reshape(-1, g.shape[-1])
    return _gram_with_ones(rows, False).reshape(-1), float(rows.shape[0])


CONV_POSITIONS_PER_IMAGE = 64
"""At most this many output positions per image (an evenly strided grid, at most 8 × 8) give the
rows of a conv's input factor. A mean over positions needs far fewer than a 32×32 map's 1024 to
fix an eigenbasis, and the full set costs the factor ``B·L·n_h²`` (9× the layer's own forward on
a CIFAR ResNet's first stage). Maps of at most 64 positions use every position."""


def conv2d_position_strides(out_h: int, out_w: int) -> tuple[int, int]:
    """Every how many output rows and columns a position enters the input factor."""
    side = math.isqrt(CONV_POSITIONS_PER_IMAGE)
    if out_h * out_w <= CONV_POSITIONS_PER_IMAGE:
        return 1, 1
    return max(1, math.ceil(out_h / side)), max(1, math.ceil(out_w / side))


def conv2d_input_cov(
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    padding: tuple[int, int, int, int],
    padding_mode: str,
    groups: int,
    bias: bool,
) -> tuple[Tensor, float]:
    """``Σ ū ūᵀ`` over the im2col patch rows ``ū`` of a conv input (K-FAC's input factor).

    One row per (image, output position, group), entries in the weight's ``(c, kh, kw)``
    order, ones entry last if ``bias``; a grouped conv stacks its groups' patches as rows of
    one shared factor. ``padding`` is ``(left, right, top, bottom)`` as from
    :func:`functional.conv2d_padding`. Output positions are those of an evenly strided grid of
    at most :data:`CONV_POSITIONS_PER_IMAGE` per image (:func:`conv2d_position_strides`; all of
    them for small maps). This builds the patches of those positions: the full factor needs
    every pair of patch entries, which no sum of squares gives.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    x = _as_stats(x)
    if any(padding):
        mode = "constant" if padding_mode == "zeros" else padding_mode
        x = F.pad(x, padding, mode=mode)
    b, c_in, height, width = x.shape
    c_group = c_in // groups
    kh, kw = kernel_size
    (sh, sw), (dh, dw) = tuple(stride), tuple(dilation)
    out_h = (height - dh * (kh - 1) - 1) // sh + 1
    out_w = (width - dw * (kw - 1) - 1) // sw + 1
    fh, fw = conv2d_position_strides(out_h, out_w)
    with _autocast_off():
        patches = F.unfold(x, (kh, kw), dilation=(dh, dw), stride=(sh * fh, sw * fw))
    positions = patches.shape[-1]
    # [B, groups·c·kh·kw, L] -> rows [B·groups·L, c·kh·kw]
    rows = patches.view(b, groups, c_group * kh * kw, positions).permute(0, 1, 3, 2)
    rows = rows.reshape(-1, c_group * kh * kw)
    return _gram_with_ones(rows, bias).reshape(-1), float(rows.shape[0])


def conv2d_output_cov(g: Tensor) -> tuple[Tensor, float]:
    """``Σ g gᵀ`` over (batch, output positions) of a conv's output gradient ``[B, C, H, W]``."""
    if g.dim() == 3:
        g = g.unsqueeze(0)
    g = _as_stats(g)
    c = g.shape[1]
    cols = g.transpose(0, 1).reshape(c, -1)  # [C, B·H·W]
    with _autocast_off():
        total = cols @ cols.T
    return total.reshape(-1), float(cols.shape[1])


# --------------------------------------------------------------------------------------------
# Folding and the eigenbasis
# --------------------------------------------------------------------------------------------


def finite_units(units: list[tuple[Tensor | None, Tensor | None]]) -> Tensor:
    """Per unit ``(a, g)`` (``None``: a side without a factor, at least one side present),
    whether every entry of its factors is finite: a bool vector on the first factor's device.
    One multi-tensor max-norm over all factors (inf/NaN anywhere gives a non-finite max), then
    one sum per unit of its two maxima: a fixed number of kernels whatever the unit count."""
    present = [f for unit in units for f in unit if f is not None]
    device = present[0].device
    zero = present[0].new_zeros(1)
    norms = torch._foreach_norm([f if f is not None else zero for unit in units for f in unit], float("inf"))
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    maxima = torch.stack([n.to(device=device, dtype=dtype) for n in norms]).view(len(units), 2)
    return torch.isfinite(maxima.sum(1))


def fold_covariances(olds: list[Tensor], news: list[Tensor], gamma: float, ok: list[Tensor]) -> list[Tensor]:
    """:func:`fold_covariance` of factors that all have an old value, with multi-tensor ops for
    the blend (``ok``: one 0-dim bool per factor)."""
    blend = torch._foreach_mul(olds, gamma)
    torch._foreach_add_(blend, torch._foreach_mul(news, 1.0 - gamma))
    return [torch.where(flag, b, old) for flag, b, old in zip(ok, blend, olds)]


def fold_covariance(old: Tensor | None, new: Tensor, gamma: float, ok: Tensor) -> Tensor:
    """EMA of a factor: ``new`` the first time, then ``γ·old + (1−γ)·new``; where ``ok`` (a
    0-dim bool tensor) is false the factor stays ``old`` (zeros the first time)."""
    if old is None:
        return torch.where(ok, new, torch.zeros_like(new))
    return torch.where(ok, old * gamma + new * (1.0 - gamma), old)


def eigenbasis(factor: Tensor, previous: Tensor | None = None) -> tuple[Tensor, bool]:
    """Orthonormal eigenvectors of a symmetric PSD ``factor`` (columns, ascending eigenvalues).

    The factor is scaled by its mean diagonal first (the eigenvectors do not change; its
    entries can be as small as ``1/N²`` of a mean-reduced loss). ``eigh`` runs in the factor's
    dtype; if it fails to converge or returns non-finite vectors it is retried in float64, and
    if that fails too the previous basis is kept (the identity when there is none). Returns the
    basis, in the factor's dtype, and whether this call's decomposition succeeded.
    """
    n = factor.shape[0]
    scale = factor.diagonal().sum() / n
    scaled = factor / torch.where(scale > 0, scale, torch.ones_like(scale))
    for dtype in (factor.dtype, torch.float64):
        try:
            _, vectors = torch.linalg.eigh(scaled.to(dtype))
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
            continue
        if bool(torch.isfinite(vectors).all()):
            return vectors.to(factor.dtype), True
    if previous is not None:
        return previous, False
    return torch.eye(n, dtype=factor.dtype, device=factor.device), False


def change_basis(
    m: Tensor, old_s: Tensor | None, new_s: Tensor | None, old_h: Tensor | None, new_h: Tensor | None
) -> Tensor:
    """Re-express a moment kept in the basis ``(old_s, old_h)`` in ``(new_s, new_h)``:
    ``m ← (new_sᵀ old_s) m (old_hᵀ new_h)`` (``None``: the identity on that side)."""
    if new_s is not None or old_s is not None:
        left = old_s if new_s is None else new_s.T if old_s is None else new_s.T @ old_s
        m = left @ m
    if new_h is not None or old_h is not None:
        right = old_h.T if new_h is None else new_h if old_h is None else old_h.T @ new_h
        m = m @ right
    return m


def rotate_in(grad: Tensor, q_s: Tensor | None, q_h: Tensor | None) -> Tensor:
    """``Q_Sᵀ ∇W Q_H`` (``None``: the identity on that side)."""
    if q_s is not None:
        grad = q_s.T @ grad
    if q_h is not None:
        grad = grad @ q_h
    return grad


def rotate_out(update: Tensor, q_s: Tensor | None, q_h: Tensor | None) -> Tensor:
    """``Q_S U Q_Hᵀ`` (``None``: the identity on that side)."""
    if q_s is not None:
        update = q_s @ update
    if q_h is not None:
        update = update @ q_h.T
    return update


def eigen_adam_moments(
    rotated: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], step: int,
    beta1: float, beta2: float, eps: float,
) -> list[Tensor]:
    """Adam's moments on the rotated gradients (in place) and the bias-corrected steps
    ``m̂ / (√v̂ + ε)`` in the eigenbasis, for units that share a step count: multi-tensor
    (``foreach``) ops, so the kernel launches do not grow with the number of units."""
    torch._foreach_lerp_(exp_avgs, rotated, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, rotated, rotated, value=1.0 - beta2)
    root2 = math.sqrt(1.0 - beta2**step)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, root2)
    torch._foreach_add_(denom, eps)
    directions = torch._foreach_div(exp_avgs, 1.0 - beta1**step)
    torch._foreach_div_(directions, denom)
    return list(directions)


def warn_eigh_failed(names: list[str]) -> None:
    """One warning for the layers whose eigendecomposition failed this refresh."""
    warnings.warn(
        "AdaFisher(variant='eigen'): the eigendecomposition of the factors of "
        f"{', '.join(names)} did not converge (also retried in float64); their previous "
        "eigenbasis is kept (the identity before the first), so the step is still well defined",
        stacklevel=4,
    )
