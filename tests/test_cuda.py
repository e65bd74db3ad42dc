"""The CUDA checks: the device's numbers against float64 on CPU (marker ``cuda``).

Deselected by default; ``scripts/device_check.sh`` runs them on a GPU with
``pytest -m cuda tests/test_cuda.py``. The device is ``$ADAFISHER_TEST_DEVICE`` (default
``cuda``), so ``ADAFISHER_TEST_DEVICE=cpu pytest -m cuda tests/test_cuda.py`` checks the same
logic on CPU (where the CUDA-only routes — cuDNN BatchNorm, the deferred skip check — are
replaced by their CPU counterparts).
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_adafisher import AdaFisher, AdaFisherW
from lightning_adafisher.distributed import make_reducer
from lightning_adafisher.state_keys import FACTOR_H, FACTOR_S
from tests.conftest import make_mixed
from tests.test_optim import _HostReads

DEVICE = os.environ.get("ADAFISHER_TEST_DEVICE", "cuda")
ON_CUDA = torch.device(DEVICE).type == "cuda"

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN convolutions default to TF32 (10-bit mantissa): compare true float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

HP = dict(lr=1e-2, beta=0.9, gamma=0.8, damping=1e-3)
EIGEN_HP = dict(lr=1e-2, beta=0.9, beta2=0.95, eps=1e-6, gamma=0.8)


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MixedNet's raw Parameter gets the identity (warned)
        return make()


def _batches(n, device="cpu", dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (4,), generator=g)
        out.append((x.to(device=device, dtype=dtype), y.to(device)))
    return out


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _factors(opt) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer name, the raw folded factors ``(H, S)`` as float64 on CPU."""
    out = {}
    for layer in opt.collector.layers:
        state = opt.state[layer.primary]
        if FACTOR_H in state:
            out[layer.name] = tuple(state[key].detach().double().cpu() for key in (FACTOR_H, FACTOR_S))
    return out


def _assert_factors_close(got, expected, rtol, atol=0.0):
    assert got.keys() == expected.keys() and got
    for name in expected:
        for a, b in zip(got[name], expected[name]):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# --- a. the foreach path on the device equals the single-tensor path in float64 on CPU ------

@pytest.mark.parametrize(("variant", "dtype"), [
    ("paper", torch.float64), ("eigen", torch.float64), ("paper", torch.float32), ("reference", torch.float32),
])
def test_foreach_on_device_equals_single_tensor_float64_on_cpu(variant, dtype):
    """Float64 on the device to 1e-10; float32 on the device to a relative 1e-4 — parameters
    and factors after 4 steps, statistics every other step. No float32 eigen case: its eigh of
    nearly degenerate factors turns float32 rounding into percent-level parameter differences."""
    hp = EIGEN_HP if variant == "eigen" else HP
    cls = AdaFisherW
    cpu_model = make_mixed()
    dev_model = copy.deepcopy(cpu_model).to(device=DEVICE, dtype=dtype)
    cpu_opt = _quiet(lambda: cls(cpu_model, variant=variant, foreach=False, update_interval=2,
                                 weight_decay=0.05, **hp))
    dev_opt = _quiet(lambda: cls(dev_model, variant=variant, foreach=True, update_interval=2,
                                 weight_decay=0.05, **hp))
    _train(cpu_model, cpu_opt, _batches(4))
    _train(dev_model, dev_opt, _batches(4, DEVICE, dtype))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(cpu_model.named_parameters(), dev_model.parameters()):
        assert q.device.type == torch.device(DEVICE).type
        torch.testing.assert_close(q.detach().double().cpu(), p.detach(), **tol, msg=lambda m, n=name: f"{n}: {m}")
    _assert_factors_close(_factors(dev_opt), _factors(cpu_opt), **tol)


# --- b. norm layers read from their kernel ----------------------------------------------------

class _NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.proj = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        tokens = y.flatten(2).transpose(1, 2)
        return self.head(torch.tanh(self.ln(self.proj(tokens)))).mean(1)


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_norm_layer_factors_on_device_equal_float64_on_cpu(variant):
    """BatchNorm2d and LayerNorm on the device in float32 (cuDNN's BN autograd node on CUDA,
    read from its kernel or through the fallback) gather the factors float64 on CPU does
    (the diagonal variants: eigen gives norm layers no factors)."""
    hp = HP
    torch.manual_seed(0)
    cpu_model = _NormNet().double()
    dev_model = copy.deepcopy(cpu_model).to(device=DEVICE, dtype=torch.float32)
    cpu_opt = AdaFisher(cpu_model, variant=variant, **hp)
    dev_opt = AdaFisher(dev_model, variant=variant, **hp)
    _train(cpu_model, cpu_opt, _batches(2))
    _train(dev_model, dev_opt, _batches(2, DEVICE, torch.float32))
    got, expected = _factors(dev_opt), _factors(cpu_opt)
    assert {"bn", "ln"} <= expected.keys()
    _assert_factors_close(got, expected, rtol=1e-4, atol=1e-6)


