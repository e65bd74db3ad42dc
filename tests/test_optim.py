"""AdaFisher(W) against the float64 reference; state_dict; foreach; errors and warnings."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_adafisher import AdaFisher, AdaFisherW
from lightning_adafisher.distributed import make_reducer
from tests.conftest import make_mixed
from tests.reference import ReferenceAdaFisher

HP = dict(lr=1e-2, beta=0.9, gamma=0.8, damping=1e-3)


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (4,), generator=g))
        for _ in range(n)
    ]


def _run(opt_cls, model, batches, **kw):
    kw.setdefault("variant", "paper")  # this module tests the diagonal variants
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the raw Parameter's identity warning is tested below
        opt = opt_cls(model, **kw)
    for batch in batches:
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("interval", [1, 3])
def test_matches_float64_reference(variant, decoupled, interval):
    batches = _batches(5)
    model = make_mixed()
    reference_model = copy.deepcopy(model)
    wd = 0.05
    _run(AdaFisherW if decoupled else AdaFisher, model, batches,
         weight_decay=wd, update_interval=interval, variant=variant, **HP)
    reference = ReferenceAdaFisher(
        reference_model, weight_decay=wd, update_interval=interval, variant=variant,
        decoupled=decoupled, **HP,
    )
    for batch in batches:
        reference.step(lambda m: _loss(m, batch))
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10, msg=lambda m: f"{name}: {m}")
    # the run moved every parameter (the comparison is not between two untouched models)
    fresh = make_mixed()
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert not torch.equal(p, q)


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_foreach_equals_single_tensor(variant):
    batches = _batches(4)
    a, b = make_mixed(), make_mixed()
    _run(AdaFisherW, a, batches, variant=variant, weight_decay=0.1, foreach=False, **HP)
    _run(AdaFisherW, b, batches, variant=variant, weight_decay=0.1, foreach=True, **HP)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("interval", [1, 3])
def test_state_dict_round_trip_continues_identically(interval):
    batches = _batches(7)
    model = make_mixed()
    opt = _run(AdaFisherW, model, batches[:4], update_interval=interval, weight_decay=0.01, **HP)
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())

    for batch in batches[4:]:  # the uninterrupted run
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()

    resumed = make_mixed(seed=123)
    resumed.load_state_dict(saved_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt2 = AdaFisherW(resumed, update_interval=interval, weight_decay=0.01, variant="paper", **HP)
    opt2.load_state_dict(saved)
    for batch in batches[4:]:
        opt2.zero_grad()
        _loss(resumed, batch).backward()
        opt2.step()
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert opt2.state["adafisher"]["steps"] == opt.state["adafisher"]["steps"] == 7


def test_state_dict_counters_are_copies():
    model = make_mixed()
    opt = _run(AdaFisher, model, _batches(1), **HP)
    sd = opt.state_dict()
    _run_step = _batches(1, seed=5)[0]
    opt.zero_grad()
    _loss(model, _run_step).backward()
    opt.step()
    assert sd["state"]["adafisher"]["steps"] == 1


def test_factors_live_in_state_of_each_layers_first_parameter():
    model = make_mixed()
    opt = _run(AdaFisher, model, _batches(2), **HP)
    for module in (model.conv, model.bn, model.proj, model.ln, model.head):
        state = opt.state[module.weight]
        assert state["factor_updates"] == 2
        assert state["factor_h"].dtype == torch.float64
    assert "factor_h" not in opt.state[model.conv.bias]
    assert "factor_h" not in opt.state[model.scale]


def test_hooks_fully_removed():
    model = make_mixed()
    opt = AdaFisher(model.parameters(), variant="paper", **HP)
    before = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    with pytest.warns(UserWarning, match="scale"):
        opt.attach(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 6
    opt.detach()
    after = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    assert before == after
    # no tensor hooks linger either: a backward after detach gathers nothing
    _loss(model, _batches(1)[0]).backward()
    assert opt.collector is None


def test_identity_warning_names_the_parameters():
    model = make_mixed()
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) have no supported layer .*: scale"):
        AdaFisher(model, variant="paper")


def test_unattached_optimizer_warns_once_and_uses_identity():
    lin = nn.Linear(3, 2)
    opt = AdaFisher(lin.parameters(), lr=0.1, variant="paper")
    lin(torch.randn(4, 3)).sum().backward()
    before = lin.weight.detach().clone()
    with pytest.warns(UserWarning, match="no statistics hooks"):
        opt.step()
    # identity (paper): p ← p − lr · m̂ / (1 + λ), m̂ = g at t = 1
    torch.testing.assert_close(lin.weight, before - 0.1 * lin.weight.grad / 1.001)


def test_no_hooks_warning_points_at_the_callers_line():
    """``step`` is wrapped by ``torch.no_grad`` and torch.optim's profiling wrapper (and an LR
    scheduler's, once one is attached): the warning still names this file, not torch's."""
    lin = nn.Linear(3, 2)
    opt = AdaFisher(lin.parameters(), lr=0.1, variant="paper")
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    lin(torch.randn(4, 3)).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    [w] = [w for w in caught if "no statistics hooks" in str(w.message)]
    assert w.filename == __file__


def _fake_rank(monkeypatch, rank):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)


@pytest.mark.parametrize("rank", [0, 1])
def test_optimizer_warnings_are_printed_on_rank_zero_only(monkeypatch, rank):
    """Under DDP every rank runs the same code: identity, no-hooks and skipped-statistics
    warnings print once, on rank zero; the counters are kept on every rank."""
    _fake_rank(monkeypatch, rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AdaFisher(make_mixed(), variant="paper")  # identity: the raw Parameter
        lin = nn.Linear(3, 2).double()
        AdaFisher(lin.parameters(), lr=0.1, variant="paper").step()  # no hooks
        opt = AdaFisher(lin, lr=0.1, variant="paper")
        bad = torch.full((4, 3), float("inf"), dtype=torch.float64)
        out = lin(bad)
        out.masked_fill(~torch.isfinite(out), 0.0).sum().backward()
        opt.step()  # non-finite statistics
    messages = [str(w.message) for w in caught if "AdaFisher" in str(w.message)]
    assert len(messages) == (3 if rank == 0 else 0), messages
    assert opt.state["adafisher"]["skipped_statistics"] == {"Linear": 1}


def test_no_supported_layer_warns():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    with pytest.warns(UserWarning, match="Bare has no supported layer"):
        AdaFisher(Bare(), variant="paper")


def test_frozen_parameters_skipped():
    model = make_mixed()
    model.conv.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisher(model, variant="paper", **HP)
    assert "conv" not in [layer.name for layer in opt.collector.layers]
    assert len(model.conv._forward_hooks) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(beta=1.0), "Invalid beta: 1.0"),
        (dict(gamma=-0.1), "Invalid gamma: -0.1"),
        (dict(damping=0.0), "Invalid damping: 0.0"),
        (dict(damping=float("nan")), "Invalid damping: nan"),
        (dict(weight_decay=-1e-4), "Invalid weight_decay: -0.0001"),
        (dict(update_interval=0), "Invalid update_interval: 0"),
        (dict(update_interval=2.5), "Invalid update_interval: 2.5"),
        (dict(variant="kfac"), "Invalid variant: 'kfac' (expected 'paper', 'reference' or 'eigen')"),
        (dict(lr="abc"), "Invalid lr: 'abc' (expected a real number)"),
        (dict(lr=torch.tensor(0.1)), "Invalid lr: tensor(0.1000) (expected a real number)"),
        (dict(beta="0.9"), "Invalid beta: '0.9' (expected a real number)"),
        (dict(gamma=None), "Invalid gamma: None (expected a real number)"),
        (dict(damping=[1e-3]), "Invalid damping: [0.001] (expected a real number)"),
        (dict(weight_decay=True), "Invalid weight_decay: True (expected a real number)"),
        (dict(beta2="x"), "Invalid beta2: 'x' (expected a real number)"),
        (dict(eps=1j), "Invalid eps: 1j (expected a real number)"),
    ],
)
def test_bad_hyperparameters_raise_with_the_value(kwargs, message):
    with pytest.raises(ValueError) as err:
        AdaFisher(nn.Linear(2, 2).parameters(), **{"variant": "paper", **kwargs})
    assert message in str(err.value)


def test_param_groups_must_share_variant_and_interval():
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Invalid update_interval: 5 differs between param groups"):
        AdaFisher([{"params": [lin.weight]}, {"params": [lin.bias], "update_interval": 5}], variant="paper")
    opt = AdaFisher([{"params": [lin.weight]}, {"params": [lin.bias], "weight_decay": 0.0}], weight_decay=0.1, variant="paper")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_unsupported_padding_mode_is_refused():
    conv = nn.Conv2d(2, 2, 3)
    conv.padding_mode = "mirror"
    with pytest.raises(ValueError, match="Unsupported Conv2d padding_mode: 'mirror'"):
        AdaFisher(conv, variant="paper")


def test_attach_twice_is_an_error():
    lin = nn.Linear(2, 2)
    opt = AdaFisher(lin, variant="paper")
    with pytest.raises(RuntimeError, match="already attached"):
        opt.attach(lin)


def test_closure_is_called_and_returned():
    lin = nn.Linear(3, 1)
    opt = AdaFisher(lin, variant="paper")
    x = torch.randn(5, 3)

    def closure():
        opt.zero_grad()
        loss = lin(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and opt.state[lin.weight]["factor_updates"] == 1


def test_non_finite_statistics_leave_factors_unchanged_and_warn():
    lin = nn.Linear(3, 2).double()
    opt = AdaFisher(lin, lr=0.1, variant="paper")
    x = torch.randn(4, 3, dtype=torch.float64)
    lin(x).sum().backward()
    opt.step()
    H = opt.state[lin.weight]["factor_h"].clone()
    opt.zero_grad()
    bad = x.clone()
    bad[0, 0] = float("inf")
    out = lin(bad)
    out.masked_fill(~torch.isfinite(out), 0.0).sum().backward()
    with pytest.warns(UserWarning, match=r"statistics containing inf/NaN were not folded into the factors of Linear"):
        opt.step()
    assert torch.equal(opt.state[lin.weight]["factor_h"], H)
    assert opt.state["adafisher"]["skipped_statistics"] == {"Linear": 1}


def test_parameters_without_gradient_are_left_alone():
    model = make_mixed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisherW(model, weight_decay=0.5, variant="paper", **HP)
    before = model.scale.detach().clone()
    _loss(model, _batches(1)[0]).backward()
    model.scale.grad = None
    opt.step()
    assert torch.equal(model.scale, before)


def test_blocked_kron_update_is_bitwise_the_unblocked_one(monkeypatch):
    """Weights larger than UPDATE_BLOCK are updated in blocks of rows; every element sees the
    same ops, so any block size gives the same bits (here blocks of 1, 2 and 7 rows)."""
    from lightning_adafisher import functional as fn

    def train(block):
        monkeypatch.setattr(fn, "UPDATE_BLOCK", block)
        model = make_mixed(dtype=torch.float32)
        g = torch.Generator().manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = AdaFisher(model, lr=1e-2, weight_decay=0.1, variant="paper")
        for _ in range(3):
            x = torch.randn(4, 3, 8, 8, generator=g)
            y = torch.randint(0, 5, (4,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    whole = train(1 << 30)
    for block in (1, 50, 7 * 27):
        for p, q in zip(whole, train(block)):
            assert torch.equal(p, q)


def test_multi_tensor_update_bounds_f_by_chunks_with_the_single_tensor_numbers(monkeypatch):
    """The multi-tensor path writes F into the scratch buffer chunk by chunk (at most
    UPDATE_BLOCK elements at once; larger weights go through the blocked path) and gives the
    same bits whatever the chunk size, and the single-tensor path's for every Kronecker
    parameter."""
    from lightning_adafisher import functional as fn

    def train(foreach, block, steps=3):
        monkeypatch.setattr(fn, "UPDATE_BLOCK", block)
        model = make_mixed(dtype=torch.float32)
        g = torch.Generator().manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = AdaFisherW(model, lr=1e-2, weight_decay=0.1, foreach=foreach, variant="paper")
        requested = []
        scratch = opt._scratch
        opt._scratch = lambda n, dtype, device: requested.append(n) or scratch(n, dtype, device)
        for _ in range(steps):
            x = torch.randn(4, 3, 8, 8, generator=g)
            y = torch.randint(0, 5, (4,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], requested

    single, _ = train(False, 1 << 30)
    whole, _ = train(True, 1 << 30)
    names = [name for name, _ in make_mixed().named_parameters()]
    for name, p, q in zip(names, single, whole):
        if name == "scale":  # identity fallback: foreach multiplies, then adds (rounds twice)
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(p, q), name
    largest = max(p.numel() for p in make_mixed().parameters())
    for block in (largest, largest + 50):  # several chunks: the same bits
        params, requested = train(True, block)
        for p, q in zip(whole, params):
            assert torch.equal(p, q)
        assert requested and max(requested) <= block
    # the largest weights exceed the chunk: blocked single-tensor path (its vector tails round
    # differently from the whole-tensor kernels, so one step is compared: rounding only), still
    # never more than a chunk of F at once
    one_step, _ = train(True, 1 << 30, steps=1)
    params, requested = train(True, largest - 1, steps=1)
    for p, q in zip(one_step, params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert requested and max(requested) <= largest - 1


def test_scratch_views_are_made_once_per_buffer_and_dropped_with_it():
    """The multi-tensor update's views of the scratch buffer are cached per buffer and layout
    (the same objects on the next step) and forgotten when the buffer is freed (detach)."""
    from lightning_adafisher import functional as fn

    model = make_mixed(dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisherW(model, lr=1e-2, foreach=True, variant="paper")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    seen = []
    original = fn._kron_denominators

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append([id(t) for t in out])
        return out

    fn._kron_denominators = spy
    try:
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        fn._kron_denominators = original
    assert len(seen) == 3 and seen[0] and seen[0] == seen[1] == seen[2]
    buffers = {id(t) for t in opt._workspace.values()}
    assert {key[0] for key in fn._scratch_layouts} & buffers
    opt.detach()  # frees the scratch buffer
    assert not {key[0] for key in fn._scratch_layouts} & buffers


def test_channels_last_weights_take_the_materialised_path_with_the_same_numbers():
    """A channels_last conv weight cannot be viewed as [out, in·kh·kw]: its F is materialised
    in the weight's own shape instead, and training matches the contiguous model."""

    def train(channels_last):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            assert not model[0].weight.is_contiguous()
        g = torch.Generator().manual_seed(1)
        opt = AdaFisher(model, lr=1e-2, variant="paper")
        for _ in range(3):
            x = torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64)
            opt.zero_grad()
            F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1])).backward()
            opt.step()
        return [p.detach().contiguous() for p in model.parameters()]

    for p, q in zip(train(False), train(True)):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ops that read device data back to the host: tensor → Python scalar conversions
    (.item(), bool(), float()) and ops whose output shape depends on the data (bincount,
    nonzero, masked_select: sized from a value read back), and ``Tensor.tolist()``, which copies
    every element to the host without dispatching a scalar read. On an accelerator each one
    waits for the device."""

    SYNCING_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)

    def __init__(self, shapes_from_data: bool = True) -> None:
        super().__init__()
        self.tags = self.SYNCING_TAGS if shapes_from_data else self.SYNCING_TAGS[:1]
        self.count = 0
        self.ops: list[str] = []
        self._lists = _ListReads(self)

    def __enter__(self):
        self._lists.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._lists.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(tag in func.tags for tag in self.tags):
            self.count += 1
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _ListReads(torch.overrides.TorchFunctionMode):
    """``Tensor.tolist()`` calls, counted into a :class:`_HostReads`."""

    def __init__(self, reads: _HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.reads.count += 1
            self.reads.ops.append("Tensor.tolist")
        return func(*args, **(kwargs or {}))


class _TokenNet(nn.Module):
    """Embedding, transformers' Conv1D (when installed), LayerNorm and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:
            self.proj = nn.Linear(6, 8)
        else:
            self.proj = Conv1D(8, 6)
        self.ln, self.head = nn.LayerNorm(8), nn.Linear(8, 5)

    def forward(self, ids):
        return self.head(torch.tanh(self.ln(self.proj(self.emb(ids))))).mean(1)


