"""variant="eigen": statistics, rotation, moment re-expression and the update against a float64
reference; degenerate settings that are AdamW; resume; accumulation; eigh fallbacks; errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_adafisher import AdaFisher, AdaFisherW
from lightning_adafisher import eigen as eg
from lightning_adafisher import functional as fn
from lightning_adafisher.bench.ops import OpCounter
from lightning_adafisher.layers import layer_helper_for
from tests.conftest import make_mixed
from tests.reference_eigen import ReferenceEigen, covariance, input_rows, output_rows

HP = dict(lr=1e-2, beta=0.9, beta2=0.95, eps=1e-6, gamma=0.8)
"""eps 1e-6: directions the factors null out (LayerNorm projects G onto a hyperplane) carry
round-off only, which Adam divides by about eps; 1e-8 would amplify it past 1e-10."""


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _batches(n, seed=1, size=4):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (size,), generator=g))
        for _ in range(n)
    ]


def _make(opt_cls, model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return opt_cls(model, variant="eigen", **kw)


def _train(opt, model, batches):
    for batch in batches:
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    return opt


# --- statistics ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", dilation=2, groups=2, bias=False),
        dict(in_channels=2, out_channels=3, kernel_size=(2, 3), padding=(1, 2), padding_mode="reflect"),
        dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="circular", stride=(1, 2)),
        dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="replicate"),
    ],
)
def test_conv_input_factor_is_the_im2col_second_moment(conv):
    torch.manual_seed(0)
    module = nn.Conv2d(**conv).double()
    x = torch.randn(3, module.in_channels, 7, 6, dtype=torch.float64)
    helper_total, count = layer_helper_for(module).input_cov(module, x)
    rows = input_rows(module, x)
    assert count == rows.shape[0]
    n = rows.shape[1]
    torch.testing.assert_close(helper_total.view(n, n) / count, covariance(rows), rtol=0, atol=1e-12)


def test_linear_and_conv_output_factors_and_linear_input_factor():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4).double()
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    g = torch.randn(2, 7, 4, dtype=torch.float64)
    total, count = eg.linear_input_cov(x, bias=True)
    torch.testing.assert_close(total.view(6, 6) / count, covariance(input_rows(lin, x)), rtol=0, atol=1e-13)
    total, count = eg.linear_output_cov(g)
    torch.testing.assert_close(total.view(4, 4) / count, covariance(output_rows(lin, g)), rtol=0, atol=1e-13)
    conv = nn.Conv2d(2, 3, 3).double()
    gc = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    total, count = eg.conv2d_output_cov(gc)
    torch.testing.assert_close(total.view(3, 3) / count, covariance(output_rows(conv, gc)), rtol=0, atol=1e-13)


# --- the whole step against the reference --------------------------------------------------


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("interval,eigen_interval", [(1, 1), (1, 3), (2, 3), (3, 2)])
def test_matches_float64_reference(decoupled, interval, eigen_interval):
    batches = _batches(7, size=6)
    model = make_mixed()
    reference_model = copy.deepcopy(model)
    wd = 0.05
    opt = _make(AdaFisherW if decoupled else AdaFisher, model, weight_decay=wd,
                update_interval=interval, eigen_interval=eigen_interval, **HP)
    _train(opt, model, batches)
    reference = ReferenceEigen(
        reference_model, weight_decay=wd, update_interval=interval, eigen_interval=eigen_interval,
        decoupled=decoupled, **HP,
    )
    for batch in batches:
        reference.step(lambda m: _loss(m, batch))
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10, msg=lambda m: f"{name}: {m}")
    fresh = make_mixed()
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert not torch.equal(p, q)
    # the layers really ran in a non-trivial eigenbasis
    q = opt.state[model.proj.weight]["eigenbasis_h"]
    assert (q - torch.eye(q.shape[0], dtype=q.dtype)).abs().max() > 0.1


def test_size_limit_keeps_the_identity_on_large_sides_and_matches_the_reference():
    # limit 8: conv (28 | 4) one-sided, conv2 (18 | 6) one-sided, proj (7 | 8) both, head (8 | 5) both
    batches = _batches(5, size=6)
    model = make_mixed()
    reference_model = copy.deepcopy(model)
    opt = _make(AdaFisherW, model, weight_decay=0.01, max_factor_size=8, eigen_interval=2, **HP)
    _train(opt, model, batches)
    reference = ReferenceEigen(reference_model, weight_decay=0.01, update_interval=1, eigen_interval=2,
                               decoupled=True, max_factor_size=8, **HP)
    for batch in batches:
        reference.step(lambda m: _loss(m, batch))
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
    assert "eigenbasis_h" not in opt.state[model.conv.weight]
    assert opt.state[model.conv.weight]["eigenbasis_s"].shape == (4, 4)
    assert opt.collector.layers[0].sizes == (0, 16)


@pytest.mark.parametrize("decoupled", [False, True])
def test_no_factor_within_the_size_limit_is_exactly_torch_adam(decoupled):
    batches = _batches(6)
    a, b = make_mixed(), make_mixed()
    opt = _make(AdaFisherW if decoupled else AdaFisher, a, weight_decay=0.03, max_factor_size=0, **HP)
    _train(opt, a, batches)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref = cls(b.parameters(), lr=HP["lr"], betas=(HP["beta"], HP["beta2"]), eps=HP["eps"],
              weight_decay=0.03, foreach=False)
    _train(ref, b, batches)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    assert opt.collector.layers == []


# --- resume, accumulation, eigh fallback ---------------------------------------------------


@pytest.mark.parametrize("interval,eigen_interval", [(1, 3), (2, 2)])
def test_state_dict_round_trip_continues_identically(interval, eigen_interval):
    batches = _batches(8)
    kw = dict(weight_decay=0.01, update_interval=interval, eigen_interval=eigen_interval, **HP)
    model = make_mixed()
    opt = _train(_make(AdaFisherW, model, **kw), model, batches[:4])
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(opt, model, batches[4:])
    resumed = make_mixed(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = _make(AdaFisherW, resumed, **kw)
    opt2.load_state_dict(saved)
    _train(opt2, resumed, batches[4:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_accumulation_is_exact_on_a_batch_independent_model():
    torch.manual_seed(0)
    # Every factor has full rank from the first step (more rows than entries): where a factor
    # is rank-deficient its eigenbasis is arbitrary inside the null space, so round-off alone
    # (the order of the micro-batch sums) would choose it differently in the two runs.
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 5),
    ).double()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    opt_a = _make(AdaFisherW, a, weight_decay=0.01, eigen_interval=2, **HP)
    opt_b = _make(AdaFisherW, b, weight_decay=0.01, eigen_interval=2, **HP)
    for x, y in _batches(5, size=8):
        opt_a.zero_grad()
        _loss(a, (x, y)).backward()
        opt_a.step()
        opt_b.zero_grad()
        for half in (slice(0, 4), slice(4, 8)):
            (_loss(b, (x[half], y[half])) / 2).backward()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


def test_eigh_failure_retries_in_float64_then_keeps_the_previous_basis(monkeypatch):
    factor = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    expected = torch.linalg.eigh(factor.double())[1].float()
    real_eigh = torch.linalg.eigh

    def float32_fails(a, *args, **kw):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real_eigh(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", float32_fails)
    q, ok = eg.eigenbasis(factor)
    assert ok
    torch.testing.assert_close(q.abs(), expected.abs(), rtol=0, atol=1e-6)

    def always_fails(a, *args, **kw):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    previous = torch.eye(2)[[1, 0]]
    q, ok = eg.eigenbasis(factor, previous)
    assert not ok and q is previous
    q, ok = eg.eigenbasis(factor)
    assert not ok and torch.equal(q, torch.eye(2))


def test_failed_eigh_in_a_step_warns_naming_the_layer_and_training_goes_on(monkeypatch):
    model = make_mixed()
    opt = _make(AdaFisherW, model, eigen_interval=1, **HP)
    batches = _batches(3)
    _train(opt, model, batches[:1])
    before = opt.state[model.proj.weight]["eigenbasis_h"].clone()

    def always_fails(a, *args, **kw):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    with pytest.warns(UserWarning, match=r"eigendecomposition of the factors of conv\.factor_h.*previous"):
        _train(opt, model, batches[1:2])
    assert torch.equal(opt.state[model.proj.weight]["eigenbasis_h"], before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_moment_is_re_expressed_when_the_basis_changes():
    m = torch.randn(3, 4, dtype=torch.float64)
    qs_old, qs_new = (torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0] for _ in range(2))
    qh_old, qh_new = (torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0] for _ in range(2))
    moved = eg.change_basis(m, qs_old, qs_new, qh_old, qh_new)
    # the same matrix in the original coordinates
    torch.testing.assert_close(qs_new @ moved @ qh_new.T, qs_old @ m @ qh_old.T, rtol=0, atol=1e-13)
    # from the identity (a layer's first basis)
    torch.testing.assert_close(qs_new @ eg.change_basis(m, None, qs_new, None, qh_new) @ qh_new.T, m,
                               rtol=0, atol=1e-13)


@pytest.mark.parametrize("side,poison", [("h_total", float("nan")), ("s_total", float("inf"))])
def test_non_finite_statistics_leave_factors_unchanged_and_warn(side, poison):
    model = make_mixed()
    opt = _make(AdaFisherW, model, **HP)
    batches = _batches(2)
    _train(opt, model, batches[:1])
    before = {
        name: {key: opt.state[p][key].clone() for key in ("factor_h", "factor_s") if key in opt.state[p]}
        for name, p in (("proj", model.proj.weight), ("conv", model.conv.weight))
    }
    x, y = batches[1]
    opt.zero_grad()
    out = model(x)
    _loss(model, (x, y)).backward()
    # poison one side of this step's pending statistics of proj: both its factors stay
    opt.statistics_reducer = lambda layers, pending: {
        name: stats._replace(**{side: getattr(stats, side) * poison}) if name == "proj" else stats
        for name, stats in pending.items()
    }
    with pytest.warns(UserWarning, match="not folded into the factors of proj"):
        opt.step()
    for key, value in before["proj"].items():
        assert torch.equal(opt.state[model.proj.weight][key], value), key
    for key, value in before["conv"].items():  # the other layers fold as usual
        assert not torch.equal(opt.state[model.conv.weight][key], value), key
    assert opt.state["adafisher"]["skipped_statistics"] == {"proj": 1}
    del out


def test_frozen_bias_drops_its_factor_entry():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    net[0].bias.requires_grad_(False)
    opt = _make(AdaFisherW, net, lr=1e-2)
    x = torch.randn(8, 4, dtype=torch.float64)
    bias = net[0].bias.clone()
    for _ in range(2):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    assert opt.state[net[0].weight]["factor_h"].shape == (4, 4)
    assert opt.state[net[0].weight]["eigen_exp_avg"].shape == (3, 4)
    assert torch.equal(net[0].bias, bias)


def test_transformers_conv1d_layout_matches_linear():
    transformers = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    conv1d = transformers.Conv1D(3, 5).double()
    with torch.no_grad():
        conv1d.weight.copy_(lin.weight.T)
        conv1d.bias.copy_(lin.bias)
    a, b = nn.Sequential(lin, nn.Tanh()), nn.Sequential(conv1d, nn.Tanh())
    opt_a, opt_b = _make(AdaFisherW, a, lr=1e-2), _make(AdaFisherW, b, lr=1e-2)
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).pow(3).mean().backward()
            opt.step()
    torch.testing.assert_close(conv1d.weight, lin.weight.T, rtol=0, atol=1e-13)
    torch.testing.assert_close(conv1d.bias, lin.bias, rtol=0, atol=1e-13)


def test_old_checkpoints_without_the_new_hyperparameters_load():
    model = make_mixed()
    opt = _make(AdaFisherW, model, **HP)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        for key in ("beta2", "eps", "eigen_interval", "max_factor_size"):
            del group[key]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["eigen_interval"] == 10 and opt.param_groups[0]["beta2"] == 0.95


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(beta2=1.0), "Invalid beta2: 1.0"),
        (dict(eps=0.0), "Invalid eps: 0.0"),
        (dict(eigen_interval=0), "Invalid eigen_interval: 0"),
        (dict(max_factor_size=-1), "Invalid max_factor_size: -1"),
        (dict(fused=True), "Invalid fused: True is not supported with variant='eigen'"),
    ],
)
def test_bad_hyperparameters_raise_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AdaFisherW(nn.Linear(2, 2).parameters(), variant="eigen", **kwargs)


def test_eigen_interval_must_be_the_same_in_every_group():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Invalid eigen_interval: 5 differs between param groups"):
        AdaFisherW([{"params": net[0].parameters()}, {"params": net[1].parameters(), "eigen_interval": 5}],
                   variant="eigen")


def test_stats_dtype_of_bfloat16_layers_is_float32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(torch.bfloat16)
    opt = _make(AdaFisherW, net, lr=1e-2)
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    opt.zero_grad()
    net(x).float().square().mean().backward()
    opt.step()
    state = opt.state[net[0].weight]
    assert state["factor_h"].dtype == state["eigenbasis_h"].dtype == state["eigen_exp_avg"].dtype == torch.float32
    assert net[0].weight.dtype == torch.bfloat16
    assert fn.stats_dtype(torch.bfloat16) == torch.float32


def test_large_conv_maps_use_an_evenly_strided_grid_of_positions():
    torch.manual_seed(0)
    module = nn.Conv2d(2, 3, 3, stride=1, padding=1).double()
    x = torch.randn(2, 2, 20, 17, dtype=torch.float64)  # 20×17 = 340 output positions
    assert eg.conv2d_position_strides(20, 17) == (3, 3)
    assert eg.conv2d_position_strides(8, 8) == (1, 1)
    total, count = layer_helper_for(module).input_cov(module, x)
    rows = input_rows(module, x).view(2, 20, 17, -1)[:, ::3, ::3].reshape(-1, 19)  # 7×6 grid
    assert count == rows.shape[0] == 2 * 7 * 6
    torch.testing.assert_close(total.view(19, 19) / count, covariance(rows), rtol=0, atol=1e-12)


def test_bfloat16_model_keeps_float32_eigen_state_across_load_state_dict():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(torch.bfloat16)
    opt = _make(AdaFisherW, net, lr=1e-2)
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    for _ in range(2):
        opt.zero_grad()
        net(x).float().square().mean().backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt2 = _make(AdaFisherW, net, lr=1e-2)
    opt2.load_state_dict(saved)
    for key in ("factor_h", "factor_s", "eigenbasis_h", "eigenbasis_s", "eigen_exp_avg", "eigen_exp_avg_sq"):
        before, after = opt.state[net[0].weight][key], opt2.state[net[0].weight][key]
        assert after.dtype == torch.float32 and torch.equal(before, after), key


class EmbedNet(nn.Module):
    """An Embedding whose weight is also the output head (tied), a raw [1, 6, 6] matrix, a
    LayerNorm and a Linear: the gradient-factored cases and the Adam ones."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(11, 6)
        self.mix = nn.Parameter(torch.randn(1, 6, 6) / 3)
        self.norm = nn.LayerNorm(6)
        self.proj = nn.Linear(6, 6)

    def forward(self, ids):
        h = torch.tanh(self.proj(self.norm(self.tokens(ids) @ self.mix[0])))
        return h @ self.tokens.weight.T


