"""Raw statistics against brute-force float64 references; folding edge cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_adafisher import functional as fn
from lightning_adafisher.layers import layer_helper_for
from tests import reference as ref

DT = torch.float64


def _stats(module: nn.Module, x: torch.Tensor, g: torch.Tensor, variant: str = "paper"):
    helper = layer_helper_for(module)
    assert helper is not None
    h_total, h_count = helper.input_stats(module, x, variant)
    s_total, s_count = helper.output_stats(module, g, variant)
    return h_total / h_count, s_total / s_count


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=3, out_channels=5, kernel_size=3),
        dict(in_channels=3, out_channels=5, kernel_size=3, stride=2, padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
        dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, bias=False, padding="same", dilation=2),
        dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, stride=2),
        dict(in_channels=2, out_channels=3, kernel_size=3, padding="valid"),
        dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"),
        dict(in_channels=2, out_channels=3, kernel_size=3, padding=2, padding_mode="circular"),
        dict(in_channels=2, out_channels=3, kernel_size=2, padding="same", padding_mode="replicate"),
        dict(in_channels=2, out_channels=3, kernel_size=5, stride=3, padding=2),
    ],
)
@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("one_matmul", [True, False], ids=["kron-kernel", "two-selectors"])
@pytest.mark.parametrize("no_temporary", [False, True], ids=["square-sum", "no-temporary"])
def test_conv2d_statistics_match_explicit_im2col(kwargs, variant, one_matmul, no_temporary, monkeypatch):
    """Both window-sum forms (one matmul with the cached Kronecker kernel for small inputs, two
    thin matmuls beyond _WINDOW_KERNEL_MAX), and both ways of summing squares (one
    ``square().sum()``; per-sample ``addcmul_`` and batched dots, used from NO_TEMPORARY_MIN
    elements on), against unfold."""
    if not one_matmul:
        monkeypatch.setattr(fn, "_WINDOW_KERNEL_MAX", 0)
    if no_temporary:
        monkeypatch.setattr(fn, "NO_TEMPORARY_MIN", 1)
        monkeypatch.setattr(fn, "_DOT_MIN_SPATIAL", 1)
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs).to(DT)
    x = torch.randn(2, conv.in_channels, 7, 6, dtype=DT)
    out = conv(x)
    g = torch.randn_like(out)
    h, s = _stats(conv, x, g, variant)
    torch.testing.assert_close(h, ref.conv_h(conv, x, variant), rtol=1e-13, atol=0)
    torch.testing.assert_close(s, ref.conv_s(g), rtol=1e-13, atol=0)
    # layout: h covers the flattened weight columns (c, kh, kw) plus the bias entry
    assert h.numel() == conv.weight[0].numel() + (conv.bias is not None)


def test_large_conv_statistics_take_the_no_temporary_sums_with_the_same_numbers(monkeypatch):
    """At NO_TEMPORARY_MIN elements a conv's ``Σ_b x²`` and ``Σ G²`` are taken without an
    x-sized temporary; in float64 they equal ``square().sum()`` to 1e-13, and the
    ``square`` of the one-kernel form is not called."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 300, 300, dtype=DT)  # 1.08 M elements
    assert x.numel() >= fn.NO_TEMPORARY_MIN
    expected_xs, expected_s = x.square().sum(0), x.square().sum((0, 2, 3))
    squares = []
    real = torch.Tensor.square
    monkeypatch.setattr(torch.Tensor, "square", lambda t: squares.append(t.shape) or real(t))
    torch.testing.assert_close(fn._square_sum(x, rows=False, reuse=False), expected_xs, rtol=1e-13, atol=0)
    s, count = fn.conv2d_output_stats(x)
    torch.testing.assert_close(s, expected_s, rtol=1e-13, atol=0)
    assert count == 3 * 300 * 300 and squares == []


