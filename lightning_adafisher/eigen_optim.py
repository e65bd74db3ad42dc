"""The bookkeeping of ``variant="eigen"``: fold full factors, refresh eigenbases, step.

A mixin of :class:`lightning_adafisher.optim.AdaFisher` (which owns ``state``, ``param_groups``,
the statistics hooks and the warnings); the math is in :mod:`lightning_adafisher.eigen` and the
exact numerics in ``docs/numerics.md``. Three kinds of parameters:

* **layers** (:class:`~lightning_adafisher.statistics.BoundLayer` with ``eigen_sides``): a
  Linear, ``Conv1D`` or Conv2d whose factors come from its inputs and output gradients;
* **gradient-factored parameters** (:class:`GradientFactored`): any other trained parameter
  that is a matrix once its singleton dims are dropped (embeddings, a tied output head, raw
  weights), with ``gradient_factors=True``: its factors are ``E[∇W ∇Wᵀ]`` and ``E[∇Wᵀ ∇W]``
  of its own gradient, as in Shampoo/SOAP;
* everything else (norm layers, biases outside a layer, vectors): Adam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from lightning_adafisher import eigen as eg
from lightning_adafisher import functional as fn
from lightning_adafisher.distributed import is_rank_zero
from lightning_adafisher.state_keys import (
    EIGEN_EXP_AVG, EIGEN_EXP_AVG_SQ, EIGEN_REFRESHED_AT, EIGENBASIS_H, EIGENBASIS_S, EXP_AVG,
    EXP_AVG_SQ, FACTOR_H, FACTOR_S, FACTOR_UPDATES, STEP,
)
from lightning_adafisher.statistics import BoundLayer, LayerStats

__all__ = ["EigenbasisSteps", "GradientFactored"]


def _mean(total: Tensor, count: float | Tensor) -> tuple[Tensor, Tensor | None]:
    """``total / count``, and for a count on the device (pooled over ranks, not read back)
    whether it is positive (a zero count divides by one instead: the fold keeps the factor).

    On CUDA a division by a Python number multiplies by its reciprocal; a device count does the
    same, so the result is bitwise that of dividing by the same count read back to the host."""
    if not isinstance(count, Tensor):
        return total / count, None
    present = count > 0
    divisor = torch.where(present, count, 1.0).to(total.dtype)
    return (total * divisor.reciprocal() if total.is_cuda else total / divisor), present


@dataclass(eq=False)
class GradientFactored:
    """A parameter preconditioned in the eigenbasis of its own gradient's factors."""

    name: str
    param: Tensor
    shape: tuple[int, int]
    """The matrix view ``[n_s, n_h]`` (the parameter with its singleton dims dropped)."""
    sides: tuple[bool, bool]
    """Whether the column (``h``) and row (``s``) sides keep a full factor (within the limit)."""


def matrix_shape(p: Tensor) -> tuple[int, int] | None:
    """``p``'s shape without singleton dims, if that is a matrix."""
    dims = [d for d in p.shape if d != 1]
    return (dims[0], dims[1]) if len(dims) == 2 else None


