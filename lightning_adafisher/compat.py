"""Every use of a private torch internal, behind one door, each with a tested fallback.

Private APIs change between torch releases without notice. Each function here tries the private
fast path once per call, catches what a missing or re-signed API raises (``AttributeError``,
``TypeError``, ``RuntimeError``, ``ValueError``), and then answers from a public fallback, which
is either exact or conservative as its docstring says (``tests/test_compat.py`` breaks each one
and checks the numbers). Imports torch only (the Lightning and jsonargparse checks import
them where they are called): every module of the package may use it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BROKEN",
    "batchnorm_types",
    "grad_scaler_scale",
    "has_foreach_ops",
    "in_backward",
    "instancenorm_types",
    "lightning_cli_missing_methods",
    "subcommands_action",
    "is_compile_error",
    "saved_norm_mean",
    "saved_tensor_hooks_active",
    "tensor_version",
]

BROKEN = (AttributeError, TypeError, RuntimeError, ValueError, NotImplementedError)
"""What a missing, renamed or re-signed private API raises."""


def in_backward() -> bool:
    """Whether this code runs inside a backward pass (``torch._C._current_graph_task_id``).

    Used to spot activation-checkpoint recomputations, which must not count twice. Fallback:
    ``False`` (a forward is a forward). A non-reentrant checkpoint's recomputation then adds its
    input statistic a second time, as ``(total, count)`` doubled together, which leaves the mean
    ``total / count`` unchanged whenever the recomputation repeats the forward bitwise (torch's
    checkpoint restores the RNG state for that); its output side is counted once either way
    (gradients flow through the original graph only).
    """
    try:
        return torch._C._current_graph_task_id() != -1
    except BROKEN:
        return False


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are active (activation checkpointing, CPU offloading): then
    a saved tensor must not be read in the forward, where its unpack hook would run.
    Fallback: ``True`` (conservative: the caller recomputes from the input instead)."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except BROKEN:
        return True


def saved_norm_mean(node: Any) -> Tensor | None:
    """The mean a BatchNorm/LayerNorm kernel's autograd node saved for backward (its second
    output, ``node._saved_result1``), or ``None`` when it cannot be read. Fallback: ``None``
    (the caller takes the statistic from the input: the same number, one more pass over it)."""
    if saved_tensor_hooks_active():
        return None
    try:
        mean = node._saved_result1
    except BROKEN:
        return None
    return mean if isinstance(mean, Tensor) else None


def grad_scaler_scale(scaler: Any) -> Tensor | float:
    """A ``GradScaler``'s current scale, on its device when possible (``scaler._scale``, no
    host sync). Fallback: ``scaler.get_scale()`` (public; a float, read from the device)."""
    try:
        scale = scaler._scale
    except BROKEN:
        scale = None
    return scale if isinstance(scale, Tensor) else scaler.get_scale()


def tensor_version(t: Tensor) -> int | None:
    """``t``'s in-place version counter (``t._version``: every in-place write bumps it), or
    ``None`` when it cannot be read. Callers treat ``None`` as "may have changed"."""
    try:
        version = t._version
    except BROKEN:
        return None
    return version if isinstance(version, int) else None


def is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` was raised by ``torch.compile`` while tracing or compiling (Dynamo's
    and Inductor's exceptions derive from ``torch._dynamo.exc.TorchDynamoException``), i.e.
    before the compiled code ran. Fallback: ``False`` (conservative: treat it as a failure of
    the compiled code itself, which may have written to its inputs)."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except (ImportError, *BROKEN):
        return False
    return isinstance(TorchDynamoException, type) and isinstance(error, TorchDynamoException)


def batchnorm_types() -> tuple[type[nn.Module], ...]:
    """The BatchNorm module types: ``nn.modules.batchnorm._BatchNorm`` (every BatchNorm, lazy
    and sync ones included, and user subclasses). Fallback: the public classes (which subclass
    it today), so only a user's subclass of the private base itself would be missed."""
    base = getattr(getattr(nn.modules, "batchnorm", None), "_BatchNorm", None)
    if isinstance(base, type) and issubclass(base, nn.Module):
        return (base,)
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def instancenorm_types() -> tuple[type[nn.Module], ...]:
    """The InstanceNorm module types: ``nn.modules.instancenorm._InstanceNorm`` (lazy ones
    included). Fallback: the public classes."""
    base = getattr(getattr(nn.modules, "instancenorm", None), "_InstanceNorm", None)
    if isinstance(base, type) and issubclass(base, nn.Module):
        return (base,)
    return (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


FOREACH_OPS = ("_foreach_add", "_foreach_lerp_", "_foreach_mul_", "_foreach_addcdiv_", "_foreach_mul", "_foreach_add_")
"""The multi-tensor kernels the foreach update uses (``torch._foreach_*``, as torch.optim does)."""


def has_foreach_ops() -> bool:
    """Whether every op of :data:`FOREACH_OPS` exists. Fallback when one is missing: the
    single-tensor update (bitwise the same numbers, one kernel per parameter)."""
    return all(callable(getattr(torch, name, None)) for name in FOREACH_OPS)


LIGHTNING_CLI_METHODS = {
    "_add_subcommands": ("self", "parser", "kwargs"),
    "_add_configure_optimizers_method_to_model": ("self", "subcommand"),
    "_instantiate_trainer": ("self", "config", "callbacks"),
}
"""The protected ``LightningCLI`` methods ``lightning_adafisher.cli.AdaFisherCLI`` extends, with
their parameters: Lightning documents no public hook for what they do (add a callback once the
optimizer class is known, build the optimizer after ``configure_model``)."""


def lightning_cli_missing_methods(base: type | None = None) -> list[str]:
    """Which of :data:`LIGHTNING_CLI_METHODS` ``base`` (default: ``LightningCLI``) lacks or has
    with other parameters. An override of a method that was renamed would never be called, and
    the CLI would train without AdaFisher's callback: the caller refuses to run instead."""
    import inspect

    if base is None:
        from lightning.pytorch.cli import LightningCLI as base
    missing = []
    for name, params in LIGHTNING_CLI_METHODS.items():
        try:
            found = tuple(inspect.signature(getattr(base, name)).parameters)
        except BROKEN:
            found = None
        if found != params:
            missing.append(name)
    return missing


def subcommands_action(parser: Any) -> Any | None:
    """jsonargparse's subcommands action of ``parser`` (``parser._subcommands_action``), through
    which extra subcommands are listed in ``--help``; ``None`` if it is gone (the help then
    lists Lightning's subcommands only)."""
    action = getattr(parser, "_subcommands_action", None)
    return action if callable(getattr(action, "add_subcommand", None)) else None
