"""Embedding and transformers' Conv1D helpers: equal to the Linear layer they are in disguise."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_adafisher import AdaFisherW

DT = torch.float64


class EmbedNet(nn.Module):
    def __init__(self, emb: nn.Module, one_hot: bool) -> None:
        super().__init__()
        self.emb, self.one_hot = emb, one_hot
        self.out = nn.Linear(4, 3)

    def forward(self, ids):
        x = F.one_hot(ids, 7).to(DT) if self.one_hot else ids
        return self.out(torch.tanh(self.emb(x))).mean(1)


def _train(model, batches, **kw):
    kw.setdefault("variant", "paper")  # this module tests the diagonal variants' helpers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisherW(model, lr=0.02, weight_decay=0.01, **kw)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_embedding_equals_linear_on_one_hot_rows(variant):
    torch.manual_seed(0)
    emb = nn.Embedding(7, 4).to(DT)
    lin = nn.Linear(7, 4, bias=False).to(DT)
    with torch.no_grad():
        lin.weight.copy_(emb.weight.T)
    a, b = EmbedNet(emb, one_hot=False).to(DT), EmbedNet(lin, one_hot=True).to(DT)
    b.out.load_state_dict(a.out.state_dict())
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 7, (5, 6), generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(4)]
    opt = _train(a, batches, variant=variant)
    _train(b, batches, variant=variant)
    torch.testing.assert_close(a.emb.weight, b.emb.weight.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.out.weight, b.out.weight, rtol=0, atol=1e-12)
    assert opt.state[a.emb.weight]["factor_updates"] == 4  # not on the identity


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_transformers_conv1d_equals_linear(variant):
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv1d = Conv1D(5, 6).to(DT)  # nf=5 outputs, nx=6 inputs: weight [6, 5]
    lin = nn.Linear(6, 5).to(DT)
    with torch.no_grad():
        lin.weight.copy_(conv1d.weight.T)
        lin.bias.copy_(conv1d.bias)
    a, b = nn.Sequential(conv1d, nn.Tanh(), nn.Linear(5, 3)).to(DT), nn.Sequential(lin, nn.Tanh(), nn.Linear(5, 3)).to(DT)
    b[2].load_state_dict(a[2].state_dict())
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 2, 6, generator=g, dtype=DT).mean(1), torch.randint(0, 3, (4,), generator=g)) for _ in range(4)]
    opt = _train(a, batches, variant=variant)
    _train(b, batches, variant=variant)
    torch.testing.assert_close(a[0].weight, b[0].weight.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(a[0].bias, b[0].bias, rtol=0, atol=1e-12)
    assert opt.state[a[0].weight]["factor_updates"] == 4


def test_openai_gpt_projections_get_factors():
    transformers = pytest.importorskip("transformers")
    config = transformers.OpenAIGPTConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=30, n_positions=8)
    model = transformers.OpenAIGPTLMHeadModel(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisherW(model, variant="paper")
    bound = {layer.name for layer in opt.collector.layers}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"} <= bound
    assert "transformer.tokens_embed" in bound
