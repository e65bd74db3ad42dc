from __future__ import annotations

import pytest
import torch
from torch import nn


class MixedNet(nn.Module):
    """Conv2d (strided; 'same'+dilated+grouped, bias-free), BatchNorm2d, Linear on [B, T, D],
    LayerNorm, a bias-free Linear and a raw Parameter: every case docs/numerics.md distinguishes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, padding="same", dilation=2, groups=2, bias=False)
        self.proj = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5, bias=False)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        y = self.conv2(y)
        tokens = y.flatten(2).transpose(1, 2)  # [B, T, 6]
        z = torch.nn.functional.gelu(self.ln(self.proj(tokens)))
        return (self.head(z) * self.scale).mean(1)


@pytest.fixture
def mixed_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (4,), generator=g)
    return x, y


def make_mixed(seed: int = 0, dtype=torch.float64) -> MixedNet:
    torch.manual_seed(seed)
    return MixedNet().to(dtype)