def _token_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 11, (4, 7), generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("reducer", [None, "ddp"])
@pytest.mark.parametrize("net", ["mixed", "tokens"])
def test_hooks_and_step_read_nothing_back_from_the_device(net, reducer):
    """With the skip check deferred (the CUDA default), neither the statistics hooks nor the
    step (fold + update) read anything back from the device: conv, BatchNorm, Linear on
    tokens, LayerNorm, a raw Parameter; Embedding and Conv1D. With the data-parallel reducer
    (DDP's, and FSDP2's, which is the same with another all-reduce; here a fake sum over two
    ranks) the pooled counts stay on the device too."""
    torch.manual_seed(0)
    model, batches = (make_mixed(), _batches(3)) if net == "mixed" else (_TokenNet().double(), _token_batches(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisherW(model, weight_decay=0.1, variant="paper", **HP)
    opt.defer_skip_check = True
    if reducer == "ddp":
        opt.statistics_reducer = make_reducer(lambda t: t + t, torch.device("cpu"), world_size=2)
    assert len(opt.collector.layers) == (6 if net == "mixed" else 4)
    for k, (x, y) in enumerate(batches):
        opt.zero_grad()
        # The first step builds shape-keyed constants (cached) from Python values on the host,
        # with data-dependent shapes but no device data; from then on, nothing at all.
        with _HostReads(shapes_from_data=k > 0) as reads:
            _loss(model, (x, y)).backward()
            opt.step()
        assert reads.count == 0, reads.ops
        assert opt._pending_check is not None  # this step's flags left unread for later


def test_deferred_skip_check_reports_at_the_next_statistics_step_and_in_state_dict():
    lin = nn.Linear(3, 2).double()
    opt = AdaFisher(lin, lr=0.1, variant="paper")
    opt.defer_skip_check = True
    x = torch.randn(4, 3, dtype=torch.float64)
    bad = x.clone()
    bad[0, 0] = float("inf")

    def step(inp):
        opt.zero_grad()
        out = lin(inp)
        out.masked_fill(~torch.isfinite(out), 0.0).sum().backward()
        opt.step()

    step(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(bad)  # flagged on device, not read yet
    assert opt.state["adafisher"]["skipped_statistics"] == {}
    with pytest.warns(UserWarning, match=r"statistics containing inf/NaN were not folded into the factors of Linear"):
        step(x)
    assert opt.state["adafisher"]["skipped_statistics"] == {"Linear": 1}
    step(bad)
    with pytest.warns(UserWarning, match="not folded"):
        saved = opt.state_dict()
    assert saved["state"]["adafisher"]["skipped_statistics"] == {"Linear": 2}


def test_layers_of_different_dtypes_fold_in_separate_flat_batches():
    """The flat fold groups layers by device and statistics dtype: a float64 layer next to a
    float32 one keeps float64 factors, and each holds its own first statistics exactly."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4).double()
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)).float())

    torch.manual_seed(0)
    model = Mixed()
    opt = AdaFisher(model, lr=1e-2, variant="paper")
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        hidden = torch.tanh(model.a(x)).float()
    model(x).square().sum().backward()
    opt.step()
    ones = torch.ones(5, 1)
    h_a = torch.cat((x, ones.double()), 1).square().mean(0)
    h_b = torch.cat((hidden, ones), 1).square().mean(0)
    state_a, state_b = opt.state[model.a.weight], opt.state[model.b.weight]
    assert state_a["factor_h"].dtype == torch.float64 and state_b["factor_h"].dtype == torch.float32
    torch.testing.assert_close(state_a["factor_h"], h_a, rtol=1e-14, atol=0)
    torch.testing.assert_close(state_b["factor_h"], h_b, rtol=1e-6, atol=0)


def test_bfloat16_model_keeps_its_float32_factors_bit_for_bit_across_load_state_dict():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisherW(net, lr=1e-2, variant="paper")
        opt2 = AdaFisherW(net, lr=1e-2, variant="paper")
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    for _ in range(3):
        opt.zero_grad()
        net(x).float().square().mean().backward()
        opt.step()
    saved = opt.state_dict()
    opt2.load_state_dict(saved)
    for key in ("factor_h", "factor_s"):
        before, after = opt.state[net[0].weight][key], opt2.state[net[0].weight][key]
        assert after.dtype == torch.float32 and torch.equal(before, after), key
        assert after.data_ptr() != before.data_ptr()  # a copy: the saved dict stays the caller's


def _trained_state(model, variant, steps=2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisherW(model, lr=1e-2, variant=variant)
    x = torch.randn(6, 4, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return opt


@pytest.mark.parametrize("variant", ["paper", "eigen"])
def test_loading_the_state_of_a_different_model_names_the_parameter_and_both_shapes(variant):
    """The model changed between save and resume (a wider hidden layer): refused at
    ``load_state_dict``, instead of loading silently and failing at the next step."""
    torch.manual_seed(0)
    old = nn.Sequential(nn.Linear(4, 24), nn.Tanh(), nn.Linear(24, 2)).double()
    new = nn.Sequential(nn.Linear(4, 40), nn.Tanh(), nn.Linear(40, 2)).double()
    saved = _trained_state(old, variant).state_dict()
    opt = _trained_state(new, variant, steps=0)
    key, shape, want = ("exp_avg", (24, 4), (40, 4)) if variant == "paper" else ("eigen_exp_avg", (24, 5), (40, 5))
    message = (
        f"for parameter 0.weight (param group 0, index 0) the saved {key} has shape {shape}, "
        f"this model needs {want}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        opt.load_state_dict(saved)


def test_loading_another_optimizers_state_says_so_and_lists_the_missing_keys():
    lin = nn.Linear(3, 2)
    adam = torch.optim.Adam(lin.parameters())
    lin(torch.randn(4, 3)).sum().backward()
    adam.step()
    opt = AdaFisher(lin, variant="paper")
    message = (
        "Cannot load this state into AdaFisher: it comes from another optimizer (its param "
        "groups lack beta, damping, gamma, update_interval, variant)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        opt.load_state_dict(adam.state_dict())


def test_a_checkpoint_from_before_the_later_hyperparameters_still_loads_and_continues():
    """Older AdaFisher checkpoints lack the hyperparameters added since: they load with the
    defaults those had, and training continues exactly as from the full checkpoint."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    full = _trained_state(model, "paper").state_dict()
    old = copy.deepcopy(full)
    for group in old["param_groups"]:
        for key in ("beta2", "eps", "eigen_interval", "max_factor_size", "gradient_factors", "foreach", "fused"):
            del group[key]
    results = []
    for saved in (full, old):
        net = copy.deepcopy(model)
        opt = _trained_state(net, "paper", steps=0)
        opt.load_state_dict(copy.deepcopy(saved))
        _trained_state_step(net, opt)
        results.append([p.detach().clone() for p in net.parameters()])
    for p, q in zip(*results):
        assert torch.equal(p, q)


def _trained_state_step(model, opt):
    opt.zero_grad()
    model(torch.ones(6, 4, dtype=torch.float64)).square().mean().backward()
    opt.step()


_SCHEDULERS = {
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=8),
    "CyclicLR": lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=3),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5),
    "SequentialLR": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
         torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)],
        milestones=[3],
    ),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5),
    "SWALR": lambda opt: torch.optim.swa_utils.SWALR(opt, swa_lr=0.02, anneal_epochs=3),
}


