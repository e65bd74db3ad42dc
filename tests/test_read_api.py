"""AdaFisher's public read API (what callbacks, diagnostics and users inspect) and the layer
helpers' capability flags."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_adafisher import AdaFisher, AdaFisherW, LayerHelper, register_layer_helper
from lightning_adafisher.layers import BatchNormHelper, LinearHelper
from tests.conftest import make_mixed


def _step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _quiet(cls, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(*args, **kwargs)


def test_steps_and_statistics_schedule(mixed_batch):
    model = make_mixed()
    opt = _quiet(AdaFisherW, model, variant="paper", update_interval=3)
    assert opt.steps_taken == 0 and opt.next_step_gathers_statistics()
    assert [opt.is_statistics_step(t) for t in range(1, 8)] == [True, False, False, True, False, False, True]
    for expected in (False, False, True, False):
        _step(model, opt, *mixed_batch)
        assert opt.next_step_gathers_statistics() is expected
    assert opt.steps_taken == 4


def test_layer_factors_fisher_diagonal_group_and_identity(mixed_batch):
    model = make_mixed()
    decayed = [p for n, p in model.named_parameters() if n != "scale"]
    opt = _quiet(AdaFisher, [{"params": decayed}, {"params": [model.scale], "damping": 0.5}],
                 variant="paper", damping=1e-3)
    assert opt.identity_parameters() == [] and opt.layer_factors(model.proj) is None
    with pytest.raises(ValueError, match="not attached"):
        opt.fisher_diagonal(model.proj.weight)
    _quiet(opt.attach, model)
    assert [p is model.scale for p in opt.identity_parameters()] == [True]
    assert opt.layer_factors(model.proj) is None  # before the first statistics
    assert opt.fisher_diagonal(model.proj.weight) is None
    _step(model, opt, *mixed_batch)
    h, s = opt.layer_factors(model.proj)
    assert h.shape == (7,) and s.shape == (8,)  # 6 inputs + bias, 8 outputs
    for tensor in (model.proj.weight, model.proj.bias):  # a parameter names its layer too
        assert all(torch.equal(a, b) for a, b in zip(opt.layer_factors(tensor), (h, s)))
    torch.testing.assert_close(opt.fisher_diagonal(model.proj.weight), torch.outer(s, h[:6]) + 1e-3)
    torch.testing.assert_close(opt.fisher_diagonal(model.proj.bias), s * h[6] + 1e-3)
    h_bn, s_bn = opt.layer_factors(model.bn)
    torch.testing.assert_close(opt.fisher_diagonal(model.bn.bias), s_bn * h_bn[1] + 1e-3)
    assert opt.fisher_diagonal(model.scale) is None and opt.layer_factors(model.scale) is None
    assert opt.layer_factors(nn.Linear(2, 2)) is None  # a module the optimizer does not know
    assert opt.group_for(model.scale)["damping"] == 0.5
    assert opt.group_for(model.proj.weight) is opt.param_groups[0]
    with pytest.raises(KeyError):
        opt.group_for(torch.zeros(1))
    assert opt.skipped_statistics() == {}


def test_eigen_variant_has_no_diagonal_factors_and_adam_for_the_rest(mixed_batch):
    model = make_mixed()
    opt = _quiet(AdaFisherW, model, variant="eigen", gradient_factors=False)
    _step(model, opt, *mixed_batch)
    assert opt.layer_factors(model.proj) is None
    # norm layers and the raw parameter are Adam's in this variant
    adam = {id(p) for p in opt.identity_parameters()}
    assert adam == {id(p) for p in (model.bn.weight, model.bn.bias, model.ln.weight, model.ln.bias, model.scale)}


class Dense(nn.Linear):
    """A Linear the test registers its own helpers for (subclasses keep the registry local)."""


class ConstantHelper(LinearHelper):
    """An ``F`` that is not of Kronecker form: the update must call ``denominator``."""

    kronecker_form = False

    def denominator(self, module, role, param, h_norm, s_norm, damping):
        return torch.full_like(param, 4.0)


def test_a_helper_without_kronecker_form_has_its_denominator_used():
    register_layer_helper(Dense, ConstantHelper())
    torch.manual_seed(0)
    model = nn.Sequential(Dense(3, 2)).double()
    opt = _quiet(AdaFisher, model, variant="paper", lr=0.1)
    before = model[0].weight.detach().clone()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
    _step(model, opt, x, y)
    # first step: m̂ = g, so Δp = −lr·g/F with F = 4
    torch.testing.assert_close(model[0].weight - before, -0.1 * model[0].weight.grad / 4.0)


class CountingNorm(nn.BatchNorm2d):
    pass


class CountingNormHelper(BatchNormHelper):
    """Overrides the bias-gradient route, so it must switch the batched built-in formula off."""

    s_from_bias_grad_batched = False
    calls = 0

    def output_stats_from_bias_grad(self, module, grad_bias, batch):
        CountingNormHelper.calls += 1
        return super().output_stats_from_bias_grad(module, grad_bias, batch)


def test_a_helper_overriding_the_bias_gradient_route_is_called():
    register_layer_helper(CountingNorm, CountingNormHelper())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), CountingNorm(2), nn.Flatten(), nn.Linear(8, 2))
    opt = _quiet(AdaFisher, model, variant="paper")
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 0, 1])
    _step(model, opt, x, y)
    assert CountingNormHelper.calls == 1
    assert opt.layer_factors(model[1]) is not None
    assert LayerHelper.kronecker_form and not LayerHelper.s_from_bias_grad_batched
    assert BatchNormHelper.s_from_bias_grad_batched