# --- c. hooks and step read nothing back from the device --------------------------------------

class _HostNet(nn.Module):
    """Conv2d + BatchNorm2d on images, Embedding on tokens, Linear, LayerNorm, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.emb = nn.Embedding(11, 4)
        self.proj = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x, ids):
        image = F.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)  # [B, 64, 4]
        tokens = torch.cat([image, self.emb(ids)], dim=1)
        return self.head(torch.tanh(self.ln(self.proj(tokens)))).mean(1)


@pytest.mark.parametrize("reducer", [None, "ddp"])
@pytest.mark.parametrize("variant", ["paper", "eigen"])
def test_hooks_and_step_on_device_read_nothing_back(variant, reducer):
    """Statistics every step, the skip check deferred (the CUDA default; set on CPU to check
    the same route): after the first step, which builds shape-keyed constants (and for eigen
    checks its first eigenbasis on the host), neither the hooks nor the step reads device data
    back to the host; with the data-parallel reducer (a fake sum over two ranks) neither does
    the pooling of the statistics."""
    torch.manual_seed(0)
    model = _HostNet().to(DEVICE)
    hp = EIGEN_HP if variant == "eigen" else HP
    opt = AdaFisherW(model, variant=variant, update_interval=1, weight_decay=0.1, **hp)
    opt.defer_skip_check = True
    if reducer == "ddp":
        opt.statistics_reducer = make_reducer(lambda t: t + t, torch.device(DEVICE), world_size=2)
    expected = 6 if variant == "paper" else 3  # eigen: conv, proj, head (no norm/embedding factors)
    assert len(opt.collector.layers) == expected
    g = torch.Generator().manual_seed(1)
    for k in range(4):
        x = torch.randn(4, 3, 8, 8, generator=g).to(DEVICE)
        ids = torch.randint(0, 11, (4, 7), generator=g).to(DEVICE)
        y = torch.randint(0, 5, (4,), generator=g).to(DEVICE)
        opt.zero_grad()
        with _HostReads(shapes_from_data=k > 0) as reads:
            F.cross_entropy(model(x, ids), y).backward()
            opt.step()
        if k == 0 and variant == "eigen":
            continue  # the first basis (eigh of the first factors) is checked on the host, once
        assert reads.count == 0, (k, reads.ops)
    assert len(_factors(opt)) == expected


@pytest.mark.parametrize("variant", ["paper", "reference", "eigen"])
def test_counts_pooled_on_device_fold_bitwise_as_host_counts(variant):
    """The reducer's counts stay on the device; dividing by them (the eigen variant: by their
    reciprocal, as a division by a host number does on CUDA) folds bitwise as the host counts
    do. A one-rank all-reduce against no reducer, Linear layers only (deterministic kernels);
    ``b`` runs in some steps only, and keeps its factors bit for bit in the others."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(8, 3)

        def forward(self, x, use_b):
            return self.head(torch.tanh(self.a(x) + (self.b(x) if use_b else 0.0)))

    def train(reducer):
        torch.manual_seed(0)
        model = Two().to(DEVICE)
        hp = dict(EIGEN_HP, eigen_interval=1) if variant == "eigen" else HP
        opt = _quiet(lambda: AdaFisherW(model, variant=variant, weight_decay=0.05, **hp))
        opt.statistics_reducer = reducer
        g = torch.Generator().manual_seed(3)
        seen = []
        for use_b in (True, False, True, False):
            x = torch.randn(6, 5, generator=g).to(DEVICE)
            opt.zero_grad()
            model(x, use_b).square().mean().backward()
            opt.step()
            seen.append([opt.state[model.b.weight][k].clone() for k in (FACTOR_H, FACTOR_S)])
        return model, _factors(opt), seen

    host_model, host, host_b = train(None)
    model, pooled, pooled_b = train(make_reducer(lambda t: t, torch.device(DEVICE), world_size=1))
    assert host.keys() == pooled.keys() == {"a", "b", "head"}
    for name in host:
        for x, y in zip(host[name], pooled[name]):
            assert torch.equal(x, y), name
    for p, q in zip(host_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    for k in range(2):
        assert torch.equal(pooled_b[1][k], pooled_b[0][k]) and torch.equal(pooled_b[3][k], pooled_b[2][k])


# --- d. non-finite statistics on the device ---------------------------------------------------

class _TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2)

    def forward(self, x):
        h = self.first(x)
        return self.second(h.masked_fill(~torch.isfinite(h), 0.0))