@pytest.mark.parametrize("decoupled,gradient_factors", [(True, True), (True, False), (False, False)])
def test_gradient_factored_parameters_match_the_reference(decoupled, gradient_factors):
    # Not coupled decay with gradient factors: the embedding's 11×11 factor has a 5-dim null
    # space whose eigenvectors round-off picks, and L2 decay (unlike the gradient) reaches it,
    # so two correct implementations differ there by ~1e-2 (docs/numerics.md).
    torch.manual_seed(0)
    model = EmbedNet().double()
    reference_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 11, (4, 9), generator=g) for _ in range(6)]

    def loss(m, ids):
        return F.cross_entropy(m(ids[:, :-1]).reshape(-1, 11), ids[:, 1:].reshape(-1))

    # eigen_interval=1: the embedding's 11×11 factor has rank ≤ 6, and a basis refreshed every
    # step keeps each gradient inside the factor's range (see the accumulation test)
    kw = dict(weight_decay=0.05, eigen_interval=1, **HP)
    opt = _make(AdaFisherW if decoupled else AdaFisher, model, gradient_factors=gradient_factors, **kw)
    for ids in batches:
        opt.zero_grad()
        loss(model, ids).backward()
        opt.step()
    reference = ReferenceEigen(reference_model, update_interval=1, decoupled=decoupled,
                               gradient_factors=gradient_factors, **kw)
    for ids in batches:
        reference.step(lambda m: loss(m, ids))
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        # 1e-9: `mix` feeds a LayerNorm, whose gradients null the all-ones direction
        torch.testing.assert_close(p, q, rtol=0, atol=1e-9, msg=lambda m: f"{name}: {m}")
    state = opt.state[model.tokens.weight]
    if gradient_factors:
        assert state["eigenbasis_h"].shape == (6, 6) and state["eigenbasis_s"].shape == (11, 11)
        assert opt.state[model.mix]["eigen_exp_avg"].shape == (6, 6)
    else:
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[model.norm.weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_unattached_eigen_optimizer_warns_and_factors_matrices_from_their_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    opt = AdaFisherW(net.parameters(), variant="eigen", lr=1e-2)
    x = torch.randn(8, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"no statistics hooks, so no layer gets factors from its inputs"):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    assert opt.state[net[0].weight]["factor_h"].shape == (4, 4)  # ∇Wᵀ∇W
    assert set(opt.state[net[0].bias]) == {"step", "exp_avg", "exp_avg_sq"}


class ZooNet(nn.Module):
    """Layer types the eigen variant meets in users' models: a GRU and nn.MultiheadAttention
    (matrices it never sees through a Linear), Conv1d (3-D weight), Embedding, norms."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 20)

    def forward(self, ids):
        x = self.bn(self.conv(self.emb(ids).transpose(1, 2))).transpose(1, 2)
        x, _ = self.gru(torch.relu(x))
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head(self.norm(x + a))


def test_default_optimizer_fits_a_model_of_mixed_layer_types_and_moves_every_parameter():
    torch.manual_seed(0)
    model = ZooNet()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as at_attach:
        warnings.simplefilter("always")
        opt = AdaFisherW(model)  # every default: the eigen variant, lr 3e-3
    assert opt.variant == "eigen" and opt.param_groups[0]["lr"] == 3e-3
    ids = torch.randint(0, 20, (8, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(40):
            opt.zero_grad()
            loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 20), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            losses.append(loss.item())
    # MultiheadAttention computes out_proj inside F.multi_head_attention_forward: no statistics
    assert any("attn.out_proj" in str(w.message) and "trained by Adam" in str(w.message) for w in at_attach)
    assert losses[-1] < 0.5 * losses[0]  # memorises the fixed batch
    for name, p in model.named_parameters():
        assert not torch.equal(p, start[name]), name
    # matrices outside supported layers got factors of their own gradient
    for p in (model.gru.weight_ih_l0, model.attn.in_proj_weight, model.emb.weight):
        assert "eigenbasis_h" in opt.state[p] and "eigenbasis_s" in opt.state[p]
    assert set(opt.state[model.conv.weight]) == {"step", "exp_avg", "exp_avg_sq"}  # 3-D: Adam


@pytest.mark.parametrize("opt_cls,maximize", [(AdaFisherW, False), (AdaFisher, True)])
def test_multi_tensor_update_equals_the_per_unit_update_bit_for_bit(opt_cls, maximize):
    # foreach=True (the CUDA default) batches every unit's moments and every parameter's write
    # into multi-tensor ops; on the CPU those run the same element-wise kernels per tensor, so
    # the two paths agree exactly. Two param groups with their own hyper-parameters, gradient-
    # factored matrices, Adam parameters, and a layer left without gradient on some steps (its
    # step count falls behind: a batch of its own).
    torch.manual_seed(0)
    models = [ZooNet(), None]
    models[1] = copy.deepcopy(models[0])
    opts = []
    for model, foreach in zip(models, (False, True)):
        head = list(model.head.parameters())
        rest = [p for p in model.parameters() if all(p is not q for q in head)]
        groups = [dict(params=rest), dict(params=head, lr=2e-3, beta2=0.99, eps=1e-7)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = opt_cls(groups, lr=3e-3, weight_decay=0.05, foreach=foreach, maximize=maximize,
                          gradient_factors=True, eigen_interval=2)
            opt.attach(model)
        opts.append(opt)
    ids = torch.randint(0, 20, (8, 12), generator=torch.Generator().manual_seed(1))
    ops = {}
    for step in range(5):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            out = model(ids[:, :-1])
            loss = F.cross_entropy(out.reshape(-1, 20), ids[:, 1:].reshape(-1))
            if maximize:
                loss = -loss
            loss.backward()
            if step % 2:
                model.conv.weight.grad = model.conv.bias.grad = None  # conv idle on odd steps
            with OpCounter() as counter:
                opt.step()
            ops[opt.param_groups[0]["foreach"]] = counter.total
    assert ops[True] < ops[False] - 30  # the batched path ran: ~7 ops per unit fewer
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        for key, value in opts[0].state[p].items():
            other = opts[1].state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
