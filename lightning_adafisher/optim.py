"""``AdaFisher`` and ``AdaFisherW``: bookkeeping around :mod:`lightning_adafisher.functional`.

The optimizer owns a :class:`~lightning_adafisher.statistics.StatisticsCollector` once it is
attached to a model (``AdaFisher(model)`` attaches at construction, ``AdaFisher(params)`` waits
for :meth:`AdaFisher.attach` or :class:`~lightning_adafisher.AdaFisherCallback`). Every piece of
state lives in ``optimizer.state`` so ``state_dict()`` checkpoints it and Lightning moves it:

* ``state[p]``: ``step`` (int, the parameter's own update count) and ``exp_avg`` (first moment);
* ``state[primary parameter of a layer]`` additionally: ``factor_h``, ``factor_s`` (the folded
  Kronecker factor vectors) and ``factor_updates`` (how many statistics steps were folded);
* ``state["adafisher"]``: optimizer-wide counters, ``steps`` (optimizer steps taken, which fixes
  the phase of ``update_interval``) and ``skipped_statistics`` (per layer name).
"""

from __future__ import annotations

import copy
import numbers
import os
import sys
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_adafisher import fsdp
from lightning_adafisher import functional as fn
from lightning_adafisher.distributed import is_rank_zero
from lightning_adafisher.eigen_optim import EigenbasisSteps, matrix_shape
from lightning_adafisher.layers import layer_helper_for
from lightning_adafisher.state_keys import (  # re-exported: named once
    _STATS_DTYPE_KEYS, EIGEN_EXP_AVG, EIGEN_EXP_AVG_SQ, EIGENBASIS_H, EIGENBASIS_S, EXP_AVG,
    EXP_AVG_SQ, FACTOR_H, FACTOR_S, FACTOR_UPDATES, GLOBAL, GLOBAL_SKIPPED, GLOBAL_SKIPPED_STEPS,
    GLOBAL_STEPS, STEP,
)
from lightning_adafisher.statistics import BoundLayer, LayerStats, StatisticsCollector

__all__ = ["AdaFisher", "AdaFisherW", "VARIANTS"]

VARIANTS = ("paper", "reference", "eigen")
DEFAULT_LR = {"eigen": 3e-3, "paper": 1e-3, "reference": 1e-3}
"""``lr=None`` means this, per variant: the paper's 1e-3 for its variants; for the eigenbasis
variant (Adam-like steps) the value that beat tuned AdamW on every workload of ``bench quality``
untuned (docs/benchmarks.md)."""

_SAME_IN_ALL_GROUPS = (
    "variant", "update_interval", "eigen_interval", "max_factor_size", "gradient_factors",
    "skip_nonfinite_steps",
)
"""Hyperparameters that fix the statistics' schedule and layout: one value for the optimizer."""
_LATER_DEFAULTS = dict(
    beta2=0.95, eps=1e-8, eigen_interval=10, max_factor_size=2048, gradient_factors=True,
    foreach=None, fused=False, maximize=False, skip_nonfinite_steps=False,
)
"""Hyperparameters added after the first release: a checkpoint without them gets these."""
_FIRST_KEYS = ("lr", "beta", "gamma", "damping", "weight_decay", "update_interval", "variant")
"""Hyperparameters every AdaFisher checkpoint holds: without them, the state is another
optimizer's."""

StatisticsReducer = Callable[[list[BoundLayer], dict[str, LayerStats]], dict[str, LayerStats]]

_ALGORITHM = r"""
    .. code-block:: text

        input: lr α, beta β, gamma γ, damping λ, weight_decay κ, update_interval k, variant
        for t = 1, 2, ...:
            if (t − 1) mod k == 0:                        # statistics step
                for each supported layer: h, s ← raw statistics of the step's forward/backward
                    paper:      H ← h (first time) else γH + (1−γ)h;     H' ← minmax(H)
                    reference:  H ← 1 (first time);  H ← 0.1γH + 0.01γ·minmax_ε(h);  H' ← H
                    (same for S; a step whose statistics hold inf/NaN leaves H, S unchanged)
            for each parameter p with gradient g:
                F ← S'[o]·H'[i] + λ   (identity: 1 + λ paper, 1 reference)
                {coupled_decay}m ← βm + (1−β)g
                p ← p − α·{update}
"""


_INTERNAL_PACKAGES = ("torch", "lightning", "lightning_fabric", "pytorch_lightning")