@pytest.mark.parametrize("name", sorted(_SCHEDULERS))
@pytest.mark.parametrize("variant", ["paper", "eigen"])
def test_torch_schedulers_drive_lr_and_beta_as_on_adamw(name, variant):
    """Every scheduler works out of the box, ``cycle_momentum=True`` included (``betas[0]``
    is AdaFisher's ``beta``): the lr and the first-moment coefficient of each step follow the
    same schedule as on ``torch.optim.AdamW``, and the first moment is AdamW's to 1e-15
    (same gradients, same β per step: the β really used)."""
    p_adamw = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    p_ours = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    adamw = torch.optim.AdamW([p_adamw], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no hooks: identity / gradient factors
        ours = AdaFisherW([p_ours], lr=0.1, beta=0.9, beta2=0.95, variant=variant)
    schedulers = [_SCHEDULERS[name](adamw), _SCHEDULERS[name](ours)]
    g = torch.Generator().manual_seed(0)
    seen = []
    for t in range(8):
        grad = torch.randn(4, 3, generator=g, dtype=torch.float64)
        for opt, p in ((adamw, p_adamw), (ours, p_ours)):
            p.grad = grad.clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
        group_a, group_o = adamw.param_groups[0], ours.param_groups[0]
        assert group_o["lr"] == group_a["lr"]
        assert (group_o["beta"], group_o["beta2"]) == group_a["betas"] == tuple(group_o["betas"])
        seen.append((group_a["lr"], group_a["betas"][0]))
        if variant == "paper":  # the first moment of the parameter itself
            torch.testing.assert_close(ours.state[p_ours]["exp_avg"], adamw.state[p_adamw]["exp_avg"], rtol=0, atol=1e-15)
        for scheduler in schedulers:
            if name == "ReduceLROnPlateau":
                scheduler.step(1.0)
            else:
                scheduler.step()
    lrs, betas = zip(*seen)
    assert len(set(lrs)) > 1  # the schedule did move the lr
    if name in ("OneCycleLR", "CyclicLR"):
        assert len(set(betas)) > 1  # and the first-moment coefficient


def test_beta_written_directly_still_wins_over_a_stale_betas():
    lin = nn.Linear(3, 2)
    opt = AdaFisher(lin, lr=0.1, variant="paper")
    opt.param_groups[0]["beta"] = 0.5
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    group = opt.param_groups[0]
    assert group["betas"] == (0.5, 0.95) and group["beta"] == 0.5
    saved = opt.state_dict()["param_groups"][0]
    assert (saved["beta"], saved["betas"]) == (0.5, (0.5, 0.95))


@pytest.mark.parametrize("variant", ["paper", "reference", "eigen"])
@pytest.mark.parametrize("opt_cls", [AdaFisher, AdaFisherW])
def test_maximize_on_a_loss_equals_minimize_on_its_negative(variant, opt_cls):
    """``maximize=True`` negates the gradient in the update; the statistics see ``G`` of the
    loss, whose sign their squares (and outer products) do not see."""

    def train(maximize):
        model = make_mixed()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = opt_cls(model, lr=1e-2, weight_decay=0.05, variant=variant, maximize=maximize)
        for batch in _batches(3):
            opt.zero_grad()
            loss = _loss(model, batch)
            (loss if maximize else -loss).backward()
            opt.step()
        return model

    maximised, minimised = train(True), train(False)
    for (name, p), q in zip(maximised.named_parameters(), minimised.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(maximised.head.weight, make_mixed().head.weight)


def _step_all(model, opt, batches, nan_at=None):
    messages = []
    for k, batch in enumerate(batches):
        opt.zero_grad()
        loss = _loss(model, batch)
        (loss * float("nan") if k == nan_at else loss).backward()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.step()
        messages += [str(x.message) for x in w if "AdaFisher" in str(x.message)]
    return messages


def _fresh(skip, variant):
    model = make_mixed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisherW(model, lr=1e-2, weight_decay=0.05, variant=variant, skip_nonfinite_steps=skip)
    return model, opt


@pytest.mark.parametrize("variant", ["paper", "eigen"])
def test_skip_nonfinite_steps_skips_the_whole_step_like_gradscaler(variant):
    """A loss that is NaN for one step: with ``skip_nonfinite_steps=True`` that step leaves
    parameters, moments, factors and the step count untouched, so the run equals the one that
    never saw the batch, bit for bit; it is counted and named in a warning."""
    batches = _batches(4)
    model, opt = _fresh(True, variant)
    messages = _step_all(model, opt, batches, nan_at=1)
    clean_model, clean_opt = _fresh(True, variant)
    _step_all(clean_model, clean_opt, [b for k, b in enumerate(batches) if k != 1])
    for (name, p), q in zip(model.named_parameters(), clean_model.parameters()):
        assert torch.equal(p, q), name
    glob = opt.state["adafisher"]
    assert glob["steps"] == 3 and glob["skipped_steps"] == 1 and glob["skipped_statistics"] == {}
    [message] = messages
    assert message.startswith(
        "AdaFisher: step skipped (skip_nonfinite_steps=True): non-finite gradients in scale, conv.weight, "
        "conv.bias, bn.weight"
    )
    assert "parameters, moments and factors are unchanged" in message


def test_without_the_flag_a_nonfinite_step_is_applied_and_the_warning_says_so():
    model, opt = _fresh(False, "paper")
    messages = _step_all(model, opt, _batches(2), nan_at=1)
    assert all(torch.isnan(p).all() for p in model.parameters() if p.grad is not None)
    assert torch.isnan(opt.state[model.head.weight]["exp_avg"]).all()
    [message] = messages
    assert "were not folded into the factors of" in message
    assert "The parameter update of that step WAS applied: non-finite gradients, if any, went into the parameters and exp_avg" in message


def test_skip_nonfinite_steps_must_be_a_bool_and_the_same_in_every_group():
    with pytest.raises(ValueError, match="Invalid skip_nonfinite_steps: 'yes' \\(expected True or False\\)"):
        AdaFisher(nn.Linear(2, 2).parameters(), skip_nonfinite_steps="yes")
    with pytest.raises(ValueError, match="Invalid maximize: 1 \\(expected True or False\\)"):
        AdaFisher(nn.Linear(2, 2).parameters(), maximize=1)
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Invalid skip_nonfinite_steps: True differs between param groups"):
        AdaFisher([{"params": a.parameters()}, {"params": b.parameters(), "skip_nonfinite_steps": True}])


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0]).mean(1)