@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_statistics_stay_float32_inside_autocast(backward_in_autocast, monkeypatch):
    """A conv under CPU autocast (bf16) whose statistics take every matmul path — window sums in
    the forward hook (DEFER_MAX 0: an input too large to defer), batched dots for ``G``
    (NO_TEMPORARY_MIN 1) — and a ``backward()`` called inside the autocast region or outside:
    the totals are float32 and equal those of the same tensors outside autocast (autocast would
    cast the matmuls to bf16)."""
    from lightning_adafisher import AdaFisher

    monkeypatch.setattr(fn, "DEFER_MAX", 0)
    monkeypatch.setattr(fn, "NO_TEMPORARY_MIN", 1)
    monkeypatch.setattr(fn, "_DOT_MIN_SPATIAL", 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 0, 1, 1])
    opt = AdaFisher(model, variant="paper")
    seen = {}
    model[0].register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach()))
    model[0].register_forward_hook(lambda m, a, o: o.register_hook(lambda g: seen.update(g=g.detach())) and None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
        if backward_in_autocast:
            loss.backward()
    if not backward_in_autocast:
        loss.backward()
    pending = opt.collector.consume()["0"]
    helper = layer_helper_for(model[0])
    h, _ = helper.input_stats(model[0], seen["x"], "paper")
    s, _ = helper.output_stats(model[0], seen["g"], "paper")
    assert pending.h_total.dtype == pending.s_total.dtype == torch.float32
    torch.testing.assert_close(pending.h_total, h, rtol=1e-6, atol=0)
    torch.testing.assert_close(pending.s_total, s, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 7), (2, 3, 2, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_statistics_any_leading_dims(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(7, 4, bias=bias).to(DT)
    x = torch.randn(*shape, dtype=DT)
    g = torch.randn(*shape[:-1], 4, dtype=DT)
    h, s = _stats(lin, x, g)
    torch.testing.assert_close(h, ref.linear_h(x, bias), rtol=1e-13, atol=0)
    torch.testing.assert_close(s, ref.linear_s(g), rtol=1e-13, atol=0)


def test_linear_subclass_is_supported():
    mha = nn.MultiheadAttention(8, 2)
    assert type(mha.out_proj) is not nn.Linear
    assert layer_helper_for(mha.out_proj) is layer_helper_for(nn.Linear(2, 2))


def test_batchnorm_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5).to(DT)
    x = torch.randn(3, 5, 4, 6, dtype=DT) + 0.5
    g = torch.randn(3, 5, 4, 6, dtype=DT)
    h, s = _stats(bn, x, g)
    torch.testing.assert_close(h, ref.batchnorm_h(x), rtol=1e-13, atol=0)
    torch.testing.assert_close(s, ref.batchnorm_s(g), rtol=1e-13, atol=0)


@pytest.mark.parametrize("shape", [(4, 6), (3, 5, 6)])
def test_layernorm_statistics(shape):
    torch.manual_seed(0)
    ln = nn.LayerNorm(6).to(DT)
    x = torch.randn(*shape, dtype=DT) + 0.3
    g = torch.randn(*shape, dtype=DT)
    h, s = _stats(ln, x, g)
    torch.testing.assert_close(h, ref.layernorm_h(x), rtol=1e-13, atol=0)
    torch.testing.assert_close(s, ref.layernorm_s(g), rtol=1e-13, atol=0)


def test_norms_without_affine_or_bias_have_only_existing_parameters():
    assert layer_helper_for(nn.BatchNorm2d(3, affine=False)).parameters(nn.BatchNorm2d(3, affine=False)) == {}
    ln = nn.LayerNorm(4, bias=False)
    assert list(layer_helper_for(ln).parameters(ln)) == ["weight"]
    ln0 = nn.LayerNorm(4, elementwise_affine=False)
    assert layer_helper_for(ln0).parameters(ln0) == {}


def test_min_max_constant_vector_is_ones():
    torch.testing.assert_close(fn.min_max(torch.full((4,), 3.0)), torch.ones(4))
    torch.testing.assert_close(fn.min_max(torch.tensor([1.0, 3.0, 2.0])), torch.tensor([0.0, 1.0, 0.5]))


def test_fold_paper_skips_non_finite_statistics():
    H = torch.tensor([1.0, 2.0])
    bad = torch.tensor([float("nan"), 1.0])
    ok = fn.statistics_ok("paper", bad, torch.ones(2))
    assert not bool(ok)
    torch.testing.assert_close(fn.fold_paper(H.clone(), bad, 0.9, ok), H)
    inf = torch.tensor([float("inf"), 1.0])
    assert not bool(fn.statistics_ok("paper", torch.ones(2), inf))


def test_fold_reference_maps_inf_and_skips_nan():
    ok = fn.statistics_ok("reference", torch.tensor([float("inf"), 0.0, 0.5]))
    assert bool(ok)
    new = fn.fold_reference(None, torch.tensor([float("inf"), 0.0, 0.5]), 0.8, ok)
    expected = 0.08 * torch.ones(3) + 0.008 * torch.tensor([1.0, 0.0, 0.5]) / (1.0 + 1e-6)
    torch.testing.assert_close(new, expected)
    nan_ok = fn.statistics_ok("reference", torch.tensor([float("nan"), 0.0]))
    torch.testing.assert_close(fn.fold_reference(new[:2].clone(), torch.tensor([float("nan"), 0.0]), 0.8, nan_ok), new[:2])


def test_factors_never_hold_subnormal_floats():
    # An entry that never sees signal decays by 0.1γ per reference step; it must reach zero
    # rather than linger in the subnormal range (50× slower arithmetic on CPU, docs/numerics.md).
    H = None
    stat = torch.tensor([0.0, 1.0])
    ok = torch.tensor(True)
    for _ in range(60):
        H = fn.fold_reference(H, stat, 0.8, ok)
    tiny = torch.finfo(torch.float32).tiny
    assert H[0] == 0 or H[0] >= tiny
    S = torch.tensor([1e-30, 1.0])
    for _ in range(2000):
        S = fn.fold_paper(S, torch.tensor([0.0, 1.0]), 0.92, ok)
    assert S[0] == 0 or S[0] >= tiny


def test_conv2d_padding_same_matches_torch():
    # torch puts the odd pixel of 'same' padding on the right/bottom
    assert fn.conv2d_padding("same", (2, 4), (1, 1)) == (1, 2, 0, 1)
    assert fn.conv2d_padding((1, 2), (3, 3), (1, 1)) == (2, 2, 1, 1)


def test_flat_fold_equals_per_layer_fold_bitwise():
    """The optimizer folds every layer as one flat vector (fn.Segments): each piece must come
    out exactly as the per-layer functions give it — first folds, later folds, rejected
    statistics (inf/NaN), constant pieces (min-max span 0) and per-piece gammas included."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 1, 4, 6, 2]
    stats = [torch.rand(n, generator=g) * 10.0 ** k for k, n in enumerate(lengths)]
    stats[1] = torch.full((3,), 2.5)                       # constant piece
    stats[4][2] = float("inf")                             # rejected by the paper variant
    stats[5][0] = float("nan")                             # rejected by both
    factors = [None, torch.rand(3, generator=g), None, torch.rand(4, generator=g), torch.rand(6, generator=g), None]
    gammas = [0.92, 0.92, 0.8, 0.8, 0.5, 0.5]
    pieces = fn.Segments(lengths, torch.device("cpu"))
    stat = torch.cat(stats)
    old = torch.cat([f if f is not None else torch.ones(n) for f, n in zip(factors, lengths)])
    first = pieces.constants([f is None for f in factors], torch.bool)
    for variant in ("paper", "reference"):
        ok_piece = ~torch.stack([fn.unfoldable(variant, s).any() for s in stats])
        ok = pieces.spread(ok_piece)
        if variant == "paper":
            flat = fn.fold_paper(old, stat, gammas, ok, first=first, segments=pieces)
            each = [fn.fold_paper(f, s, gm, fn.statistics_ok(variant, s)) for f, s, gm in zip(factors, stats, gammas)]
        else:
            flat = fn.fold_reference(old, stat, gammas, ok, segments=pieces)
            each = [fn.fold_reference(f, s, gm, fn.statistics_ok(variant, s)) for f, s, gm in zip(factors, stats, gammas)]
        for k, (a, b) in enumerate(zip(pieces.split(flat), each)):
            assert torch.equal(a, b), (variant, k, a, b)
        for a, b in zip(pieces.split(fn.min_max(flat, pieces)), each):
            assert torch.equal(a, fn.min_max(b))
    assert pieces.any(torch.isnan(stat)).tolist() == [False, False, False, False, False, True]
