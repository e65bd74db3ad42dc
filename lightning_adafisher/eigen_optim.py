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


@dataclass(eq=False)
class _Unit:
    """One parameter preconditioned in an eigenbasis this step: a layer (its primary weight
    holds the state) or a gradient-factored parameter."""

    primary: Tensor
    group: dict[str, Any]
    layer: BoundLayer | None = None
    factored: GradientFactored | None = None


@dataclass(eq=False)
class _FoldUnit:
    """One unit's new factors this statistics step (``None``: a side kept diagonal)."""

    primary: Tensor
    a: Tensor | None
    g: Tensor | None
    present: Tensor | None = None
    """0-dim bool on the device when the counts live there: whether there were statistics."""
    counted: bool = True
    """Whether this fold adds one to ``factor_updates``."""


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
        parameter with a gradient; a unit whose factors hold inf/NaN keeps its old ones (checked
        on the device, all units in one multi-tensor reduction)."""
        gamma_of = {id(p): group["gamma"] for group in self.param_groups for p in group["params"]}
        scale = self.statistics_grad_scale
        names: list[str] = []
        counted_names: list[str] = []
        units: list[_FoldUnit] = []
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
            units.append(_FoldUnit(layer.primary, a, g, present, counted))
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
            units.append(_FoldUnit(unit.param, right, left))
            names.append(unit.name)
        if units:
            ok = eg.finite_units([(u.a, u.g) for u in units])
            self._fold_units(units, ok, gamma_of)
            self._report_skipped(names, [ok])
        else:
            self._report_skipped(names, [])
        self._check_first_statistics(layers, counted_names, "are trained by Adam in their own basis")

    def _fold_units(self, units: list[_FoldUnit], ok: Tensor, gamma_of: dict[int, float]) -> None:
        """Fold every unit's new factors into its state: the first ones as they are, the rest
        as EMAs batched per ``gamma`` (:func:`eigen.fold_covariances`). A unit folds where its
        factors are finite (``ok``) and, with device counts, where it had statistics at all."""
        batches: dict[float, list[tuple[dict[str, Any], str, Tensor, Tensor]]] = {}
        for i, unit in enumerate(units):
            state = self.state[unit.primary]
            gamma = gamma_of[id(unit.primary)]
            flag = ok[i] if unit.present is None else ok[i] & unit.present
            for key, new in ((FACTOR_H, unit.a), (FACTOR_S, unit.g)):
                if new is None:
                    continue
                if key not in state:
                    state[key] = eg.fold_covariance(None, new, gamma, flag)
                else:
                    batches.setdefault(gamma, []).append((state, key, new, flag))
            if unit.counted:
                state[FACTOR_UPDATES] = state.get(FACTOR_UPDATES, 0) + 1
        for gamma, items in batches.items():
            folded = eg.fold_covariances(
                [state[key] for state, key, _, _ in items], [new for _, _, new, _ in items], gamma,
                [flag for _, _, _, flag in items],
            )
            for (state, key, _, _), value in zip(items, folded):
                state[key] = value

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
        parameters, Adam for the rest (per param group).

        A unit (a layer, or a gradient-factored parameter) rotates its gradient in, updates its
        moments and rotates its step out. Where ``foreach`` is off (the CPU default) each unit
        does all three before the next starts, so one unit's temporaries are alive at a time;
        where it is on (the CUDA default) every unit is rotated in first, the moments of all
        units are updated with multi-tensor ops, and the parameters are written with one op per
        param group: a fixed number of kernel launches for the element-wise work, whatever the
        unit count, for the temporaries of all units at once.
        """
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        done: set[int] = set()
        units: list[_Unit] = []
        if self._collector is not None:
            for layer in self._collector.layers:
                roles = layer.params  # trained parameters only (filtered at attach)
                done.update(id(p) for p in roles.values())
                if any(p.grad is not None for p in roles.values()):
                    units.append(_Unit(layer.primary, group_of[id(layer.primary)], layer=layer))
        for factored in self._gradient_factored_params():
            done.add(id(factored.param))
            if factored.param.grad is not None:
                units.append(_Unit(factored.param, group_of[id(factored.param)], factored=factored))
        applies: list[tuple[Tensor, Tensor, dict[str, Any]]] = []
        batched = [u for u in units if self._use_foreach(u.group, u.primary)]
        for unit in units:
            if not self._use_foreach(unit.group, unit.primary):
                (direction,) = self._moments([unit], [self._rotate_in(unit, group_of)])
                self._rotate_out(unit, direction, group_of, applies)
                self._apply(applies)
        rotated = [self._rotate_in(unit, group_of) for unit in batched]
        for unit, direction in zip(batched, self._moments(batched, rotated)):
            self._rotate_out(unit, direction, group_of, applies)
        self._apply(applies)
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

    def _rotate_in(self, unit: _Unit, group_of: dict[int, dict[str, Any]]) -> Tensor:
        """``Q_Gᵀ ∇W Q_A`` of the unit's gradient matrix (its moments are created at its first
        step, whose count this advances)."""
        if unit.layer is not None:
            layer = unit.layer
            grads = {role: self._decayed_grad(p, group_of[id(p)]) for role, p in layer.params.items()}
            matrix = layer.helper.grad_matrix(layer.module, grads)
        else:
            assert unit.factored is not None
            matrix = self._decayed_grad(unit.primary, unit.group).view(unit.factored.shape)
        state = self.state[unit.primary]
        rotated = eg.rotate_in(matrix, state.get(EIGENBASIS_S), state.get(EIGENBASIS_H))
        if STEP not in state:
            state[STEP] = 0
            state[EIGEN_EXP_AVG] = torch.zeros_like(rotated)
            state[EIGEN_EXP_AVG_SQ] = torch.zeros_like(rotated)
        state[STEP] += 1
        return rotated

    def _moments(self, units: list[_Unit], rotated: list[Tensor]) -> list[Tensor]:
        """:func:`eigen.eigen_adam_moments` over the units, in batches that share
        hyper-parameters, step count, dtype and device; the steps in the units' order."""
        directions: list[Tensor] = list(rotated)
        batches: dict[tuple[Any, ...], list[int]] = {}
        for i, (unit, r) in enumerate(zip(units, rotated)):
            key = (unit.group["beta"], unit.group["beta2"], unit.group["eps"],
                   self.state[unit.primary][STEP], r.dtype, r.device)
            batches.setdefault(key, []).append(i)
        for (beta1, beta2, eps, step, _, _), indices in batches.items():
            states = [self.state[units[i].primary] for i in indices]
            out = eg.eigen_adam_moments(
                [rotated[i] for i in indices], [s[EIGEN_EXP_AVG] for s in states],
                [s[EIGEN_EXP_AVG_SQ] for s in states], step, beta1, beta2, eps,
            )
            for i, direction in zip(indices, out):
                directions[i] = direction
        return directions

    def _rotate_out(
        self, unit: _Unit, direction: Tensor, group_of: dict[int, dict[str, Any]],
        applies: list[tuple[Tensor, Tensor, dict[str, Any]]],
    ) -> None:
        """``Q_G U Q_Aᵀ``, split into the unit's parameters, appended to ``applies``."""
        state = self.state[unit.primary]
        step = eg.rotate_out(direction, state.get(EIGENBASIS_S), state.get(EIGENBASIS_H))
        if unit.layer is not None:
            layer = unit.layer
            parts = layer.helper.split_matrix(layer.module, step, layer.params)
            for role, p in layer.params.items():
                if p.grad is not None:
                    applies.append((p, parts[role], group_of[id(p)]))
        else:
            applies.append((unit.primary, step.view(unit.primary.shape), unit.group))

    @staticmethod
    def _use_foreach(group: dict[str, Any], p: Tensor) -> bool:
        """The group's ``foreach``; ``None`` means on CUDA only, as torch's optimizers do."""
        foreach = group.get("foreach")
        return p.is_cuda if foreach is None else bool(foreach)

    def _apply(self, applies: list[tuple[Tensor, Tensor, dict[str, Any]]]) -> None:
        """``p ← p·(1 − lr·wd) − lr·step`` (the decay only when decoupled) for every entry, one
        multi-tensor op per param group, dtype and device; empties the list."""
        batches: dict[tuple[Any, ...], list[tuple[Tensor, Tensor]]] = {}
        groups: dict[int, dict[str, Any]] = {}
        for p, step, group in applies:
            groups[id(group)] = group
            batches.setdefault((id(group), p.dtype, p.device), []).append((p, step.to(p.dtype)))
        applies.clear()
        for (gid, _, _), pairs in batches.items():
            lr, wd = groups[gid]["lr"], groups[gid]["weight_decay"]
            params = [p for p, _ in pairs]
            if self._decoupled and wd != 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_add_(params, [step for _, step in pairs], alpha=-lr)

    def _adam_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Adam (AdamW when decoupled) for the parameters without an eigenbasis; with
        ``foreach``, one multi-tensor op per line of the update for all parameters that share
        step count, dtype and device."""
        beta1, beta2, eps = group["beta"], group["beta2"], group["eps"]
        lr, wd = group["lr"], group["weight_decay"]
        batches: dict[tuple[Any, ...], list[Tensor]] = {}
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("AdaFisher does not support sparse gradients")
            state = self.state[p]
            if STEP not in state:
                state[STEP] = 0
                state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[EXP_AVG_SQ] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state[STEP] += 1
            if not self._use_foreach(group, p):
                batches.setdefault((None, id(p)), []).append(p)  # a batch of one
            else:
                batches.setdefault((state[STEP], p.dtype, p.device), []).append(p)
        for ps in batches.values():
            t = self.state[ps[0]][STEP]
            gs = [p.grad for p in ps]
            ms = [self.state[p][EXP_AVG] for p in ps]
            vs = [self.state[p][EXP_AVG_SQ] for p in ps]
            if group["maximize"]:
                gs = list(torch._foreach_neg(gs))
            if wd != 0:
                if self._decoupled:
                    torch._foreach_mul_(ps, 1.0 - lr * wd)
                else:
                    gs = list(torch._foreach_add(gs, ps, alpha=wd))
            torch._foreach_lerp_(ms, gs, 1.0 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, math.sqrt(1.0 - beta2**t))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, ms, denom, value=-lr / (1.0 - beta1**t))
