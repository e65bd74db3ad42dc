"""Every private torch API the package uses, removed or broken in turn: the fallback of
``lightning_adafisher.compat`` gives the normal path's numbers (or its documented conservative
answer)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_adafisher import AdaFisher, AdaFisherW, compat
from lightning_adafisher import functional as fn
from lightning_adafisher import statistics
from lightning_adafisher.layers import BatchNormHelper, layer_helper_for
from tests.conftest import make_mixed

DT = torch.float64


class Net(nn.Module):
    """Linear, BatchNorm1d and LayerNorm (whose statistics read saved means), optionally run
    under activation checkpointing (a forward recomputed inside the backward)."""

    def __init__(self, ckpt: str | None = None) -> None:
        super().__init__()
        self.a, self.bn, self.ln, self.b = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.LayerNorm(8), nn.Linear(8, 3)
        self.ckpt = ckpt

    def body(self, x):
        return self.b(self.ln(torch.tanh(self.bn(self.a(x)))))

    def forward(self, x):
        if self.ckpt is None:
            return self.body(x)
        return checkpoint(self.body, x, use_reentrant=self.ckpt == "reentrant")


def _factors(ckpt: str | None = None, steps: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Net(ckpt).double()
    opt = AdaFisher(model, lr=1e-2, variant="paper")
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)
        x.requires_grad_(ckpt == "reentrant")  # reentrant checkpointing needs such an input
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    out = {}
    for name, module in model.named_children():
        out[f"{name}.h"] = opt.state[module.weight]["factor_h"].clone()
        out[f"{name}.s"] = opt.state[module.weight]["factor_s"].clone()
    out.update({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def _assert_same(got, want, atol=1e-12):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


def _break(monkeypatch, owner, name, how):
    """Remove ``owner.name`` (``how="missing"``) or give it a new signature (``"signature"``)."""
    if how == "missing":
        monkeypatch.delattr(owner, name)
    else:
        monkeypatch.setattr(owner, name, lambda new_required_argument: 0)


@pytest.fixture(scope="module")
def normal():
    return {ckpt: _factors(ckpt) for ckpt in (None, "reentrant", "non-reentrant")}


@pytest.mark.parametrize("how", ["missing", "signature"])
def test_without_current_graph_task_id_every_forward_still_works_with_the_same_factors(monkeypatch, normal, how):
    """``torch._C._current_graph_task_id`` gone: no crash in any forward (plain, or recomputed
    by reentrant checkpointing, which needs no such id), and the same factors and parameters."""
    _break(monkeypatch, torch._C, "_current_graph_task_id", how)
    assert compat.in_backward() is False
    _assert_same(_factors(), normal[None])
    _assert_same(_factors("reentrant"), normal["reentrant"])


def test_the_in_backward_fallback_counts_a_recomputation_without_changing_the_factors(monkeypatch, normal):
    """torch's own non-reentrant checkpoint needs the graph task id, so it is kept here and only
    the package's answer is the fallback's: the recomputation is counted again, total and count
    together, and every factor and parameter stays that of the normal path."""
    monkeypatch.setattr(compat, "in_backward", lambda: False)
    _assert_same(_factors("non-reentrant"), normal["non-reentrant"])


@pytest.mark.parametrize("how", ["missing", "signature"])
def test_without_the_saved_tensor_hooks_query_norm_statistics_come_from_x(monkeypatch, normal, how):
    _break(monkeypatch, torch._C._autograd, "_top_saved_tensors_default_hooks", how)
    assert compat.saved_tensor_hooks_active() is True  # conservative: the mean is not read
    _assert_same(_factors(), normal[None])


class _NodeWithoutSavedResult:
    """A norm kernel's autograd node as a torch without ``_saved_result1`` would expose it."""

    def __init__(self, node) -> None:
        self._node = node

    def __getattr__(self, name):
        if name == "_saved_result1":
            raise AttributeError(name)
        return getattr(self._node, name)


@pytest.mark.parametrize("broken", ["missing", "not a tensor"])
def test_without_the_saved_mean_norm_statistics_come_from_x(monkeypatch, normal, broken):
    real = statistics._norm_kernel_node
    reads = []

    def node_of(output):
        node = real(output)
        if node is None:
            return None
        reads.append(node)
        if broken == "missing":
            return _NodeWithoutSavedResult(node)
        wrapped = _NodeWithoutSavedResult(node)
        wrapped.__dict__["_saved_result1"] = (node._saved_result1,)  # a changed return type
        return wrapped

    monkeypatch.setattr(statistics, "_norm_kernel_node", node_of)
    _assert_same(_factors(), normal[None])
    assert reads  # the norm layers went through the broken node