class EigenbasisSteps:
    """Mixin: the eigen variant's fold, refresh and update for :class:`AdaFisher`."""

    state: Any
    param_groups: list[dict[str, Any]]
    _collector: Any
    _binding: dict[int, Any]
    _decoupled: bool
    _checked_first_statistics: bool
    _gradient_factored: list[GradientFactored] | None
    statistics_grad_scale: float | Tensor

    # --- which parameters ------------------------------------------------------------------

    def _gradient_factored_params(self) -> list[GradientFactored]:
        """The gradient-factored parameters (computed once per attach/detach/new group)."""
        if self._gradient_factored is None:
            first = self.param_groups[0]
            found: list[GradientFactored] = []
            if first["gradient_factors"]:
                limit = first["max_factor_size"]
                names = getattr(self, "_parameter_names", {})
                for group in self.param_groups:
                    for p in group["params"]:
                        shape = matrix_shape(p)
                        if id(p) in self._binding or shape is None:
                            continue
                        sides = (shape[1] <= limit, shape[0] <= limit)
                        if any(sides):
                            name = names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")
                            found.append(GradientFactored(name, p, shape, sides))
            self._gradient_factored = found
        return self._gradient_factored

    def _eigen_units(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, primary parameter)`` of every layer and gradient-factored parameter."""
        if self._collector is not None:
            for layer in self._collector.layers:
                yield layer.name, layer.primary
        for unit in self._gradient_factored_params():
            yield unit.name, unit.param

    # --- fold ------------------------------------------------------------------------------

    def _fold_eigen(
        self, layers: list[BoundLayer], folded: list[tuple[BoundLayer, LayerStats, bool]]
    ) -> None:
        """EMA of the full factors ``A`` (``factor_h``) and ``G`` (``factor_s``) of every layer
        in ``folded`` (:meth:`AdaFisher._layers_to_fold`) and of every gradient-factored
        parameter with a gradient."""
        gamma_of = {id(p): group["gamma"] for group in self.param_groups for p in group["params"]}
        scale = self.statistics_grad_scale
        names: list[str] = []
        counted_names: list[str] = []
        flags: list[Tensor] = []
        for layer, stats, counted in folded:
            assert stats.h_total is not None and stats.s_total is not None and layer.eigen_sides
            a, h_present = _mean(stats.h_total, stats.h_count)
            g, s_present = _mean(stats.s_total, stats.s_count)
            present = None if h_present is None or s_present is None else h_present & s_present
            if isinstance(scale, Tensor) or scale != 1.0:
                g = g / (scale * scale)
            n_h, n_s = layer.helper.factor_sizes(layer.module)
            a = a.view(n_h, n_h) if layer.eigen_sides[0] else None
            if a is not None and n_h > self._eigen_columns(layer):  # frozen bias: drop its entry
                a = a[:-1, :-1]
            g = g.view(n_s, n_s) if layer.eigen_sides[1] else None
            flags.append(self._fold_pair(layer.primary, a, g, gamma_of[id(layer.primary)], present, counted))
            names.append(layer.name)
            if counted:
                counted_names.append(layer.name)
        for unit in self._gradient_factored_params():
            grad = unit.param.grad
            if grad is None:
                continue
            m = grad.to(fn.stats_dtype(grad.dtype)).view(unit.shape)
            with fn._autocast_off():
                right = m.T @ m if unit.sides[0] else None  # E[∇Wᵀ∇W]: the column side
                left = m @ m.T if unit.sides[1] else None  # E[∇W∇Wᵀ]: the row side
            flags.append(self._fold_pair(unit.param, right, left, gamma_of[id(unit.param)]))
            names.append(unit.name)
        self._report_skipped(names, flags)
        self._check_first_statistics(layers, counted_names, "are trained by Adam in their own basis")

    def _fold_pair(
        self, primary: Tensor, a: Tensor | None, g: Tensor | None, gamma: float,
        present: Tensor | None = None, counted: bool = True,
    ) -> Tensor:
        """Fold one unit's factors; returns whether its statistics were finite. ``present`` (a
        0-dim bool tensor, counts on the device): where false the factors stay as they are.
        ``counted``: add one to ``factor_updates``."""
        state = self.state[primary]
        # one reduction per factor: a sum holding inf/NaN is not finite (an overflow of the sum
        # itself, past 3e38, would mean statistics no fold should take either)
        sums = [f.sum() for f in (a, g) if f is not None]  # at least one side is kept
        ok = torch.isfinite(sums[0] + sums[1] if len(sums) == 2 else sums[0])
        fold = ok if present is None else ok & present
        if a is not None:
            state[FACTOR_H] = eg.fold_covariance(state.get(FACTOR_H), a, gamma, fold)
        if g is not None:
            state[FACTOR_S] = eg.fold_covariance(state.get(FACTOR_S), g, gamma, fold)
        if counted:
            state[FACTOR_UPDATES] = state.get(FACTOR_UPDATES, 0) + 1
        return ok.reshape(1)

    @staticmethod
    def _eigen_columns(layer: BoundLayer) -> int:
        """``n_h'``: input-side size of the layer's matrix (the bias column only if trained)."""
        n_h, _ = layer.helper.factor_sizes(layer.module)
        has_bias_entry = getattr(layer.module, "bias", None) is not None
        return n_h - (has_bias_entry and "bias" not in layer.params)

    # --- refresh ---------------------------------------------------------------------------

    def _refresh_eigenbases(self, t: int) -> None:
        """Recompute the eigenbasis of every unit whose factors were folded since its last
        refresh, on steps ``t`` with ``(t − 1) % eigen_interval == 0`` (at once for a unit that
        has none yet); re-express its first moment in the new basis."""
        due = (t - 1) % self.param_groups[0]["eigen_interval"] == 0
        failed: list[str] = []
        for name, primary in self._eigen_units():
            state = self.state[primary]
            updates = state.get(FACTOR_UPDATES, 0)
            if updates == 0 or updates == state.get(EIGEN_REFRESHED_AT, 0):
                continue
            if not due and (EIGENBASIS_H in state or EIGENBASIS_S in state):
                continue
            new: dict[str, Tensor | None] = {}
            for key, basis in ((FACTOR_H, EIGENBASIS_H), (FACTOR_S, EIGENBASIS_S)):
                if key not in state:
                    new[basis] = None
                    continue
                q, ok = eg.eigenbasis(state[key], state.get(basis))
                if not ok:
                    failed.append(f"{name}.{key}")
                new[basis] = q
            if EIGEN_EXP_AVG in state:
                state[EIGEN_EXP_AVG] = eg.change_basis(
                    state[EIGEN_EXP_AVG], state.get(EIGENBASIS_S), new[EIGENBASIS_S],
                    state.get(EIGENBASIS_H), new[EIGENBASIS_H],
                )
            for basis, q in new.items():
                if q is not None:
                    state[basis] = q
            state[EIGEN_REFRESHED_AT] = updates
        if failed and is_rank_zero():
            eg.warn_eigh_failed(failed)

    # --- update ----------------------------------------------------------------------------

    def _update_eigen(self) -> None:
        """One step of every parameter: Adam in the eigenbasis for layers and gradient-factored
        parameters, Adam for the rest (per param group)."""
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        done: set[int] = set()
        if self._collector is not None:
            for layer in self._collector.layers:
                roles = layer.params  # trained parameters only (filtered at attach)
                done.update(id(p) for p in roles.values())
                if not any(p.grad is not None for p in roles.values()):
                    continue
                grads = {role: self._decayed_grad(p, group_of[id(p)]) for role, p in roles.items()}
                matrix = layer.helper.grad_matrix(layer.module, grads)
                direction = self._eigen_direction(layer.primary, matrix, group_of[id(layer.primary)])
                parts = layer.helper.split_matrix(layer.module, direction, roles)
                for role, p in roles.items():
                    if p.grad is not None:
                        self._apply(p, parts[role], group_of[id(p)])
        for unit in self._gradient_factored_params():
            p = unit.param
            done.add(id(p))
            if p.grad is not None:
                grad = self._decayed_grad(p, group_of[id(p)]).view(unit.shape)
                direction = self._eigen_direction(p, grad, group_of[id(p)])
                self._apply(p, direction.view(p.shape), group_of[id(p)])
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and id(p) not in done]
            self._adam_step(group, params)

    def _decayed_grad(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        """``p``'s gradient (negated with ``maximize``) in the statistics dtype, with
        AdaFisher's coupled decay added (zeros for a parameter of a layer that got no gradient
        this step)."""
        if p.grad is None:
            return torch.zeros_like(p, dtype=fn.stats_dtype(p.dtype))
        if p.grad.is_sparse:
            raise RuntimeError("AdaFisher does not support sparse gradients")
        grad = torch.neg(p.grad) if group["maximize"] else p.grad
        if not self._decoupled and group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        return grad.to(fn.stats_dtype(p.dtype))

    def _eigen_direction(self, primary: Tensor, matrix: Tensor, group: dict[str, Any]) -> Tensor:
        """Rotate in, update Adam's moments in the eigenbasis, rotate the step back (``group``:
        the primary parameter's, whose ``beta``, ``beta2``, ``eps`` apply)."""
        state = self.state[primary]
        q_h, q_s = state.get(EIGENBASIS_H), state.get(EIGENBASIS_S)
        rotated = eg.rotate_in(matrix, q_s, q_h)
        if STEP not in state:
            state[STEP] = 0
            state[EIGEN_EXP_AVG] = torch.zeros_like(rotated)
            state[EIGEN_EXP_AVG_SQ] = torch.zeros_like(rotated)
        state[STEP] += 1
        direction = eg.eigen_adam_moments(
            rotated, state[EIGEN_EXP_AVG], state[EIGEN_EXP_AVG_SQ], state[STEP],
            group["beta"], group["beta2"], group["eps"],
        )
        return eg.rotate_out(direction, q_s, q_h)

    def _apply(self, p: Tensor, direction: Tensor, group: dict[str, Any]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if self._decoupled and wd != 0:
            p.mul_(1.0 - lr * wd)
        p.add_(direction.to(p.dtype), alpha=-lr)

    def _adam_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Adam (AdamW when decoupled) for the parameters without an eigenbasis."""
        beta1, beta2, eps = group["beta"], group["beta2"], group["eps"]
        lr, wd = group["lr"], group["weight_decay"]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("AdaFisher does not support sparse gradients")
            state = self.state[p]
            if STEP not in state:
                state[STEP] = 0
                state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[EXP_AVG_SQ] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state[STEP] += 1
            g = torch.neg(p.grad) if group["maximize"] else p.grad
            if wd != 0:
                if self._decoupled:
                    p.mul_(1.0 - lr * wd)
                else:
                    g = g.add(p, alpha=wd)
            t = state[STEP]
            m, v = state[EXP_AVG], state[EXP_AVG_SQ]
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = (v.sqrt() / math.sqrt(1.0 - beta2**t)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1.0 - beta1**t))
