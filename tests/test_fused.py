"""The opt-in fused update (one compiled pass per weight) equals the eager update."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lightning_adafisher import AdaFisher, AdaFisherW
from tests.conftest import make_mixed


def _train(opt_cls, fused: bool, **kw):
    kw.setdefault("variant", "paper")  # fused is for the diagonal variants
    model = make_mixed()
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = opt_cls(model, lr=1e-2, gamma=0.8, fused=fused, **kw)
    for _ in range(4):
        x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("opt_cls, kw", [(AdaFisherW, dict(weight_decay=0.1)), (AdaFisher, dict(weight_decay=0.05, variant="reference", update_interval=2))])
def test_fused_update_equals_eager(opt_cls, kw):
    eager, fused = _train(opt_cls, False, **kw), _train(opt_cls, True, **kw)
    for (name, p), q in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_fused_must_be_a_bool():
    with pytest.raises(ValueError, match="Invalid fused: 'yes'"):
        AdaFisher(torch.nn.Linear(2, 2).parameters(), fused="yes", variant="paper")


class _CompileError(torch._dynamo.exc.TorchDynamoException):
    """What tracing or compiling raises (``InductorError`` and Dynamo's errors derive from it)."""


def _failing_compiler(error, writes: bool):
    """A stand-in for the compiled fused update: optionally writes into the parameters and
    moments it was given (as a compiled kernel that ran part-way would), then raises."""

    def make():
        def compiled(params, exp_avgs, *rest):
            if writes:
                for t in (*params, *exp_avgs):
                    t.add_(1.0)
            raise error

        return compiled

    return make


def test_a_failing_compiler_falls_back_to_the_eager_update_with_a_warning(monkeypatch):
    """No C++ compiler (or any failure while tracing or compiling): one warning, then the eager
    update, with exactly the eager numbers — training goes on instead of crashing."""
    from lightning_adafisher import functional as fn

    monkeypatch.setattr(fn, "_fused_step", _failing_compiler(_CompileError("no working C++ compiler found"), writes=False))
    monkeypatch.setattr(fn, "_fused_failure", None)
    with pytest.warns(UserWarning, match=r"torch.compile of the fused update failed \(_CompileError: no working C\+\+"):
        fused = _train(AdaFisherW, True, weight_decay=0.1)
    assert fn._fused_failure is not None
    eager = _train(AdaFisherW, False, weight_decay=0.1)
    for p, q in zip(eager.parameters(), fused.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access"), _CompileError("lazy kernel compile failed")])
def test_a_compiled_update_that_fails_after_writing_is_not_redone_eagerly(monkeypatch, error):
    """A failure after the compiled code wrote part of the update (any error that is not a
    trace/compile error, or one after a write): redoing the step eagerly would apply it twice,
    so the step fails loudly, saying so, and the fallback is not taken."""
    from lightning_adafisher import functional as fn

    monkeypatch.setattr(fn, "_fused_step", _failing_compiler(error, writes=True))
    monkeypatch.setattr(fn, "_fused_failure", None)
    with pytest.raises(RuntimeError, match=r"the compiled update failed while running \((RuntimeError|_CompileError): .*\); parameters and exp_avg may be partly updated"):
        _train(AdaFisherW, True, weight_decay=0.1)
    assert fn._fused_failure is None  # no silent switch to the eager update