def test_multihead_attention_out_proj_keeps_the_identity_and_the_warning_says_why():
    """MultiheadAttention never calls ``out_proj.forward``: it is not bound as a Linear layer
    (it would never get statistics); it keeps the identity, named with the reason."""
    torch.manual_seed(0)
    model = _Attention().double()
    with pytest.warns(UserWarning) as record:
        opt = AdaFisher(model, lr=0.1, variant="paper")
    [message] = [str(w.message) for w in record if "identity" in str(w.message)]
    assert message == (
        "AdaFisher: 4 parameter(s) have no supported layer and use the identity preconditioner: "
        "attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias; "
        "attn.out_proj.weight, attn.out_proj.bias: nn.MultiheadAttention never calls its "
        "out_proj's forward (it uses F.multi_head_attention_forward), so no statistics can be "
        "taken there"
    )
    assert [layer.name for layer in opt.collector.layers] == ["head"]
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    before = model.attn.out_proj.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "received no statistics" warning either
        model(x).square().sum().backward()
        opt.step()
    # identity (paper), t = 1: p ← p − lr · g / (1 + λ)
    g = model.attn.out_proj.weight.grad
    torch.testing.assert_close(model.attn.out_proj.weight, before - 0.1 * g / 1.001, rtol=0, atol=1e-15)


