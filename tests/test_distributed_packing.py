"""The all-reduce buffer: fixed layout, layers a rank did not use, world-size scaling."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_adafisher import AdaFisherW
from lightning_adafisher.distributed import make_reducer, pack, unpack


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x, use_b: bool):
        return self.b(x) if use_b else self.a(x)


def _pending(model, opt, x, use_b):
    F.mse_loss(model(x, use_b), torch.zeros(len(x), 3, dtype=x.dtype)).backward()
    return opt.collector.consume()


def test_layer_unused_on_one_rank_pools_over_the_ranks_that_used_it():
    torch.manual_seed(0)
    model = TwoBranch().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisherW(model, variant="paper")
    layers = opt.collector.layers
    x0, x1 = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    rank0 = _pending(model, opt, x0, use_b=False)  # rank 0 uses only a
    rank1 = _pending(model, opt, x1, use_b=True)   # rank 1 uses only b
    b0, b1 = pack(layers, rank0, torch.device("cpu")), pack(layers, rank1, torch.device("cpu"))
    assert b0.shape == b1.shape  # same layout on every rank: no rank waits on a missing entry
    pooled = unpack(layers, b0 + b1)
    # each layer's statistics are exactly those of the one rank that used it (no dilution)
    for name, stats in (("a", rank0["a"]), ("b", rank1["b"])):
        torch.testing.assert_close(pooled[name].h_total / pooled[name].h_count, stats.h_total / stats.h_count)
        torch.testing.assert_close(pooled[name].s_total / pooled[name].s_count, stats.s_total / stats.s_count)


def test_reducer_divides_s_by_world_size_squared():
    torch.manual_seed(0)
    model = TwoBranch().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisherW(model, variant="paper")
    pending = _pending(model, opt, torch.randn(6, 4, dtype=torch.float64), use_b=False)
    fake_two_ranks = make_reducer(lambda t: t * 2, torch.device("cpu"), world_size=2)
    reduced = fake_two_ranks(opt.collector.layers, pending)["a"]
    torch.testing.assert_close(reduced.h_total / reduced.h_count, pending["a"].h_total / pending["a"].h_count)
    torch.testing.assert_close(reduced.s_total / reduced.s_count, pending["a"].s_total / pending["a"].s_count / 4)


def test_pack_then_unpack_returns_every_total_and_count_exactly():
    """One flat buffer (totals, then all counts) round-trips each layer's statistics bitwise,
    norm layers' included; a buffer laid out for another model is refused with the reason."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisherW(model, variant="paper")
    F.cross_entropy(model(torch.randn(5, 3, 8, 8, dtype=torch.float64)), torch.tensor([0, 1, 2, 0, 1])).backward()
    pending = opt.collector.consume()
    layers = opt.collector.layers
    buffer = pack(layers, pending, torch.device("cpu"))
    back = unpack(layers, buffer)
    assert set(back) == set(pending) == {layer.name for layer in layers}
    for name, stats in pending.items():
        assert (back[name].h_count, back[name].s_count) == (stats.h_count, stats.s_count)
        assert torch.equal(back[name].h_total, stats.h_total)
        assert torch.equal(back[name].s_total, stats.s_total)
    expected = sum(n for layer in layers for n in layer.sizes) + 2 * len(layers)
    assert buffer.numel() == expected
    with pytest.raises(RuntimeError, match=rf"statistics buffer has {expected - 1} entries, the layout "
                       rf"expects {expected}: the ranks do not hold the same model"):
        unpack(layers, buffer[1:])