def test_grad_scaler_scale_without_the_private_attribute():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(torch.ones((), requires_grad=True))  # creates the scale tensor
    on_device = compat.grad_scaler_scale(scaler)
    assert isinstance(on_device, torch.Tensor) and on_device is scaler._scale

    class Renamed:  # a scaler whose private attribute is gone or holds something else
        def __init__(self, scale):
            if scale is not None:
                self._scale = scale

        def get_scale(self):
            return 1024.0

    for private in (None, 1024):
        assert compat.grad_scaler_scale(Renamed(private)) == on_device.item() == 1024.0


def test_shared_square_sum_without_version_counter_is_recomputed(monkeypatch):
    """No version counter: a later read cannot know the input is unmodified, so it is not
    reused (the same number, one more pass)."""
    fn._recent_square_sums.clear()
    x = torch.randn(5, 4, dtype=DT)
    first = fn._square_sum(x, rows=True, reuse=True)
    assert fn._square_sum(x, rows=True, reuse=True) is first  # the normal path reuses it
    monkeypatch.setattr(compat, "tensor_version", lambda t: None)
    again = fn._square_sum(x, rows=True, reuse=True)
    assert again is not first and torch.equal(again, x.square().sum(0))

    class NoVersion:
        @property
        def _version(self):
            raise AttributeError("_version")

    monkeypatch.undo()
    assert compat.tensor_version(NoVersion()) is None


def test_compile_error_classification_without_dynamo_exceptions(monkeypatch):
    import torch._dynamo.exc as exc

    error = exc.TorchDynamoException("traced")
    assert compat.is_compile_error(error) and not compat.is_compile_error(RuntimeError("kernel"))
    monkeypatch.delattr(exc, "TorchDynamoException")
    assert compat.is_compile_error(error) is False  # conservative: fail loudly, never redo a step


def test_batchnorm_types_without_the_private_base(monkeypatch):
    monkeypatch.delattr(nn.modules.batchnorm, "_BatchNorm")
    types = compat.batchnorm_types()
    for module in (nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.BatchNorm3d(3), nn.SyncBatchNorm(3)):
        assert isinstance(module, types)
    assert isinstance(layer_helper_for(nn.BatchNorm2d(3)), BatchNormHelper)


def test_instancenorm_types_without_the_private_base(monkeypatch):
    assert compat.instancenorm_types() == (nn.modules.instancenorm._InstanceNorm,)
    monkeypatch.delattr(nn.modules.instancenorm, "_InstanceNorm")
    types = compat.instancenorm_types()
    for module in (nn.InstanceNorm1d(3), nn.InstanceNorm2d(3), nn.InstanceNorm3d(3)):
        assert isinstance(module, types)


def test_without_foreach_ops_the_foreach_update_takes_the_single_tensor_path(monkeypatch):
    def train(foreach):
        model = make_mixed()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = AdaFisherW(model, lr=1e-2, weight_decay=0.1, variant="paper", foreach=foreach)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(4, 3, 8, 8, generator=g, dtype=DT), torch.randint(0, 5, (4,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    single = train(False)
    monkeypatch.delattr(torch, "_foreach_lerp_")
    assert not compat.has_foreach_ops()
    for p, q in zip(train(True), single):
        assert torch.equal(p, q)


# --- LightningCLI and jsonargparse ----------------------------------------------------------------


def test_lightning_cli_methods_the_cli_extends_are_present():
    assert compat.lightning_cli_missing_methods() == []

    from lightning.pytorch.cli import LightningCLI

    class Renamed(LightningCLI):
        _instantiate_trainer = None  # gone

        def _add_subcommands(self, parser, extra):  # re-signed
            pass

    assert compat.lightning_cli_missing_methods(Renamed) == ["_add_subcommands", "_instantiate_trainer"]


def test_cli_refuses_to_run_without_the_methods_it_extends(monkeypatch):
    import lightning

    from lightning_adafisher import cli

    monkeypatch.setattr(cli, "lightning_cli_missing_methods", lambda: ["_instantiate_trainer"])
    with pytest.raises(RuntimeError) as info:
        cli.run_cli(["fit", "--help"])
    assert str(info.value) == (
        "lightning-adafisher's CLI extends LightningCLI's _instantiate_trainer, which this "
        f"Lightning ({lightning.__version__}) does not have with the expected parameters. Install "
        "a Lightning version this package supports (see pyproject.toml), or use your own "
        "LightningCLI with AdaFisherCallback in trainer.callbacks."
    )


@pytest.mark.parametrize("broken", [False, True])
def test_help_without_jsonargparse_subcommands_action_lists_lightnings_subcommands(monkeypatch, capsys, broken):
    from lightning_adafisher import cli

    if broken:
        monkeypatch.setattr(cli, "subcommands_action", lambda parser: None)
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "validate", "test", "predict"))
    assert ("bench" in out and "diagnostics" in out) is not broken
    assert compat.subcommands_action(object()) is None