def test_multihead_attention_out_proj_gets_gradient_factors_in_the_eigen_variant():
    model = _Attention().double()
    with pytest.warns(UserWarning) as record:
        opt = AdaFisher(model, lr=0.1, variant="eigen")
    assert [str(w.message) for w in record] == [
        "AdaFisher: attn.out_proj.weight, attn.out_proj.bias: nn.MultiheadAttention never calls "
        "its out_proj's forward (it uses F.multi_head_attention_forward), so no statistics can be "
        "taken there; the weight gets factors from its own gradient, the bias is trained by Adam"
    ]
    assert [layer.name for layer in opt.collector.layers] == ["head"]
    factored = {unit.name for unit in opt._gradient_factored_params()}
    assert {"attn.out_proj.weight", "attn.in_proj_weight"} <= factored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 5, 4, dtype=torch.float64)).square().sum().backward()
        opt.step()
    assert opt.state[model.attn.out_proj.weight]["factor_updates"] == 1


def test_skip_nonfinite_steps_costs_one_host_read_per_step_and_none_when_off():
    """The documented cost: the opt-in check reads one flag per device per step; off, the step
    reads nothing (the CUDA path never waits for the device)."""
    for skip, expected in ((False, 0), (True, 1)):
        model, opt = _fresh(skip, "paper")
        opt.defer_skip_check = True
        for x, y in _batches(2):
            opt.zero_grad()
            _loss(model, (x, y)).backward()
            with _HostReads(shapes_from_data=False) as reads:
                opt.step()
        assert reads.count == expected, (skip, reads.ops)
