"""The all-reduce buffer: fixed layout, layers a rank did not use, world-size scaling."""

from __future__ import annotations

import threading
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


# --- the fold of pooled statistics: counts stay on the device ----------------------------------

class Both(nn.Module):
    """Two Linear branches; ``use`` says which run (a branch not run gets no statistics)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x, use=("a", "b")):
        return sum(getattr(self, name)(x) for name in use)


_VARIANT_HP = {
    "paper": dict(variant="paper", lr=1e-2, gamma=0.8),
    "reference": dict(variant="reference", lr=1e-2, gamma=0.8),
    "eigen": dict(variant="eigen", lr=1e-2, gamma=0.8, eps=1e-6, eigen_interval=1),
}


def _factors(opt, model):
    return {
        name: [opt.state[layer.weight][key].clone() for key in ("factor_h", "factor_s")]
        for name, layer in (("a", model.a), ("b", model.b)) if "factor_h" in opt.state[layer.weight]
    }


def _train_both(variant, reducer, uses, seed=0):
    torch.manual_seed(seed)
    model = Both().double()
    opt = AdaFisherW(model, **_VARIANT_HP[variant])
    opt.statistics_reducer = reducer
    g = torch.Generator().manual_seed(seed + 1)
    history = []
    for use in uses:
        x = torch.randn(6, 4, generator=g, dtype=torch.float64)
        opt.zero_grad()
        model(x, use).square().mean().backward()
        opt.step()
        updates = {n: opt.state[getattr(model, n).weight].get("factor_updates", 0) for n in ("a", "b")}
        history.append((_factors(opt, model), updates))
    return model, opt, history


@pytest.mark.parametrize("variant", ["paper", "reference", "eigen"])
def test_reducer_fold_equals_host_count_fold_bitwise_and_zero_count_layer_keeps_its_factors(variant):
    """Counts pooled on the device (a one-rank all-reduce) fold bitwise as the host's counts
    do; a layer with a zero count on every rank (``b`` in the third and fourth steps) keeps its
    factors bit for bit and its ``factor_updates``, while ``a`` folds."""
    uses = [("a", "b"), ("a", "b"), ("a",), ("a",), ("a", "b")]
    one_rank = make_reducer(lambda t: t, torch.device("cpu"), world_size=1)
    host_model, _, host = _train_both(variant, None, uses)
    model, _, pooled = _train_both(variant, one_rank, uses)
    for (f_host, n_host), (f_pooled, n_pooled) in zip(host, pooled):
        assert n_host == n_pooled
        assert f_host.keys() == f_pooled.keys() == {"a", "b"}
        for name in f_host:
            for x, y in zip(f_host[name], f_pooled[name]):
                assert torch.equal(x, y), name
    for p, q in zip(host_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    (after_1, n_1), (after_2, n_2), (after_3, n_3), (after_4, n_4), _ = pooled
    assert n_2 == {"a": 2, "b": 2} and n_3 == {"a": 3, "b": 2} and n_4 == {"a": 4, "b": 2}
    for k in range(2):
        assert torch.equal(after_3["b"][k], after_2["b"][k]) and torch.equal(after_4["b"][k], after_2["b"][k])
        assert not torch.equal(after_3["a"][k], after_2["a"][k])


def test_zero_count_on_every_rank_is_not_reported_as_skipped_and_first_warning_names_it():
    """A layer no rank used is neither folded nor counted as non-finite statistics; the
    first-statistics warning names it, as without a reducer."""
    torch.manual_seed(0)
    model = Both().double()
    opt = AdaFisherW(model, variant="paper")
    opt.statistics_reducer = make_reducer(lambda t: t + t, torch.device("cpu"), world_size=2)
    model(torch.randn(5, 4, dtype=torch.float64), ("a",)).square().sum().backward()
    with pytest.warns(UserWarning, match=r"no statistics on the first statistics step .*: b$"):
        opt.step()
    assert "factor_h" not in opt.state[model.b.weight] and "factor_updates" not in opt.state[model.b.weight]
    assert opt.state[model.a.weight]["factor_updates"] == 1
    assert opt.skipped_statistics() == {}


class _TwoThreadRanks:
    """Two fake data-parallel ranks in two threads of this process, summing their buffers."""

    def __init__(self):
        self.barrier = threading.Barrier(2, timeout=60)
        self.slots = [None, None]

    def reducer(self, rank):
        def all_reduce_sum(t):
            self.slots[rank] = t
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]  # same order on both ranks: bitwise equal
            self.barrier.wait()
            return total

        return make_reducer(all_reduce_sum, torch.device("cpu"), world_size=2)

    def run(self, variant, plans):
        """``plans[rank]``: the branches each step of that rank runs; every rank sees its own
        data. Returns each rank's ``(model, history)``."""
        out = [None, None]

        def rank_main(rank):
            torch.manual_seed(0)
            model = Both().double()
            opt = AdaFisherW(model, **_VARIANT_HP[variant])
            opt.statistics_reducer = self.reducer(rank)
            g = torch.Generator().manual_seed(10 + rank)
            history = []
            for use in plans[rank]:
                opt.zero_grad()
                model(torch.randn(6, 4, generator=g, dtype=torch.float64), use).square().mean().backward()
                for p in model.parameters():  # DDP's gradient average, over the same layout
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                opt.step()
                updates = {n: opt.state[getattr(model, n).weight].get("factor_updates", 0) for n in ("a", "b")}
                history.append((_factors(opt, model), updates))
            out[rank] = (model, history)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert out[0] is not None and out[1] is not None, "a fake rank failed"
        return out


@pytest.mark.parametrize("variant", ["paper", "eigen"])
def test_layer_used_on_some_ranks_only(variant):
    """The documented unusual case. A layer that already holds factors on every rank folds the
    pooled statistics on every rank (its factors stay equal across ranks), but only the ranks
    that used it count the fold in ``factor_updates``. A layer whose first statistics come
    from some ranks only gets factors on those ranks only."""
    ranks = _TwoThreadRanks()
    (_, h0), (_, h1) = ranks.run(variant, [[("a", "b"), ("a", "b")], [("a", "b"), ("a",)]])
    for (f0, n0), (f1, n1) in zip(h0, h1):
        for name in ("a", "b"):
            for x, y in zip(f0[name], f1[name]):
                assert torch.equal(x, y), name
    assert not torch.equal(h0[1][0]["b"][0], h0[0][0]["b"][0])  # b folded rank 0's statistics
    assert h0[1][1] == {"a": 2, "b": 2} and h1[1][1] == {"a": 2, "b": 1}

    ranks = _TwoThreadRanks()
    (_, h0), (_, h1) = ranks.run(variant, [[("a", "b")], [("a",)]])
    assert set(h0[0][0]) == {"a", "b"} and set(h1[0][0]) == {"a"}
    assert torch.equal(h0[0][0]["a"][0], h1[0][0]["a"][0])