def _caller_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in :func:`warn`) of the first frame outside
    this package, torch and Lightning: the user's line, through ``torch.no_grad``'s and the
    LR schedulers' ``step`` wrappers and Lightning's loop alike."""
    prefixes = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
    for name in _INTERNAL_PACKAGES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            prefixes.append(os.path.dirname(os.path.abspath(module.__file__)) + os.sep)
    try:
        level, frame = 2, sys._getframe(2)  # the caller of warn()
    except (AttributeError, ValueError):  # an interpreter without frame access
        return 2
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(tuple(prefixes)):
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str) -> None:
    """The optimizer's warnings: on rank zero only, attributed to the user's line."""
    if is_rank_zero():
        warnings.warn(message, UserWarning, stacklevel=_caller_stacklevel())


_REAL_HYPERPARAMETERS = ("lr", "beta", "gamma", "damping", "weight_decay", "beta2", "eps")


def _check_hyperparameters(group: dict[str, Any]) -> None:
    for key in _REAL_HYPERPARAMETERS:
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"Invalid {key}: {value!r} (expected a real number)")
    lr, beta, gamma, damping = group["lr"], group["beta"], group["gamma"], group["damping"]
    wd, interval, variant = group["weight_decay"], group["update_interval"], group["variant"]
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"Invalid beta: {beta} (expected 0 <= beta < 1)")
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"Invalid gamma: {gamma} (expected 0 <= gamma < 1)")
    if not damping > 0.0:
        raise ValueError(f"Invalid damping: {damping} (expected damping > 0)")
    if not 0.0 <= wd:
        raise ValueError(f"Invalid weight_decay: {wd}")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"Invalid update_interval: {interval!r} (expected an integer >= 1)")
    if not isinstance(group["gradient_factors"], bool):
        raise ValueError(f"Invalid gradient_factors: {group['gradient_factors']!r} (expected True or False)")
    for key in ("fused", "maximize", "skip_nonfinite_steps"):
        if not isinstance(group.get(key, False), bool):
            raise ValueError(f"Invalid {key}: {group[key]!r} (expected True or False)")
    if variant not in VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r} (expected 'paper', 'reference' or 'eigen')")
    beta2, eps = group["beta2"], group["eps"]
    eigen_interval, max_size = group["eigen_interval"], group["max_factor_size"]
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta2: {beta2} (expected 0 <= beta2 < 1)")
    if not eps > 0.0:
        raise ValueError(f"Invalid eps: {eps} (expected eps > 0)")
    if isinstance(eigen_interval, bool) or not isinstance(eigen_interval, int) or eigen_interval < 1:
        raise ValueError(f"Invalid eigen_interval: {eigen_interval!r} (expected an integer >= 1)")
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
        raise ValueError(f"Invalid max_factor_size: {max_size!r} (expected an integer >= 0)")
    if variant == "eigen" and group.get("fused", False):
        raise ValueError("Invalid fused: True is not supported with variant='eigen'")


def _divisors(
    pieces: fn.Segments, counts: list[float | Tensor], dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """Every element's count, for a flat fold ``[h₁, s₁, h₂, s₂, ...]``, and per layer whether
    both its counts are positive (``None`` for host counts, which the caller already checked).

    Counts on the device (pooled over data-parallel ranks) are not read back: a zero count is
    replaced by one (the layer's totals are zeros too) and the layer is masked out of the fold.
    A positive count is used as it is, so the quotient is bitwise the host count's.
    """
    if not any(isinstance(c, Tensor) for c in counts):
        return pieces.constants(counts, dtype), None  # type: ignore[arg-type]
    per_piece = torch.stack([
        c.to(device=pieces.device, dtype=dtype) if isinstance(c, Tensor)
        else torch.tensor(c, dtype=dtype).to(pieces.device, non_blocking=True) for c in counts
    ])
    positive = per_piece > 0
    return pieces.spread(torch.where(positive, per_piece, 1.0)), positive.view(-1, 2).all(1)


class AdaFisher(EigenbasisSteps, Optimizer):
    r"""AdaFisher: Adam preconditioned by AdaFisher's Kronecker-factored Fisher.

    Gomes, Zhang & Ebrahimi, *AdaFisher: Adaptive Second Order Optimization via Fisher
    Information*, ICLR 2025. Three variants (exact numerics: ``docs/numerics.md``):

    * ``"eigen"`` (default): Adam run in the eigenbasis of the *full* Kronecker factors
      ``A = E[ā āᵀ]``, ``G = E[g gᵀ]`` of every Linear, ``Conv1D`` and Conv2d layer (matrix-shaped
      parameters outside them get the factors of their own gradient; the rest, Adam). Not in
      the paper; it is the variant that beats tuned AdamW (``docs/benchmarks.md``).
    * ``"paper"``: the paper's algorithm (Eq. 3–4), Adam's first moment divided by the
      min-max-normalised diagonal factors, as below.
    * ``"reference"``: the authors' released code, numerically.
    {algorithm}
    ``variant="eigen"``, per layer with gradient matrix ``∇W`` and factors folded like ``H``,
    ``S`` above but in full (``A ← γA + (1−γ)a``)::

        every eigen_interval steps: Q_A, Q_G ← eigenvectors of A, G;  m ← re-expressed
        R ← Q_Gᵀ ∇W Q_A;  m ← βm + (1−β)R;  v ← β₂v + (1−β₂)R∘R
        W ← W − α·(Q_G [m̂ / (√v̂ + ε)] Q_Aᵀ {eigen_decay})

    Args:
        params: an ``nn.Module`` (its statistics hooks are installed now) or an iterable of
            parameters / param groups (call :meth:`attach` or use ``AdaFisherCallback``).
        lr: learning rate ``α`` (default ``None``: 3e-3 for ``"eigen"``, 1e-3 for the others).
        beta: decay of the first moment ``β``.
        gamma: decay of the Kronecker factors ``γ`` (paper 0.92, released code 0.8).
        damping: Tikhonov damping ``λ`` added to the Fisher diagonal (not used by ``"eigen"``).
        weight_decay: ``κ``; {decay_doc}
        update_interval: statistics are gathered and folded on steps ``t`` with
            ``(t − 1) % update_interval == 0``; in between the factors are reused.
        variant: ``"eigen"``, ``"paper"`` (Eq. 3–4 of the paper) or ``"reference"`` (the
            authors' code).
        beta2: ``"eigen"``: decay of the second moment ``β₂`` (in the eigenbasis).
        eps: ``"eigen"``: ``ε`` added to ``√v̂``.
        eigen_interval: ``"eigen"``: the eigenbases are recomputed on steps ``t`` with
            ``(t − 1) % eigen_interval == 0`` (from the factors folded since the last time).
        max_factor_size: ``"eigen"``: a side longer than this keeps the identity (Adam there).
        gradient_factors: ``"eigen"``: matrix-shaped parameters outside supported layers
            (embeddings, a tied head) get factors from their own gradient; ``False``: Adam.
        foreach: use the multi-tensor update (default: on CUDA only, as torch does).
        fused: update the whole param group in one compiled call, one pass per parameter
            (``torch.compile``; the first step compiles; a new set of parameter shapes
            recompiles). Paper and reference variants only; see ``docs/performance.md``.
        maximize: maximise the objective (the update uses ``−g``; the statistics, squares of
            ``G``, and the gradient factors, ``g gᵀ``, do not depend on the sign).
        skip_nonfinite_steps: skip the whole step when any gradient holds inf/NaN, as
            ``GradScaler`` does (costs one read from the device per step; default off, when
            the check costs nothing).

    Non-finite *gradients* are left to the caller by default, as with every ``torch.optim``
    optimizer (``GradScaler`` skips such steps; ``skip_nonfinite_steps=True`` does it without
    one); non-finite *statistics* never reach the factors.

    Every param group also holds ``betas = (beta, beta2)``, Adam's name, which torch's
    schedulers write (``OneCycleLR``, ``CyclicLR`` with ``cycle_momentum``); it is reconciled
    with ``beta``/``beta2`` at each step, whichever of the two was written last winning.
    """

    _decoupled = False

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | None = None,
        beta: float = 0.9,
        gamma: float = 0.92,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        update_interval: int = 1,
        variant: str = "eigen",
        beta2: float = 0.95,
        eps: float = 1e-8,
        eigen_interval: int = 10,
        max_factor_size: int = 2048,
        gradient_factors: bool = True,
        *,
        foreach: bool | None = None,
        fused: bool = False,
        maximize: bool = False,
        skip_nonfinite_steps: bool = False,
    ) -> None:
        model = params if isinstance(params, nn.Module) else None
        if model is not None:
            params = [p for p in model.parameters() if p.requires_grad]
        if lr is None:
            lr = DEFAULT_LR.get(variant, DEFAULT_LR["paper"])
        defaults = dict(
            lr=lr, beta=beta, gamma=gamma, damping=damping, weight_decay=weight_decay,
            update_interval=update_interval, variant=variant, beta2=beta2, eps=eps,
            eigen_interval=eigen_interval, max_factor_size=max_factor_size,
            gradient_factors=gradient_factors, foreach=foreach, fused=fused,
            maximize=maximize, skip_nonfinite_steps=skip_nonfinite_steps, betas=(beta, beta2),
        )
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)
        self._collector: StatisticsCollector | None = None
        self._binding: dict[int, tuple[BoundLayer, str]] = {}
        self._gradient_factored = None  # eigen variant: found at the first step after (re)binding
        self._parameter_names: dict[int, str] = {}
        self._normalised: dict[int, tuple[Tensor, Tensor]] = {}
        self._kron_factors: dict[int, tuple[tuple[Tensor, Tensor], tuple[BoundLayer, str], float, fn.KronFactors]] = {}
        """Per parameter (by id): its ``F`` as last built, with the normalised factors, binding
        and damping it was built from (reused while all three are the same objects/values)."""
        self._ones: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._layouts: dict[tuple[tuple[int, ...], torch.device], tuple[fn.Segments, fn.Segments]] = {}
        self._workspace: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        """Scratch for one block of a weight's ``F`` at a time (single-tensor path; not state)."""
        self._synced_betas: dict[int, tuple[float, float]] = {id(g): g["betas"] for g in self.param_groups}
        """Per param group (by id): ``betas`` as last reconciled with ``beta``/``beta2``."""
        self._warned_unattached = False
        self._checked_first_statistics = False
        self.statistics_reducer: StatisticsReducer | None = None
        """Called with the pooled statistics of a step before folding (DDP all-reduce)."""
        self.defer_skip_check: bool | None = None
        """Read the non-finite-statistics flags one statistics step late instead of at once
        (default ``None``: on CUDA only, where reading them at once would sync the device)."""
        self._pending_check: tuple[list[str], Tensor, Any] | None = None
        self.statistics_grad_scale: float | Tensor = 1.0
        """Loss scale the gradients ``G`` carry (AMP); ``s`` is divided by its square."""
        self._loaded_factors: list[tuple[int, int, str, Tensor]] = []
        self.register_load_state_dict_pre_hook(AdaFisher._before_load_state_dict)
        self.register_load_state_dict_post_hook(AdaFisher._after_load_state_dict)
        self.register_state_dict_pre_hook(AdaFisher._before_state_dict)
        self.register_state_dict_post_hook(AdaFisher._copy_global_state)
        if model is not None:
            self.attach(model)

    # --- param groups -----------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        given = set(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "betas" in given and not given & {"beta", "beta2"}:
            group["beta"], group["beta2"] = group["betas"]  # a group written torch-style
        else:
            group["betas"] = (group["beta"], group["beta2"])
        try:
            _check_hyperparameters(group)
            fsdp.check_parameters(group["params"], group["variant"])
            first = self.param_groups[0]
            for key in _SAME_IN_ALL_GROUPS:
                if group[key] != first[key]:
                    raise ValueError(
                        f"Invalid {key}: {group[key]!r} differs between param groups "
                        f"({first[key]!r} in the first); it must be the same for all groups"
                    )
        except ValueError:
            self.param_groups.pop()
            raise
        self._gradient_factored = None
        if hasattr(self, "_synced_betas"):  # not yet during __init__ (set right after)
            self._synced_betas[id(group)] = group["betas"]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints written before these hyperparameters
            for key, value in _LATER_DEFAULTS.items():
                group.setdefault(key, value)
            group.setdefault("betas", (group["beta"], group["beta2"]))

    def _sync_betas(self) -> None:
        """Reconcile each group's ``betas`` with ``beta``/``beta2``: torch's schedulers
        (``OneCycleLR``, ``CyclicLR``) write ``betas[0]``, as for Adam; anything else writes
        ``beta``. Whichever changed since the last reconciliation wins."""
        for group in self.param_groups:
            betas, pair = tuple(group["betas"]), (group["beta"], group["beta2"])
            if betas != pair:
                if betas != self._synced_betas.get(id(group), pair):
                    group["beta"], group["beta2"] = betas
                else:
                    betas = pair
            group["betas"] = betas
            self._synced_betas[id(group)] = betas

    @property
    def variant(self) -> str:
        return self.param_groups[0]["variant"]

    @property
    def update_interval(self) -> int:
        return self.param_groups[0]["update_interval"]

    # --- attaching to a model -------------------------------------------------------------

    @property
    def collector(self) -> StatisticsCollector | None:
        """The statistics hooks, when attached."""
        return self._collector

    def attach(self, model: nn.Module) -> StatisticsCollector:
        """Install statistics hooks on every supported layer of ``model`` whose parameters
        this optimizer trains. Warns naming the parameters that keep the identity."""
        if self._collector is not None:
            raise RuntimeError(
                "AdaFisher is already attached to a model; call optimizer.detach() first"
            )
        trained = {id(p) for group in self.param_groups for p in group["params"]}
        layers: list[BoundLayer] = []
        claimed: dict[int, str] = {}
        eigen = self.variant == "eigen"
        limit = self.param_groups[0]["max_factor_size"]
        # nn.MultiheadAttention computes its output projection inside
        # F.multi_head_attention_forward, never through out_proj.forward: no hook would fire.
        never_called = {
            id(m.out_proj) for m in model.modules()
            if isinstance(m, nn.MultiheadAttention) and isinstance(getattr(m, "out_proj", None), nn.Module)
        }
        for name, module in model.named_modules():
            helper = layer_helper_for(module)
            if helper is None or (eigen and not helper.eigen) or id(module) in never_called:
                continue
            sides = None
            if eigen:
                n_h, n_s = helper.factor_sizes(module)
                sides = (n_h <= limit, n_s <= limit)
                if not any(sides):
                    continue  # both factors above the size limit: Adam
            params = {
                role: p
                for role, p in helper.parameters(module).items()
                if id(p) in trained and p.requires_grad
            }
            if not params:
                continue
            helper.check(module)
            shared = [role for role, p in params.items() if id(p) in claimed]
            for role in shared:
                warn(
                    f"AdaFisher: parameter {name}.{role} is shared with "
                    f"{claimed[id(params[role])]}; it gets factors from that layer only"
                )
                del params[role]
            if not params:
                continue
            layer = BoundLayer(name or type(module).__name__, module, helper, params, sides)
            layers.append(layer)
            for role, p in params.items():
                claimed[id(p)] = f"{layer.name}.{role}"
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        identity = [
            names.get(id(p), f"<parameter not in the model, shape {tuple(p.shape)}>")
            for group in self.param_groups
            for p in group["params"]
            if id(p) not in claimed
        ]
        out_proj = {
            names[id(p)] for m in model.modules() if id(m) in never_called
            for p in m.parameters() if id(p) in names
        }
        why = [n for n in identity if n in out_proj]
        detail = (
            f"{', '.join(why)}: nn.MultiheadAttention never calls its out_proj's forward (it "
            "uses F.multi_head_attention_forward), so no statistics can be taken there"
        )
        reason = f"; {detail}" if why else ""
        # eigen: every parameter without an eigenbasis layer is trained by Adam, by design
        if not eigen and not layers:
            warn(
                f"AdaFisher: {type(model).__name__} has no supported layer (Linear, Conv2d, "
                "BatchNorm, LayerNorm, Embedding or a registered helper); every parameter uses "
                f"the identity preconditioner{reason}"
            )
        elif not eigen and identity:
            warn(
                f"AdaFisher: {len(identity)} parameter(s) have no supported layer and use the "
                f"identity preconditioner: {', '.join(identity)}{reason}"
            )
        elif eigen and why:
            warn(
                f"AdaFisher: {detail}; "
                + ("the weight gets factors from its own gradient, the bias is trained by Adam"
                   if self.param_groups[0]["gradient_factors"] else "they are trained by Adam")
            )
        self._binding = {id(p): (layer, role) for layer in layers for role, p in layer.params.items()}
        self._parameter_names = names
        self._gradient_factored = None
        self._collector = StatisticsCollector(layers, self.variant)
        self._collector.active = self._is_statistics_step(self._steps_taken() + 1)
        self._collector.install()
        return self._collector

    def detach(self) -> None:
        """Remove the statistics hooks (factors already folded stay in the state)."""
        if self._collector is not None:
            self._collector.remove()
        self._collector = None
        self._binding = {}
        self._kron_factors = {}
        self._gradient_factored = None
        self._workspace = {}

    # --- the step ---------------------------------------------------------------------------

    def _global_state(self) -> dict[str, Any]:
        glob = self.state[GLOBAL]  # type: ignore[index]
        glob.setdefault(GLOBAL_STEPS, 0)
        glob.setdefault(GLOBAL_SKIPPED, {})
        return glob

    def _steps_taken(self) -> int:
        return self._global_state()[GLOBAL_STEPS]

    def _is_statistics_step(self, t: int) -> bool:
        return (t - 1) % self.update_interval == 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Fold this step's statistics (on statistics steps) and update every parameter."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_betas()
        glob = self._global_state()
        if self.param_groups[0]["skip_nonfinite_steps"] and self._skip_nonfinite_step():
            return loss
        t = glob[GLOBAL_STEPS] + 1
        eigen = self.variant == "eigen"
        if self._collector is None:
            self._warn_unattached()
            if eigen and self._is_statistics_step(t):
                self._fold_eigen([], [])  # gradient-factored parameters only
        elif self._is_statistics_step(t):
            self._fold(self._collector.consume())
        else:
            self._collector.discard()
        if eigen:
            self._refresh_eigenbases(t)
            self._update_eigen()
        else:
            for group in self.param_groups:
                self._update_group(group)
        glob[GLOBAL_STEPS] = t
        if self._collector is not None:
            self._collector.active = self._is_statistics_step(t + 1)
        return loss

    def _skip_nonfinite_step(self) -> bool:
        """With ``skip_nonfinite_steps``: if any gradient holds inf/NaN, skip the whole step as
        ``GradScaler`` does (parameters, moments, factors and the step count unchanged; this
        step's statistics dropped) and return True. One read from the device per device."""
        named = [(p, p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, grad) in enumerate(named):
            by_device.setdefault(grad.device, []).append(i)
        bad: list[int] = []
        for indices in by_device.values():
            finite = torch.stack([torch.isfinite(named[i][1]).all() for i in indices])
            if not bool(finite.all()):
                bad += [i for i, ok in zip(indices, finite.tolist()) if not ok]
        if not bad:
            return False
        if self._collector is not None:
            self._collector.discard()
        glob = self._global_state()
        glob[GLOBAL_SKIPPED_STEPS] = glob.get(GLOBAL_SKIPPED_STEPS, 0) + 1
        names = [
            self._parameter_names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")
            for p, _ in (named[i] for i in sorted(bad))
        ]
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        warn(
            f"AdaFisher: step skipped (skip_nonfinite_steps=True): non-finite gradients in "
            f"{shown}; parameters, moments and factors are unchanged. Steps skipped so far: "
            "optimizer.state['adafisher']['skipped_steps']"
        )
        return True

    def discard_statistics(self) -> None:
        """Drop the statistics gathered since the last step (e.g. a step ``GradScaler`` skipped)."""
        if self._collector is not None:
            self._collector.discard()

    def _fold(self, pending: dict[str, LayerStats]) -> None:
        assert self._collector is not None
        layers = self._collector.layers
        local = {name for name, stats in pending.items() if stats.complete}  # host counts
        if self.statistics_reducer is not None:
            pending = self.statistics_reducer(layers, pending)
        folded = self._layers_to_fold(layers, local, pending)
        if self.variant == "eigen":
            self._fold_eigen(layers, folded)
            return
        # One pass over the groups per statistics step, not one scan per layer.
        gamma_of = {id(p): group["gamma"] for group in self.param_groups for p in group["params"]}
        batches: dict[tuple[torch.device, torch.dtype], list[tuple[BoundLayer, LayerStats]]] = {}
        for layer, stats, _ in folded:
            assert stats.h_total is not None and stats.s_total is not None
            key = (stats.h_total.device, torch.promote_types(stats.h_total.dtype, stats.s_total.dtype))
            batches.setdefault(key, []).append((layer, stats))
        names: list[str] = []
        flags: list[Tensor] = []
        for (device, dtype), batch in batches.items():
            flags.append(self._fold_batch(batch, device, dtype, gamma_of))
            names += [layer.name for layer, _ in batch]
        self._report_skipped(names, flags)
        self._check_first_statistics(layers, self._count_folds(folded), "keep the identity")

    def _layers_to_fold(
        self, layers: list[BoundLayer], local: set[str], pending: dict[str, LayerStats]
    ) -> list[tuple[BoundLayer, LayerStats, bool]]:
        """The layers this statistics step folds, in layer order, each with whether the host
        counts it as folded (``factor_updates``, the first-statistics warning).

        Host counts (no reducer): the layers with both counts positive, all counted. Counts on
        the device (pooled over data-parallel ranks, never read back): the layers with local
        statistics (``local``; their pooled counts are positive), counted, and the layers that
        already hold factors, not counted: the fold takes their pooled statistics where the
        pooled counts are positive and leaves their factors exactly as they are where they are
        zero (docs/numerics.md, "Pooling").
        """
        out: list[tuple[BoundLayer, LayerStats, bool]] = []
        for layer in layers:
            stats = pending.get(layer.name)
            if stats is None:
                continue
            if not isinstance(stats.h_count, Tensor) and not isinstance(stats.s_count, Tensor):
                if stats.complete:
                    out.append((layer, stats, True))
            elif layer.name in local:
                out.append((layer, stats, True))
            elif FACTOR_H in self.state.get(layer.primary, {}) or FACTOR_S in self.state.get(layer.primary, {}):
                out.append((layer, stats, False))
        return out

    def _count_folds(self, folded: list[tuple[BoundLayer, LayerStats, bool]]) -> list[str]:
        """Add one to ``factor_updates`` of every counted layer; returns their names."""
        names = []
        for layer, _, counted in folded:
            if counted:
                state = self.state[layer.primary]
                state[FACTOR_UPDATES] = state.get(FACTOR_UPDATES, 0) + 1
                names.append(layer.name)
        return names

    def _check_first_statistics(self, layers: list[BoundLayer], names: list[str], meanwhile: str) -> None:
        """Warn once, on the first statistics step, naming the layers that got none."""
        if self._checked_first_statistics:
            return
        self._checked_first_statistics = True
        seen = set(names)
        missing = [layer.name for layer in layers if layer.name not in seen]
        if missing:
            warn(
                "AdaFisher: these layers received no statistics on the first statistics step "
                f"and {meanwhile} until they do (not called through their forward, outside "
                f"training mode, or no gradient reached them): {', '.join(missing)}"
            )

    def _fold_batch(
        self, batch: list[tuple[BoundLayer, LayerStats]], device: torch.device,
        dtype: torch.dtype, gamma_of: dict[int, float],
    ) -> Tensor:
        """Fold the statistics of layers on one device and dtype as one flat vector
        ``[h₁, s₁, h₂, s₂, ...]`` (:class:`functional.Segments`); returns per layer whether its
        statistics were finite (``False``: left out and reported). Counts on the device: a layer
        whose counts are not both positive keeps its factors exactly."""
        totals: list[Tensor] = []
        counts: list[float | Tensor] = []
        old: list[Tensor] = []
        first: list[bool] = []
        gammas: list[float] = []
        for layer, stats in batch:
            state = self.state[layer.primary]
            new_layer = FACTOR_H not in state
            for total, count, key in ((stats.h_total, stats.h_count, FACTOR_H), (stats.s_total, stats.s_count, FACTOR_S)):
                assert total is not None
                totals.append(total)
                counts.append(count)
                old.append(total.new_ones(total.shape) if new_layer else state[key])
            first += [new_layer, new_layer]
            gammas += [gamma_of[id(layer.primary)]] * 2
        pieces, per_layer = self._segments_for(tuple(t.numel() for t in totals), device)
        divisor, present = _divisors(pieces, counts, dtype)
        stat = torch.cat(totals).to(dtype) / divisor
        scale = self.statistics_grad_scale
        if isinstance(scale, Tensor) or scale != 1.0:
            is_s = pieces.constants([False, True] * len(batch), torch.bool)
            stat = torch.where(is_s, stat / (scale * scale), stat)
        ok_layer = fn.foldable(self.variant, stat, per_layer)
        ok = per_layer.spread(ok_layer if present is None else ok_layer & present)
        factor = torch.cat(old).to(dtype)
        if self.variant == "paper":
            starts = pieces.constants(first, torch.bool) if any(first) else None
            new = fn.fold_paper(factor, stat, gammas, ok, first=starts, segments=pieces)
        else:
            new = fn.fold_reference(factor, stat, gammas, ok, segments=pieces)
        parts = pieces.split(new)
        norm_parts = pieces.split(fn.normalised(self.variant, new, pieces))
        for k, (layer, _) in enumerate(batch):
            state = self.state[layer.primary]
            state[FACTOR_H], state[FACTOR_S] = parts[2 * k], parts[2 * k + 1]
            self._normalised[id(layer.primary)] = (norm_parts[2 * k], norm_parts[2 * k + 1])
        return ok_layer

    def _segments_for(
        self, lengths: tuple[int, ...], device: torch.device
    ) -> tuple[fn.Segments, fn.Segments]:
        """The flat layout of a fold (factor pieces, and the layers they pair into); cached."""
        key = (lengths, device)
        found = self._layouts.get(key)
        if found is None:
            if len(self._layouts) >= 8:
                self._layouts.clear()
            pairs = [lengths[i] + lengths[i + 1] for i in range(0, len(lengths), 2)]
            found = self._layouts[key] = (fn.Segments(lengths, device), fn.Segments(pairs, device))
        return found

    def _report_skipped(self, names: list[str], flags: list[Tensor]) -> None:
        """Count and warn about layers whose statistics were not folded.

        Reading the flags is a device-to-host copy. On CPU it is free and happens now; on CUDA
        (or with :attr:`defer_skip_check`) the flags are copied asynchronously and read at the
        next statistics step or ``state_dict()``, so the step never waits for the device.
        """
        self._resolve_skip_check()
        if not names:
            return
        ok = flags[0] if len(flags) == 1 else torch.cat([f.to(flags[0].device) for f in flags])
        defer = self.defer_skip_check if self.defer_skip_check is not None else ok.is_cuda
        if not defer:
            self._count_skipped(names, ok)
            return
        event = None
        if ok.is_cuda:
            host = torch.empty(ok.shape, dtype=ok.dtype, pin_memory=True)
            host.copy_(ok, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = ok.to("cpu", copy=True)
        self._pending_check = (names, host, event)

    def _resolve_skip_check(self) -> None:
        pending, self._pending_check = self._pending_check, None
        if pending is not None:
            names, host, event = pending
            if event is not None:
                event.synchronize()  # long done: it was recorded a step or more ago
            self._count_skipped(names, host)

    def _count_skipped(self, names: list[str], ok: Tensor) -> None:
        flags = ok.cpu().numpy()  # a host tensor here, unless deferral was turned off on CUDA
        if flags.all():
            return
        skipped = self._global_state()[GLOBAL_SKIPPED]
        bad = [name for name, good in zip(names, flags) if not good]
        for name in bad:
            skipped[name] = skipped.get(name, 0) + 1
        what = "inf/NaN" if self.variant == "paper" else "NaN"
        warn(
            f"AdaFisher: statistics containing {what} were not folded into the factors of "
            f"{', '.join(bad)} (their H and S are unchanged this step); counts so far are in "
            "optimizer.state['adafisher']['skipped_statistics']. The parameter update of that "
            "step WAS applied: non-finite gradients, if any, went into the parameters and "
            "exp_avg (pass skip_nonfinite_steps=True to skip such steps, or use a GradScaler)"
        )

    def _warn_unattached(self) -> None:
        if not self._warned_unattached:
            self._warned_unattached = True
            what = (
                "so no layer gets factors from its inputs (matrix-shaped parameters get them "
                "from their gradients, the rest are trained by Adam)"
                if self.variant == "eigen" else "so every parameter uses the identity preconditioner"
            )
            warn(
                f"AdaFisher has no statistics hooks, {what}: pass the model (AdaFisher(model)), "
                "call optimizer.attach(model), or add lightning_adafisher.AdaFisherCallback to "
                "the Trainer"
            )

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        """The param group holding ``p`` (a linear scan: for diagnostics, not the step)."""
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter is not in this optimizer")

    def _normalised_factors(self, primary: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.variant == "eigen":
            return None  # full factors, no diagonal ones
        cached = self._normalised.get(id(primary))
        if cached is not None:
            return cached
        state = self.state[primary]
        if FACTOR_H not in state:
            return None
        h, s = fn.normalised(self.variant, state[FACTOR_H]), fn.normalised(self.variant, state[FACTOR_S])
        self._normalised[id(primary)] = (h, s)
        return h, s

    def _denominator(
        self, p: Tensor, damping: float, fused: bool, like: Tensor | None = None
    ) -> Tensor | float | fn.KronFactors:
        """``F`` of ``p``; the layer helper reads shapes off ``like`` (default ``p``; FSDP2: a
        meta tensor of the whole parameter's shape)."""
        bound = self._binding.get(id(p))
        factors = None if bound is None else self._normalised_factors(bound[0].primary)
        cached = self._kron_factors.get(id(p)) if like is None else None
        if cached is not None and cached[0] is factors and cached[1] is bound and cached[2] == damping:
            return cached[3]  # the same factors as last step (no fold since)
        like = p if like is None else like
        if bound is None or factors is None:
            # No supported layer (1 + λ, or 1 in the reference variant), or a supported layer
            # before its first statistics (1 + λ).
            identity = 1.0 if bound is None and self.variant == "reference" else 1.0 + damping
            if not fused:
                return identity
            one = self._ones.get((p.device, p.dtype))
            if one is None:
                one = self._ones[(p.device, p.dtype)] = torch.ones(1, dtype=p.dtype, device=p.device)
            return fn.KronFactors(one, one, identity - 1.0)
        layer, role = bound
        h_norm, s_norm = factors
        if layer.helper.kronecker_form:
            # F = rows⊗cols + λ, left unmaterialised: the update builds it block by block in a
            # small scratch buffer (or inline, when fused).
            rows, cols = layer.helper.kron_factors(layer.module, role, like, h_norm, s_norm)
            kron = fn.KronFactors(rows, cols, damping)
            if like is p:
                self._kron_factors[id(p)] = (factors, bound, damping, kron)
            return kron
        denom = layer.helper.denominator(layer.module, role, like, h_norm, s_norm, damping)
        return denom if denom.dtype == p.dtype else denom.to(p.dtype)

    def _scratch(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A reusable buffer of at least ``numel`` elements (one per device and dtype; not state)."""
        key = (device, dtype)
        workspace = self._workspace.get(key)
        if workspace is None or workspace.numel() < numel:
            workspace = torch.empty(numel, dtype=dtype, device=device)
            self._workspace[key] = workspace
        return workspace

    def _update_group(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, steps = [], [], [], []
        maximize, all_state = group["maximize"], self.state
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("AdaFisher does not support sparse gradients")
            state = all_state[p]
            t = state.get(STEP)
            if t is None:
                t = 0
                state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state[STEP] = t = t + 1
            params.append(p)
            grads.append(torch.neg(grad) if maximize else grad)
            exp_avgs.append(state[EXP_AVG])
            steps.append(t)
        foreach = group["foreach"]
        if foreach is None:
            foreach = bool(params) and all(p.is_cuda for p in params)
        fused = group.get("fused", False)
        if any(fsdp.is_sharded(p) for p in params):  # FSDP2: each rank updates its own rows
            params, grads, exp_avgs, denoms, steps = fsdp.local_update_lists(
                params, grads, exp_avgs, steps,
                lambda p, like: self._denominator(p, group["damping"], fused, like),
            )
        else:
            denoms = [self._denominator(p, group["damping"], fused) for p in params]
        compiled_before = fused and fn.fused_failure() is None
        fn.adafisher_update(
            params, grads, exp_avgs, denoms, steps,
            lr=group["lr"], beta=group["beta"], weight_decay=group["weight_decay"],
            decoupled=self._decoupled, foreach=foreach, fused=fused, workspace=self._scratch,
        )
        if compiled_before and fn.fused_failure() is not None:
            warn(
                f"AdaFisher(fused=True): torch.compile of the fused update failed "
                f"({fn.fused_failure()}); using the eager update from now on (same numbers, "
                "slower). Pass fused=False to silence."
            )

    # --- checkpointing ----------------------------------------------------------------------

    @staticmethod
    def _before_state_dict(self: AdaFisher) -> None:
        self._resolve_skip_check()  # deferred counts belong in the checkpoint
        self._sync_betas()

    @staticmethod
    def _copy_global_state(self: AdaFisher, state_dict: dict[str, Any]) -> dict[str, Any]:
        # Tensors in a state_dict alias the live state, as in torch; the counters are plain
        # Python objects, so copy them lest a saved dict keep counting with the optimizer.
        if GLOBAL in state_dict["state"]:
            state_dict["state"][GLOBAL] = copy.deepcopy(state_dict["state"][GLOBAL])
        return state_dict

    def _expected_state_shapes(self, p: Tensor) -> dict[str, tuple[int, ...]]:
        """The shape every state tensor of ``p`` must have for this model (those known)."""
        shapes = {EXP_AVG: tuple(p.shape), EXP_AVG_SQ: tuple(p.shape)}
        bound = self._binding.get(id(p))
        if bound is not None and bound[0].primary is p:
            layer = bound[0]
            n_h, n_s = layer.helper.factor_sizes(layer.module)
            if self.variant != "eigen":
                shapes[FACTOR_H], shapes[FACTOR_S] = (n_h,), (n_s,)
                return shapes
            cols = self._eigen_columns(layer)
            shapes[EIGEN_EXP_AVG] = shapes[EIGEN_EXP_AVG_SQ] = (n_s, cols)
            shapes[FACTOR_H] = shapes[EIGENBASIS_H] = (cols, cols)
            shapes[FACTOR_S] = shapes[EIGENBASIS_S] = (n_s, n_s)
        elif bound is None and self.variant == "eigen" and (matrix := matrix_shape(p)) is not None:
            shapes[EIGEN_EXP_AVG] = shapes[EIGEN_EXP_AVG_SQ] = matrix
            shapes[FACTOR_H] = shapes[EIGENBASIS_H] = (matrix[1], matrix[1])
            shapes[FACTOR_S] = shapes[EIGENBASIS_S] = (matrix[0], matrix[0])
        return shapes

    def _check_loaded_state(self, state_dict: dict[str, Any]) -> None:
        """Refuse, naming what does not fit, a state saved by another optimizer or for a
        different model (which would otherwise load and fail at the next ``step``)."""
        saved_groups = state_dict.get("param_groups", [])
        missing = sorted({key for group in saved_groups for key in _FIRST_KEYS if key not in group})
        if missing:
            raise ValueError(
                f"Cannot load this state into {type(self).__name__}: it comes from another "
                f"optimizer (its param groups lack {', '.join(missing)}). Load it into the "
                "optimizer that saved it, or start this one from a fresh state."
            )
        saved_state = state_dict.get("state", {})
        for g, (group, saved_group) in enumerate(zip(self.param_groups, saved_groups)):
            for j, (p, index) in enumerate(zip(group["params"], saved_group["params"])):
                saved = saved_state.get(index, {})
                for key, shape in self._expected_state_shapes(p).items():
                    value = saved.get(key)
                    if isinstance(value, Tensor) and tuple(value.shape) != shape:
                        name = self._parameter_names.get(id(p), f"of shape {tuple(p.shape)}")
                        raise ValueError(
                            f"Cannot load this state: for parameter {name} (param group {g}, "
                            f"index {j}) the saved {key} has shape {tuple(value.shape)}, this "
                            f"model needs {shape}. Was the model changed since the checkpoint "
                            "was saved?"
                        )

    @staticmethod
    def _before_load_state_dict(self: AdaFisher, state_dict: dict[str, Any]) -> None:
        self._check_loaded_state(state_dict)
        # torch casts every floating state tensor to its parameter's dtype while loading; a
        # bf16 model's float32 factors (and the eigen variant's bases and moments) would come
        # back rounded to bf16. Keep the saved tensors to restore them after the load.
        self._loaded_factors = []
        saved_state = state_dict.get("state", {})
        for g, group in enumerate(state_dict.get("param_groups", [])):
            for j, index in enumerate(group["params"]):
                for key, value in saved_state.get(index, {}).items():
                    if key in _STATS_DTYPE_KEYS and isinstance(value, Tensor):
                        self._loaded_factors.append((g, j, key, value))

    def _after_load_state_dict(self) -> None:
        self._pending_check = None  # flags of the replaced state
        self._synced_betas = {}
        for group in self.param_groups:  # a checkpoint holds them reconciled
            self._synced_betas[id(group)] = group["betas"] = (group["beta"], group["beta2"])
        if GLOBAL in self.state:
            self.state[GLOBAL] = copy.deepcopy(self.state[GLOBAL])  # type: ignore[index]
        # Factors live in >= float32: the saved tensors, not torch's casts to the parameter dtype.
        loaded, self._loaded_factors = self._loaded_factors, []
        for g, j, key, value in loaded:
            p = self.param_groups[g]["params"][j]
            self.state[p][key] = value.to(device=p.device, dtype=fn.stats_dtype(p.dtype), copy=True)
        self.state_changed()

    def state_changed(self) -> None:
        """Tell the optimizer that its ``state`` was written from outside (``load_state_dict``
        calls it; so does :func:`lightning_adafisher.fsdp.load_replicated_state`): drops the
        cached normalised factors and the statistics gathered since the last step, and sets the
        hooks for the coming step from the (new) step count."""
        self._normalised.clear()
        if self._collector is not None:
            self._collector.discard()
            self._collector.active = self._is_statistics_step(self._steps_taken() + 1)

    # --- read-only API: what callbacks, diagnostics and users may inspect ---------------------

    @property
    def steps_taken(self) -> int:
        """Optimizer steps taken so far (checkpointed; a step skipped by ``GradScaler`` does
        not count)."""
        return self._steps_taken()

    def is_statistics_step(self, t: int) -> bool:
        """Whether step ``t`` (1-based) gathers and folds statistics:
        ``(t − 1) % update_interval == 0``."""
        return self._is_statistics_step(t)

    def next_step_gathers_statistics(self) -> bool:
        """Whether the hooks record during the coming forward/backward (step ``steps_taken + 1``)."""
        return self._is_statistics_step(self._steps_taken() + 1)

    def group_for(self, param: Tensor) -> dict[str, Any]:
        """The param group that holds ``param`` (``KeyError`` if none does). A linear scan:
        meant for inspection, not for a training loop's inner step."""
        return self._group_of(param)

    def layer_factors(self, param_or_module: Tensor | nn.Module) -> tuple[Tensor, Tensor] | None:
        """The normalised diagonal factors ``(H', S')`` of the layer that owns a parameter (or
        of a module), as the update reads them (``docs/numerics.md#normalisation``).

        ``None`` when the optimizer is not attached, the layer has no supported helper, its
        first statistics have not been folded yet, or for ``variant="eigen"`` (full factors,
        no diagonal ones).
        """
        primary = self._primary_of(param_or_module)
        return None if primary is None else self._normalised_factors(primary)

    def fisher_diagonal(self, param: Tensor) -> Tensor | None:
        """The Fisher diagonal ``F`` (shape of ``param``, damping included) that the update of
        ``variant="paper"``/``"reference"`` divides ``param``'s first moment by; ``None`` where
        :meth:`layer_factors` is ``None`` (the update then uses the identity, ``1 + λ``).

        Raises ``ValueError`` when the optimizer is not attached to a model.
        """
        if self._collector is None:
            raise ValueError("AdaFisher is not attached to a model (no statistics hooks yet)")
        bound = self._binding.get(id(param))
        factors = None if bound is None else self._normalised_factors(bound[0].primary)
        if bound is None or factors is None:
            return None
        layer, role = bound
        damping = self._group_of(param)["damping"]
        return layer.helper.denominator(layer.module, role, param, factors[0], factors[1], damping)

    def identity_parameters(self) -> list[Tensor]:
        """The trained parameters outside every supported layer: the identity preconditioner
        for ``"paper"``/``"reference"``, plain Adam for ``"eigen"`` (after its own-gradient
        factors, when ``gradient_factors`` is on). Empty before :meth:`attach`."""
        if self._collector is None:
            return []
        covered = set(self._binding)
        if self.variant == "eigen":
            covered |= {id(unit.param) for unit in self._gradient_factored_params()}
        return [p for group in self.param_groups for p in group["params"] if id(p) not in covered]

    def skipped_statistics(self) -> dict[str, int]:
        """Per layer name, how many statistics steps were dropped because they were not finite
        (checkpointed; ``docs/numerics.md#non-finite-statistics``). Never waits for the device:
        on CUDA the latest statistics step's check is counted at the next statistics step or
        ``state_dict()``."""
        return dict(self._global_state()[GLOBAL_SKIPPED])

    def _primary_of(self, param_or_module: Tensor | nn.Module) -> Tensor | None:
        if isinstance(param_or_module, nn.Module):
            if self._collector is None:
                return None
            layer = next((lay for lay in self._collector.layers if lay.module is param_or_module), None)
            return None if layer is None else layer.primary
        bound = self._binding.get(id(param_or_module))
        return None if bound is None else bound[0].primary


class AdaFisherW(AdaFisher):
    """AdaFisher with decoupled weight decay (the AdamW analogue): ``p ← p − α(m̂/F + κp)``."""

    _decoupled = True


AdaFisher.__doc__ = (AdaFisher.__doc__ or "").replace(
    "{algorithm}",
    _ALGORITHM.format(coupled_decay="g ← g + κp; ", update="(m / (1 − β^t)) / F"),
).replace("{decay_doc}", "added to the gradient (L2, coupled).").replace(
    " {eigen_decay}", ""  # coupled: κW is in ∇W
)
AdaFisherW.__doc__ = (AdaFisher.__doc__ or "").replace(
    "AdaFisher: Adam preconditioned", "AdaFisherW: AdamW preconditioned"
).replace("g ← g + κp; ", "").replace(
    "(m / (1 − β^t)) / F", "((m / (1 − β^t)) / F + κp)"
).replace("added to the gradient (L2, coupled).", "decoupled, applied to the weights directly.").replace(
    "Q_Aᵀ)", "Q_Aᵀ + κW)"
)
