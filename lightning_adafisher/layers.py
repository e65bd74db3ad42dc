"""One small helper per supported module type, and the registry that finds them.

A :class:`LayerHelper` tells AdaFisher four things about a module type: which of its parameters
get Kronecker factors, how long the factors are, how to turn the module's input ``x`` and output
gradient ``G`` into raw statistics, and how to read a parameter's Fisher diagonal off the
normalised factors. The registry is an ``isinstance`` lookup (subclasses such as
``NonDynamicallyQuantizableLinear`` are found through their base); the most recently registered
matching type wins, so users can override the built-ins or add their own::

    from lightning_adafisher import LayerHelper, register_layer_helper

    class MyLinearHelper(LayerHelper): ...
    register_layer_helper(MyLinear, MyLinearHelper())

``transformers``' ``Conv1D`` (GPT-1/GPT-2 projections, weight ``[in, out]``) gets a helper as soon
as ``transformers`` has been imported. Modules with no helper keep the identity preconditioner (see :mod:`lightning_adafisher.optim`).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Callable

import torch
from torch import Tensor, nn

from lightning_adafisher import compat
from lightning_adafisher import eigen as eg
from lightning_adafisher import functional as fn

__all__ = [
    "LayerHelper",
    "LinearHelper",
    "Conv2dHelper",
    "BatchNormHelper",
    "LayerNormHelper",
    "EmbeddingHelper",
    "TransposedLinearHelper",
    "register_layer_helper",
    "layer_helper_for",
]


class LayerHelper:
    """How AdaFisher reads one module type. Subclass and register for custom layers.

    ``variant`` arguments are ``"paper"`` or ``"reference"``; statistics are returned as
    ``(total, count)`` pairs (see :mod:`lightning_adafisher.functional`).
    """

    roles: tuple[str, ...] = ("weight", "bias")
    """Attribute names of the module's parameters that get factors."""

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The module's own factored parameters that exist (affine-free norms have none)."""
        found = {}
        for role in self.roles:
            p = getattr(module, role, None)
            if isinstance(p, nn.Parameter):
                found[role] = p
        return found

    def check(self, module: nn.Module) -> None:
        """Raise ``ValueError`` for a configuration this helper cannot handle."""

    def factor_sizes(self, module: nn.Module) -> tuple[int, int]:
        """Lengths of ``H`` and ``S``."""
        raise NotImplementedError

    def input_stats(self, module: nn.Module, x: Tensor, variant: str) -> tuple[Tensor, float]:
        """Raw input-side statistic ``h`` of one call, as ``(total, count)``."""
        raise NotImplementedError

    def input_stats_in_hook(
        self, module: nn.Module, x: Tensor, variant: str
    ) -> tuple[Tensor | Callable[[], Tensor] | fn.WithEntry, float]:
        """:meth:`input_stats` as the forward hook calls it: the total may be a zero-argument
        function that finishes it at the optimizer step, once the pass over ``x`` is done
        (fewer ops inside hooks, where each costs tens of µs on CPU; docs/performance.md), or
        a :class:`functional.WithEntry`, whose last entry is appended at the step together
        with every other layer's."""
        return self.input_stats(module, x, variant)

    def output_stats(self, module: nn.Module, g: Tensor, variant: str) -> tuple[Tensor, float]:
        """Raw output-side statistic ``s`` of one call, as ``(total, count)``."""
        raise NotImplementedError

    def output_stats_in_hook(
        self, module: nn.Module, g: Tensor, variant: str
    ) -> tuple[Tensor | fn.ColumnSum, float]:
        """:meth:`output_stats` as the gradient hook calls it: the total may be a
        :class:`functional.ColumnSum`, summed over the batch at the step together with every
        other layer's."""
        return self.output_stats(module, g, variant)

    h_from_saved_mean: bool = False
    """Whether :meth:`saved_mean_layout` can say how ``h`` follows from the mean the layer's
    kernel saves for backward (the collector then skips the pass over ``x``)."""

    def saved_mean_layout(self, module: nn.Module, x_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int] | None:
        """``(shape of the saved mean, entries of x per mean)`` for an input of ``x_shape``, or
        ``None`` when ``h`` does not follow from it (see
        :func:`functional.norm_input_stats_from_mean`); only with :attr:`h_from_saved_mean`."""
        return None

    s_from_bias_grad: bool = False
    """Whether :meth:`output_stats_from_bias_grad` gives ``s`` (the collector then reads the
    bias gradient the layer's backward computes anyway instead of the output gradient ``G``)."""

    s_from_bias_grad_batched: bool = False
    """Whether :meth:`output_stats_from_bias_grad` is exactly
    :func:`functional.norm_output_stats_from_bias_grad`: the collector then finishes ``s`` of all
    such layers in one batched op at the step instead of calling the method per layer. A
    subclass that overrides the method must set this back to ``False``."""

    def output_stats_from_bias_grad(
        self, module: nn.Module, grad_bias: Tensor, batch: int
    ) -> tuple[Tensor, float]:
        """``s`` of one call from that call's gradient w.r.t. ``module.bias`` alone (``batch``:
        the output's leading dim); only for helpers with :attr:`s_from_bias_grad`."""
        raise NotImplementedError

    def kron_factors(
        self, module: nn.Module, role: str, param: Tensor, h_norm: Tensor, s_norm: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(rows, cols)`` with ``F = rows⊗cols + λ`` over ``param`` viewed as
        ``[-1, len(cols)]`` (see :class:`functional.KronFactors`). Default: a weight
        ``[out, in...]`` has ``(S', H'[:in])``, a bias ``(S', H'[-1:])``."""
        if role == "bias":
            return s_norm, h_norm[-1:]
        return s_norm, h_norm[: param[0].numel()]

    kronecker_form: bool = True
    """Whether ``F = rows⊗cols + λ`` with :meth:`kron_factors`' vectors (the update then never
    materialises ``F``). A helper that overrides :meth:`denominator` for an ``F`` without that
    form must set this to ``False``; the update then calls :meth:`denominator`."""

    def denominator(
        self, module: nn.Module, role: str, param: Tensor, h_norm: Tensor, s_norm: Tensor,
        damping: float,
    ) -> Tensor:
        """The Fisher diagonal ``F`` of ``param`` (same shape), from normalised factors.

        Override :meth:`kron_factors` when ``F`` has the Kronecker form (the update then never
        materialises it); override this, and set :attr:`kronecker_form` to ``False``, only for
        an ``F`` that has not.
        """
        rows, cols = self.kron_factors(module, role, param, h_norm, s_norm)
        return fn.KronFactors(rows, cols, damping).materialise(param.shape)

    # --- the eigenbasis variant (variant="eigen") ----------------------------------------------

    eigen: bool = False
    """Whether ``variant="eigen"`` can precondition this module type: the helper then views
    its parameters as one matrix ``[n_s, n_h]`` (:meth:`grad_matrix`) with full factors from
    :meth:`input_cov` / :meth:`output_cov`, ``(n_h, n_s)`` being :meth:`factor_sizes`. Types
    without it are trained by Adam in that variant."""

    def input_cov(self, module: nn.Module, x: Tensor) -> tuple[Tensor, float]:
        """``Σ ā āᵀ`` of one call, flattened, as ``(total, count)`` (only with :attr:`eigen`)."""
        raise NotImplementedError

    def output_cov(self, module: nn.Module, g: Tensor) -> tuple[Tensor, float]:
        """``Σ g gᵀ`` of one call, flattened, as ``(total, count)`` (only with :attr:`eigen`)."""
        raise NotImplementedError

    def grad_matrix(self, module: nn.Module, tensors: dict[str, Tensor]) -> Tensor:
        """The ``[n_s, n_h']`` matrix of per-parameter tensors (a weight ``[out, in...]`` then a
        bias column if ``"bias"`` is given; ``n_h'`` counts the bias only then)."""
        weight = tensors["weight"]
        matrix = weight.reshape(weight.shape[0], -1)
        if "bias" in tensors:
            matrix = torch.cat([matrix, tensors["bias"].reshape(-1, 1).to(matrix.dtype)], 1)
        return matrix

    def split_matrix(
        self, module: nn.Module, matrix: Tensor, params: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Inverse of :meth:`grad_matrix`: one tensor per role of ``params``, shaped like it."""
        weight = params["weight"]
        cols = weight[0].numel()
        out = {"weight": matrix[:, :cols].reshape(weight.shape)}
        if "bias" in params:
            out["bias"] = matrix[:, cols]
        return out


class LinearHelper(LayerHelper):
    """``nn.Linear`` and subclasses; any number of leading dims (tokens count as rows)."""

    def factor_sizes(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features + (module.bias is not None), module.out_features

    def input_stats(self, module: nn.Module, x: Tensor, variant: str) -> tuple[Tensor, float]:
        return fn.linear_input_stats(x, bias=module.bias is not None)  # type: ignore[return-value]

    def input_stats_in_hook(
        self, module: nn.Module, x: Tensor, variant: str
    ) -> tuple[Tensor | Callable[[], Tensor] | fn.WithEntry, float]:
        # Layers reading the same input share one pass over it (fn._square_sum); the ones
        # column's entries of all layers are appended in one op at the step.
        return fn.linear_input_stats(x, bias=module.bias is not None, reuse=True, deferred=True)

    def output_stats(self, module: nn.Module, g: Tensor, variant: str) -> tuple[Tensor, float]:
        return fn.linear_output_stats(g)

    eigen = True

    def input_cov(self, module: nn.Module, x: Tensor) -> tuple[Tensor, float]:
        return eg.linear_input_cov(x, bias=module.bias is not None)

    def output_cov(self, module: nn.Module, g: Tensor) -> tuple[Tensor, float]:
        return eg.linear_output_cov(g)


class Conv2dHelper(LayerHelper):
    """``nn.Conv2d``: stride, dilation, groups, every padding (``'same'``, every padding mode)."""

    def check(self, module: nn.Module) -> None:
        if module.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"Unsupported Conv2d padding_mode: {module.padding_mode!r}")

    def factor_sizes(self, module: nn.Module) -> tuple[int, int]:
        kh, kw = module.kernel_size
        cols = module.in_channels // module.groups * kh * kw
        return cols + (module.bias is not None), module.out_channels

    def input_stats(self, module: nn.Module, x: Tensor, variant: str) -> tuple[Tensor, float]:
        return self._input_stats(module, x, variant, deferred=False)  # type: ignore[return-value]

    def input_stats_in_hook(
        self, module: nn.Module, x: Tensor, variant: str
    ) -> tuple[Tensor | Callable[[], Tensor], float]:
        return self._input_stats(module, x, variant, deferred=True)

    def _input_stats(
        self, module: nn.Module, x: Tensor, variant: str, deferred: bool
    ) -> tuple[Tensor | Callable[[], Tensor], float]:
        return fn.conv2d_input_stats(
            x,
            module.kernel_size,
            module.stride,
            module.dilation,
            fn.conv2d_padding(module.padding, module.kernel_size, module.dilation),
            module.padding_mode,
            module.groups,
            bias=module.bias is not None,
            reference_normaliser=variant == "reference",
            deferred=deferred,
            reuse=deferred,  # both mean "called from the forward hook"
        )

    def output_stats(self, module: nn.Module, g: Tensor, variant: str) -> tuple[Tensor, float]:
        return fn.conv2d_output_stats(g)  # type: ignore[return-value]

    def output_stats_in_hook(
        self, module: nn.Module, g: Tensor, variant: str
    ) -> tuple[Tensor | fn.ColumnSum, float]:
        return fn.conv2d_output_stats(g, deferred=True)

    eigen = True

    def input_cov(self, module: nn.Module, x: Tensor) -> tuple[Tensor, float]:
        return eg.conv2d_input_cov(
            x, module.kernel_size, module.stride, module.dilation,
            fn.conv2d_padding(module.padding, module.kernel_size, module.dilation),
            module.padding_mode, module.groups, bias=module.bias is not None,
        )

    def output_cov(self, module: nn.Module, g: Tensor) -> tuple[Tensor, float]:
        return eg.conv2d_output_cov(g)


class BatchNormHelper(LayerHelper):
    """``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` with affine parameters."""

    def factor_sizes(self, module: nn.Module) -> tuple[int, int]:
        return 2, module.num_features

    def input_stats(self, module: nn.Module, x: Tensor, variant: str) -> tuple[Tensor, float]:
        return fn.batchnorm_input_stats(x)

    def output_stats(self, module: nn.Module, g: Tensor, variant: str) -> tuple[Tensor, float]:
        return fn.batchnorm_output_stats(g)

    # y = x̂·w + b per channel: the bias gradient of a call is that call's Σ G over all dims but
    # the channel's, which is all s needs; and h needs only Σx per channel, which the kernel's
    # saved mean holds (docs/performance.md#norm-layers-read-from-their-kernel).
    s_from_bias_grad = True
    s_from_bias_grad_batched = True
    h_from_saved_mean = True

    def saved_mean_layout(self, module: nn.Module, x_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int] | None:
        if len(x_shape) < 2:
            return None
        return (x_shape[1],), x_shape[0] * math.prod(x_shape[2:])

    def output_stats_from_bias_grad(
        self, module: nn.Module, grad_bias: Tensor, batch: int
    ) -> tuple[Tensor, float]:
        return fn.norm_output_stats_from_bias_grad(grad_bias, batch)

    def kron_factors(
        self, module: nn.Module, role: str, param: Tensor, h_norm: Tensor, s_norm: Tensor
    ) -> tuple[Tensor, Tensor]:
        # weight: S'·H'[0] + λ, bias: S'·H'[1] + λ, with S' on the last dim
        return (h_norm[1:2] if role == "bias" else h_norm[0:1]), s_norm


class LayerNormHelper(BatchNormHelper):
    """``nn.LayerNorm`` (affine, bias-free or affine-free)."""

    def factor_sizes(self, module: nn.Module) -> tuple[int, int]:
        return 2, module.normalized_shape[-1]

    def input_stats(self, module: nn.Module, x: Tensor, variant: str) -> tuple[Tensor, float]:
        return fn.layernorm_input_stats(x)

    def saved_mean_layout(self, module: nn.Module, x_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int] | None:
        k = len(module.normalized_shape)
        if len(x_shape) - k < 2:  # dim 1 is normalised: its sums are not in the row means
            return None
        return tuple(x_shape[:-k]) + (1,) * k, math.prod(module.normalized_shape)

    def output_stats(self, module: nn.Module, g: Tensor, variant: str) -> tuple[Tensor, float]:
        return fn.layernorm_output_stats(g)


class EmbeddingHelper(LayerHelper):
    """``nn.Embedding`` — an extension beyond the paper (its embeddings stay on the identity).

    An embedding lookup is a Linear layer applied to one-hot rows, so its Kronecker factors are
    ``h[v]`` = the frequency of token ``v`` among the batch's tokens (the mean of the one-hot
    squares) and ``s`` = the mean of ``G²`` over tokens. The weight is laid out ``[vocab, dim]``,
    i.e. input side first: ``F[v, d] = H'[v]·S'[d] + λ``.
    """

    roles = ("weight",)

    def factor_sizes(self, module: nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def input_stats(self, module: nn.Module, x: Tensor, variant: str) -> tuple[Tensor, float]:
        # Token counts by index_add_ into a fixed-size zeros: bincount would read the largest id
        # back to the host to size its output (a device sync on CUDA); same integers.
        ids = x.reshape(-1)
        dtype = fn.stats_dtype(module.weight.dtype)
        ones = fn._cached(_one, dtype, ids.device).expand(ids.numel())
        counts = torch.zeros(module.num_embeddings, dtype=dtype, device=ids.device)
        return counts.index_add_(0, ids, ones), float(ids.numel())

    def output_stats(self, module: nn.Module, g: Tensor, variant: str) -> tuple[Tensor, float]:
        return fn.linear_output_stats(g)

    def kron_factors(
        self, module: nn.Module, role: str, param: Tensor, h_norm: Tensor, s_norm: Tensor
    ) -> tuple[Tensor, Tensor]:
        return h_norm, s_norm


@functools.lru_cache(maxsize=8)
def _one(dtype: torch.dtype, device: torch.device) -> Tensor:
    """A read-only 0-dim one (expanded, it is every token's count): made once, not per call."""
    return torch.ones((), dtype=dtype, device=device)


class TransposedLinearHelper(LinearHelper):
    """Linear layers whose weight is laid out ``[in, out]`` (``transformers``' ``Conv1D``, used
    by GPT-1/GPT-2): ``y = x @ W + b``. ``F[i, o] = H'[i]·S'[o] + λ``."""

    def factor_sizes(self, module: nn.Module) -> tuple[int, int]:
        d_in, d_out = module.weight.shape
        return d_in + (module.bias is not None), d_out

    def kron_factors(
        self, module: nn.Module, role: str, param: Tensor, h_norm: Tensor, s_norm: Tensor
    ) -> tuple[Tensor, Tensor]:
        return (h_norm[-1:] if role == "bias" else h_norm[: param.shape[0]]), s_norm

    def grad_matrix(self, module: nn.Module, tensors: dict[str, Tensor]) -> Tensor:
        return super().grad_matrix(module, dict(tensors, weight=tensors["weight"].T))

    def split_matrix(
        self, module: nn.Module, matrix: Tensor, params: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        out = super().split_matrix(module, matrix, dict(params, weight=params["weight"].T))
        out["weight"] = out["weight"].T
        return out


_BATCHNORM_HELPER = BatchNormHelper()
_REGISTRY: list[tuple[type[nn.Module], LayerHelper]] = [
    (nn.Linear, LinearHelper()),
    (nn.Conv2d, Conv2dHelper()),
    *((bn, _BATCHNORM_HELPER) for bn in compat.batchnorm_types()),
    (nn.LayerNorm, LayerNormHelper()),
    (nn.Embedding, EmbeddingHelper()),
]
_OPTIONAL_DONE: set[str] = set()


def _register_optional_helpers() -> None:
    """Helpers for layer types of optional libraries, registered once the library is imported
    (a model built from it implies it is), so this module never imports them itself."""
    if "transformers" not in _OPTIONAL_DONE and "transformers.pytorch_utils" in sys.modules:
        _OPTIONAL_DONE.add("transformers")
        conv1d = getattr(sys.modules["transformers.pytorch_utils"], "Conv1D", None)
        if isinstance(conv1d, type) and issubclass(conv1d, nn.Module):
            _REGISTRY.append((conv1d, TransposedLinearHelper()))


def register_layer_helper(module_type: type[nn.Module], helper: LayerHelper) -> None:
    """Use ``helper`` for ``module_type`` and its subclasses (takes precedence over earlier ones)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(helper, LayerHelper):
        raise TypeError(f"helper must be a LayerHelper instance, got {helper!r}")
    _REGISTRY.insert(0, (module_type, helper))


def layer_helper_for(module: nn.Module) -> LayerHelper | None:
    """The helper of the most recently registered type ``module`` is an instance of, or None."""
    _register_optional_helpers()
    for module_type, helper in _REGISTRY:
        if isinstance(module, module_type):
            return helper
    return None