def test_nonfinite_statistics_skip_one_layer_and_are_counted_on_device():
    """inf in ``first``'s input: its factors stay, ``second`` folds. On CUDA the flags are read
    one statistics step late, so the count is asserted after the next statistics step."""
    torch.manual_seed(0)
    model = _TwoLinear().to(DEVICE)
    opt = AdaFisher(model, variant="paper", **HP)
    g = torch.Generator().manual_seed(2)
    good = [torch.randn(5, 3, generator=g).to(DEVICE) for _ in range(2)]
    bad = good[0].clone()
    bad[0, 0] = float("inf")

    def step(x):
        opt.zero_grad()
        model(x).square().sum().backward()
        for p in model.parameters():  # inf·0 in first's weight gradient: keep the parameters finite
            p.grad.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()

    step(good[0])
    before = _factors(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(bad)
        after = _factors(opt)
        assert all(torch.isfinite(t).all() for pair in after.values() for t in pair)
        for a, b in zip(after["first"], before["first"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(after["second"][0], before["second"][0])
        assert not torch.equal(after["second"][1], before["second"][1])
        step(good[1])
    assert opt.skipped_statistics() == {"first": 1}
    assert any("not folded" in str(w.message) and "first" in str(w.message) for w in caught)
    assert not any("second" in str(w.message) for w in caught)


# --- e. mixed precision -----------------------------------------------------------------------

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)).to(DEVICE)


def _data(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(64, 10, generator=g).to(DEVICE), torch.randint(0, 3, (64,), generator=g).to(DEVICE))
            for _ in range(n)]


def _fp32_factors(n):
    model = _mlp()
    opt = AdaFisherW(model, variant="paper", **HP)
    _train(model, opt, _data(n))
    return _factors(opt)


def test_fp16_gradscaler_factors_match_fp32_and_overflow_step_is_skipped():
    """``torch.autocast(dtype=float16)`` + ``GradScaler`` as ``docs/lightning.md`` shows it: the
    factors match an fp32 run's (fp16 activations: loose tolerance); a step the scaler skips
    (its scale forced to overflow) leaves factors and step count untouched, statistics
    discarded. fp16 on CPU too (torch >= 2.4 autocasts linear layers to fp16 there)."""
    model = _mlp()
    opt = AdaFisherW(model, variant="paper", **HP)
    scaler = torch.amp.GradScaler(DEVICE)
    data = _data(4)

    def step(x, y):
        opt.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        opt.statistics_grad_scale = scaler.get_scale()
        before = opt.steps_taken
        scaler.step(opt)
        skipped = opt.steps_taken == before
        if skipped:
            opt.discard_statistics()
        scaler.update()
        return skipped

    assert not any(step(x, y) for x, y in data[:3])
    got = _factors(opt)
    for pair in got.values():
        assert all(t.dtype == torch.float64 for t in pair)  # _factors casts: check the state's own
    assert all(opt.state[layer.primary][FACTOR_H].dtype == torch.float32 for layer in opt.collector.layers)
    _assert_factors_close(got, _fp32_factors(3), rtol=2e-2, atol=1e-5)

    scaler.update(new_scale=2.0**120)  # fp16 gradients overflow
    assert step(*data[3])
    assert opt.steps_taken == 3
    _assert_factors_close(_factors(opt), got, rtol=0, atol=0)
    assert opt.skipped_statistics() == {}
    assert scaler.get_scale() < 2.0**120  # the scaler backed off


def test_bf16_autocast_keeps_float32_factors_close_to_fp32():
    model = _mlp()
    opt = AdaFisherW(model, variant="paper", **HP)
    for x, y in _data(3):
        opt.zero_grad()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    for layer in opt.collector.layers:
        state = opt.state[layer.primary]
        assert state[FACTOR_H].dtype == state[FACTOR_S].dtype == torch.float32
    _assert_factors_close(_factors(opt), _fp32_factors(3), rtol=5e-2, atol=1e-4)
