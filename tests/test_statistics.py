"""Hook behaviour: gating, pooling over calls and micro-batches, checkpointing, real models."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_adafisher import AdaFisher, AdaFisherW

DT = torch.float64


class TwoLayer(nn.Module):
    def __init__(self, reuse: bool = False, ckpt: str | None = None) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)
        self.reuse, self.ckpt = reuse, ckpt

    def body(self, x):
        y = torch.tanh(self.a(x))
        if self.reuse:  # the same module called twice per forward
            y = torch.tanh(self.a(y[..., :6] * 0.5)) + y
        return self.b(y)

    def forward(self, x):
        if self.ckpt is None:
            return self.body(x)
        return checkpoint(self.body, x, use_reentrant=self.ckpt == "reentrant")


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _pending(model, x, y):
    opt = AdaFisher(model, variant="paper")
    F.cross_entropy(model(x), y).backward()
    return {k: (v.h_total / v.h_count, v.s_total / v.s_count) for k, v in opt.collector.peek().items()}


def test_module_called_twice_contributes_all_rows():
    torch.manual_seed(0)
    model = TwoLayer(reuse=True).double()
    x, y = _data()
    stats = _pending(model, x, y)
    # brute force: rows of both calls, and G of both outputs
    outs, ins = [], []
    handle = model.a.register_forward_hook(lambda m, a, o: (ins.append(a[0]), outs.append(o)) and None)
    loss = F.cross_entropy(model(x), y)
    handle.remove()
    grads = torch.autograd.grad(loss, outs)
    rows = torch.cat([torch.cat([i, torch.ones(len(i), 1, dtype=DT)], 1) for i in ins])
    torch.testing.assert_close(stats["a"][0], rows.square().mean(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(stats["a"][1], torch.cat(grads).square().mean(0), rtol=1e-13, atol=0)


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_activation_checkpointing_counts_each_call_once(mode):
    torch.manual_seed(0)
    plain = TwoLayer(reuse=True).double()
    ckpt = copy.deepcopy(plain)
    ckpt.ckpt = mode
    x, y = _data()
    if mode == "reentrant":
        x.requires_grad_(True)  # reentrant checkpointing needs an input that requires grad
    expected = _pending(plain, x, y)
    got = _pending(ckpt, x, y)
    assert expected.keys() == got.keys() == {"a", "b"}
    for k in expected:
        torch.testing.assert_close(got[k][0], expected[k][0], rtol=1e-13, atol=0)
        torch.testing.assert_close(got[k][1], expected[k][1], rtol=1e-13, atol=0)


def test_accumulation_over_micro_batches_equals_full_batch():
    torch.manual_seed(0)
    full = TwoLayer().double()
    accum = copy.deepcopy(full)
    opt_full, opt_acc = AdaFisherW(full, lr=0.05, variant="paper"), AdaFisherW(accum, lr=0.05, variant="paper")
    for step in range(3):
        x, y = _data(8, seed=step)
        opt_full.zero_grad()
        F.cross_entropy(full(x), y).backward()
        opt_full.step()
        opt_acc.zero_grad()
        for xs, ys in ((x[:4], y[:4]), (x[4:], y[4:])):
            (F.cross_entropy(accum(xs), ys) / 2).backward()
        opt_acc.step()
    for p, q in zip(full.parameters(), accum.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert opt_acc.state[accum.a.weight]["factor_updates"] == 3


def test_no_statistics_in_eval_mode_or_without_grad():
    model = TwoLayer().double()
    opt = AdaFisher(model, variant="paper")
    x, y = _data()
    model.eval()
    F.cross_entropy(model(x), y).backward()
    model.train()
    with torch.no_grad():
        model(x)
    assert opt.collector.pending == {}


def test_statistics_only_on_interval_steps():
    model = TwoLayer().double()
    opt = AdaFisher(model, update_interval=3, variant="paper")
    x, y = _data()
    seen = []
    for _ in range(7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        seen.append(bool(opt.collector.pending))
        opt.step()
    assert seen == [True, False, False, True, False, False, True]
    assert opt.state[model.a.weight]["factor_updates"] == 3


def test_torchvision_resnet18_with_inplace_relu_trains_without_warnings():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = AdaFisherW(model, lr=1e-3, weight_decay=5e-4, variant="paper")
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    bound = {layer.name for layer in opt.collector.layers}
    supported = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))}
    assert bound == supported
    for name in bound:
        state = opt.state[model.get_submodule(name).weight]
        assert state["factor_updates"] == 3
        assert torch.isfinite(state["factor_h"]).all() and torch.isfinite(state["factor_s"]).all()
    assert losses[-1] < losses[0]  # the same batch three times: the loss must go down


def test_bf16_activations_give_float32_statistics():
    lin = nn.Linear(4, 3).to(torch.bfloat16)
    opt = AdaFisher(lin, variant="paper")
    lin(torch.randn(5, 4, dtype=torch.bfloat16)).float().sum().backward()
    pending = opt.collector.peek()["Linear"]
    assert pending.h_total.dtype == pending.s_total.dtype == torch.float32
    opt.step()
    assert opt.state[lin.weight]["factor_h"].dtype == torch.float32


class _NormNet(nn.Module):
    """A norm layer under test between two linear maps; ``twice`` calls it on two inputs."""

    def __init__(self, norm: nn.Module, shape: tuple[int, ...], twice: bool = False) -> None:
        super().__init__()
        self.norm, self.shape, self.twice = norm, shape, twice
        self.inp = nn.Linear(6, math.prod(shape))
        self.out = nn.Linear(math.prod(shape), 3)

    def forward(self, x):
        z = self.inp(x).view(len(x), *self.shape)
        y = self.norm(z)
        if self.twice:
            y = y + self.norm(z * 0.5 + 1.0)
        y = torch.relu_(y)  # in place, after the module returned
        return self.out(y.reshape(len(x), -1))


def _norm_cases():
    frozen = nn.BatchNorm1d(4)
    frozen.bias.requires_grad_(False)
    return {
        "bn1d": (nn.BatchNorm1d(4), (4,), True),
        "bn1d_seq": (nn.BatchNorm1d(4), (4, 5), True),
        "bn2d": (nn.BatchNorm2d(4), (4, 3, 2), True),
        "bn2d_twice": (nn.BatchNorm2d(4), (4, 3, 2), True),
        "ln": (nn.LayerNorm(5), (4, 5), True),
        "ln_2d_shape": (nn.LayerNorm((4, 5)), (3, 4, 5), True),
        "ln_no_bias": (nn.LayerNorm(5, bias=False), (4, 5), False),
        "bn_frozen_bias": (frozen, (4, 3), False),
    }


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("case", list(_norm_cases()))
def test_norm_statistics_from_the_kernel_equal_the_ones_from_x_and_g(case, ckpt):
    """BatchNorm/LayerNorm read ``s`` off the bias gradient their backward computes (node
    post-hook) and ``h`` off the mean their kernel saved, instead of passes over ``G`` and ``x``;
    both must equal the formulas of docs/numerics.md, per call. Under activation checkpointing (saved-tensor
    hooks active) the mean is not read and ``h`` comes from ``x``."""
    from lightning_adafisher.layers import layer_helper_for
    from lightning_adafisher.statistics import _bias_slot, _norm_kernel_node, _saved_mean

    torch.manual_seed(0)
    norm, shape, uses_bias_grad = _norm_cases()[case]
    model = _NormNet(norm, shape, twice=case.endswith("twice")).double()
    helper = layer_helper_for(model.norm)
    x, y = _data(8)
    inputs, grads, s_routes, h_routes = [], [], [], []

    def record(module, args, output):
        inputs.append(args[0].detach().clone())
        node = _norm_kernel_node(output)
        s_routes.append(node is not None and _bias_slot(node, module) is not None)
        layout = helper.saved_mean_layout(module, tuple(args[0].shape))
        h_routes.append(layout is not None and node is not None and _saved_mean(node, layout[0]) is not None)
        output.register_hook(grads.append)  # G as produced, before the in-place relu_

    handle = model.norm.register_forward_hook(record)
    opt = AdaFisher(model, variant="paper")
    if ckpt:
        loss = F.cross_entropy(checkpoint(model, x, use_reentrant=False), y)
    else:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    handle.remove()
    calls = 2 if model.twice else 1
    if ckpt:  # the recomputation's forward hooks ran too: keep the original forward's calls
        inputs, s_routes, h_routes = inputs[:calls], s_routes[:calls], h_routes[:calls]
    assert s_routes == [uses_bias_grad] * calls
    assert h_routes == [not ckpt] * calls
    pending = opt.collector.peek()["norm"]
    expected_s = [helper.output_stats(model.norm, g, "paper") for g in grads]
    expected_h = [helper.input_stats(model.norm, i, "paper") for i in inputs]
    assert pending.s_count == sum(c for _, c in expected_s) == calls
    assert pending.h_count == sum(c for _, c in expected_h) == calls
    torch.testing.assert_close(pending.s_total, sum(t for t, _ in expected_s), rtol=1e-12, atol=0)
    torch.testing.assert_close(pending.h_total, sum(t for t, _ in expected_h), rtol=1e-12, atol=0)


def test_layernorm_over_dim_1_reads_h_from_x():
    """A LayerNorm of a ``[B, D]`` input normalises dim 1, whose sums the row means do not hold:
    ``h`` comes from ``x`` (and still equals the formula of docs/numerics.md)."""
    from lightning_adafisher.layers import layer_helper_for

    norm = nn.LayerNorm(4)
    assert layer_helper_for(norm).saved_mean_layout(norm, (8, 4)) is None
    assert layer_helper_for(norm).saved_mean_layout(norm, (8, 3, 4)) == ((8, 3, 1), 4)


def test_norm_statistic_skips_a_backward_that_does_not_reach_the_bias():
    """``autograd.grad`` w.r.t. the input alone (a gradient penalty) computes no bias gradient:
    that backward adds no ``s``, and nothing fails."""
    torch.manual_seed(0)
    model = _NormNet(nn.BatchNorm1d(4), (4,)).double()
    x, y = _data(8)
    x.requires_grad_(True)
    opt = AdaFisher(model, variant="paper")
    (gx,) = torch.autograd.grad(F.cross_entropy(model(x), y), [x])
    assert torch.isfinite(gx).all()
    assert opt.collector.pending["norm"].s_count == 0
    assert opt.collector.pending["out"].s_count == 8  # G-based layers still see their G


@pytest.mark.parametrize("size", [6, 40])
def test_conv_window_sums_finished_at_the_step_equal_the_eager_ones(size, monkeypatch):
    """The forward hook keeps the batch-summed ``x²`` and finishes the conv's ``h`` at the
    step; the result is bitwise the eager :meth:`input_stats`. Above ``DEFER_MAX`` entries the
    hook finishes it at once (bounded memory)."""
    from lightning_adafisher import functional as fn
    from lightning_adafisher.layers import layer_helper_for

    monkeypatch.setattr(fn, "DEFER_MAX", 3 * 20 * 20)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(5, 3, size, size, dtype=DT)
    model(x)
    opt = AdaFisher(model, variant="paper")
    F.cross_entropy(model(x), torch.tensor([0, 1, 0, 1, 1])).backward()
    parts = opt.collector.pending["0"].h
    assert callable(parts[0]) is (3 * size * size <= fn.DEFER_MAX)
    expected, count = layer_helper_for(conv).input_stats(conv, x, "paper")
    assert opt.collector.pending["0"].h_count == count
    assert torch.equal(opt.collector.peek()["0"].h_total, expected)


def test_norm_statistics_of_a_step_are_finished_together_with_the_per_layer_numbers():
    """Every norm layer's deferred parts (bias-gradient ``s``, saved-mean ``h``) of a step are
    finished in one batch when the optimizer consumes them; BatchNorm 1d/2d and a LayerNorm over
    two dims, one of them called twice, each equal the formulas of docs/numerics.md on that layer's own ``x``
    and ``G`` (float64, 1e-12)."""
    from lightning_adafisher.layers import layer_helper_for
    from lightning_adafisher.statistics import NormPart

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 48)
            self.bn1, self.bn2, self.ln = nn.BatchNorm1d(48), nn.BatchNorm2d(3), nn.LayerNorm((4, 4))
            self.out = nn.Linear(48, 3)

        def forward(self, x):
            z = self.bn1(self.inp(x))
            z = self.bn1(z * 0.5 + 1.0) + z  # bn1 called twice
            # tanh between the norms, offsets: no sums that vanish identically (G of a layer
            # feeding a norm sums to zero over the normalised dims) and non-zero means
            z = self.bn2(torch.tanh(z).view(-1, 3, 4, 4) + 1.0)
            return self.out(self.ln(torch.tanh(z) + 0.5).reshape(len(x), -1))

    torch.manual_seed(0)
    model = Net().double()
    x, y = _data(8)
    opt = AdaFisher(model, variant="paper")
    seen = {name: ([], []) for name in ("bn1", "bn2", "ln")}
    handles = []
    for name, (inputs, grads) in seen.items():
        module = getattr(model, name)

        def keep(mod, args, out, inputs=inputs, grads=grads):
            inputs.append(args[0].detach().clone())
            out.register_hook(lambda g: grads.append(g.detach().clone()))

        handles.append(module.register_forward_hook(keep))
    F.cross_entropy(model(x), y).backward()
    for handle in handles:
        handle.remove()
    pending = opt.collector.pending
    for name in seen:
        assert all(isinstance(part, NormPart) for part in pending[name].h + pending[name].s)
    consumed = opt.collector.consume()
    for name, (inputs, grads) in seen.items():
        module = getattr(model, name)
        helper = layer_helper_for(module)
        expected_h = sum(helper.input_stats(module, i, "paper")[0] for i in inputs)
        expected_s = sum(helper.output_stats(module, g, "paper")[0] for g in grads)
        assert isinstance(consumed[name].h_total, Tensor) and isinstance(consumed[name].s_total, Tensor)
        assert consumed[name].h_count == consumed[name].s_count == len(inputs) == (2 if name == "bn1" else 1)
        torch.testing.assert_close(consumed[name].h_total, expected_h, rtol=1e-12, atol=0)
        torch.testing.assert_close(consumed[name].s_total, expected_s, rtol=1e-12, atol=0)


def test_layers_reading_one_input_share_its_pass(monkeypatch):
    """A ResNet-style block (3×3 stride-2 conv, another conv, then a 1×1 stride-2 shortcut on the
    block's input) and q/k projections on the same tokens: ``h`` of every layer equals the
    float64 brute force, with one pass over each shared input (counted)."""
    from lightning_adafisher import functional as fn
    from tests import reference as ref

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
            self.mid = nn.Conv2d(4, 4, 3, padding=1)
            self.short = nn.Conv2d(3, 4, 1, stride=2)
            self.q, self.k = nn.Linear(4, 5), nn.Linear(4, 5, bias=False)
            self.out = nn.Linear(5, 3)

        def body(self, x):  # the shortcut reads x after another conv, as in a ResNet block
            return torch.tanh(self.mid(torch.tanh(self.conv(x))) + self.short(x))

        def forward(self, x):
            t = self.body(x).flatten(2).transpose(1, 2)  # tokens [B, L, 4]
            return self.out(torch.tanh(self.q(t)) * self.k(t)).mean(1)

    torch.manual_seed(0)
    model = Block().double()
    x = torch.randn(4, 3, 6, 6, dtype=DT)
    y = torch.randint(0, 3, (4,))
    passes = []
    real = fn._as_stats
    monkeypatch.setattr(fn, "_as_stats", lambda t: passes.append(tuple(t.shape)) or real(t))
    opt = AdaFisher(model, variant="paper")
    with torch.no_grad():
        tokens = model.body(x).flatten(2).transpose(1, 2)
    F.cross_entropy(model(x), y).backward()
    pending = opt.collector.consume()
    for name, layer, expected in (
        ("conv", model.conv, ref.conv_h(model.conv, x, "paper")),
        ("short", model.short, ref.conv_h(model.short, x, "paper")),
        ("q", model.q, ref.linear_h(tokens, bias=True)),
        ("k", model.k, ref.linear_h(tokens, bias=False)),
    ):
        got = pending[name].h_total / pending[name].h_count
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert passes.count((4, 3, 6, 6)) == 1 and passes.count((4, 9, 4)) == 1


@pytest.mark.parametrize("rows", [False, True])
def test_a_shared_pass_is_not_reused_after_an_in_place_change(rows):
    """The hooks' reuse of ``Σ x²`` is keyed on the tensor object and its version counter: an
    in-place change (or another tensor) gets a fresh pass, the same tensor gets the same result."""
    from lightning_adafisher import functional as fn

    x = torch.randn(4, 3, 5, 5, dtype=DT)
    first = fn._square_sum(x, rows=rows, reuse=True)
    assert fn._square_sum(x, rows=rows, reuse=True) is first
    x.mul_(0.5)
    again = fn._square_sum(x, rows=rows, reuse=True)
    torch.testing.assert_close(again, first * 0.25, rtol=1e-14, atol=0)
    other = x.clone()
    assert fn._square_sum(other, rows=rows, reuse=True) is not again
    assert fn._square_sum(other, rows=not rows, reuse=True).shape != again.shape


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["paper", "eigen"])
def test_a_compiled_model_gathers_the_statistics_of_the_eager_one(variant):
    """``torch.compile(model)`` with the hooks installed (dynamo runs them, graph-breaking where
    it must): the same layers get the same statistics as the eager model on the same batch,
    including two convs that read one input (the shared pass)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.d = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
            self.out = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.c(x) + self.d(x)).flatten(1))

    torch.manual_seed(0)
    model = Net()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    opt = AdaFisher(model, variant=variant)
    F.cross_entropy(model(x), y).backward()
    eager = {k: (v.h_total.clone(), v.s_total.clone(), v.h_count, v.s_count) for k, v in opt.collector.consume().items()}
    model.zero_grad()
    F.cross_entropy(torch.compile(model)(x), y).backward()
    compiled = opt.collector.consume()
    assert sorted(compiled) == sorted(eager) == ["c", "d", "out"]
    for name, (h, s, h_count, s_count) in eager.items():
        got = compiled[name]
        assert (got.h_count, got.s_count) == (h_count, s_count)
        # full factors (eigen) hold entries near zero: there, tolerance relative to the largest
        for got_total, want in ((got.h_total, h), (got.s_total, s)):
            atol = 0.0 if variant == "paper" else 1e-5 * want.abs().max().item()
            torch.testing.assert_close(got_total, want, rtol=1e-5, atol=atol)


@pytest.mark.slow
def test_compiling_a_batchnorm_model_under_the_hooks_gives_no_dynamo_cache_warning():
    """``torch.compile(model)`` runs the hooks inside its trace: the statistics' cached
    constants are built uncached there (Dynamo warned about the ``lru_cache`` before), and the
    statistics equal the eager ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    opt = AdaFisher(model, variant="paper")
    F.cross_entropy(model(x), y).backward()
    eager = {k: (v.h_total.clone(), v.s_total.clone()) for k, v in opt.collector.consume().items()}
    model.zero_grad()
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.cross_entropy(torch.compile(model)(x), y).backward()
    compiled = opt.collector.consume()
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]
    assert sorted(compiled) == sorted(eager) == ["0", "1", "4"]
    for name, (h, s) in eager.items():
        torch.testing.assert_close(compiled[name].h_total, h, rtol=1e-5, atol=0)
        torch.testing.assert_close(compiled[name].s_total, s, rtol=1e-5, atol=0)
