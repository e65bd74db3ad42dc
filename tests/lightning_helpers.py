"""Small LightningModules and data used by the Lightning tests (and their subprocess scripts)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adafisher import AdaFisherMixin, AdaFisherW

HP = dict(lr=0.05, gamma=0.8, damping=1e-3, weight_decay=0.01, max_factor_size=8, eps=1e-6)
"""``max_factor_size`` and ``eps`` matter to the eigen variant only. With 8, the MLP's 16-wide
sides keep the identity: a full factor there has rank 8 after one batch of 8, and Adam gives its
near-null directions, whose eigenvectors round-off decides, full-size steps, so runs that sum
the same statistics in another order (micro-batches, ranks) would differ by ~1e-5. ``eps=1e-6``:
the head's G nulls the all-ones direction (softmax gradients sum to zero); what lands there is
round-off, which Adam divides by about ``eps`` (1e-8 leaves differences of ~1e-9)."""


def make_data(n: int = 32, seed: int = 0, dtype=torch.float64) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(x, y)


def make_mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


class MLPModule(pl.LightningModule):
    """Linear layers only: their statistics pool exactly over micro-batches and ranks."""

    def __init__(self, update_interval: int = 1, variant: str = "paper", seed: int = 0, eigen_interval: int = 1) -> None:
        super().__init__()
        self.net = make_mlp(seed)
        self.update_interval, self.variant, self.eigen_interval = update_interval, variant, eigen_interval

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return AdaFisherW(
            self.parameters(), update_interval=self.update_interval, variant=self.variant,
            eigen_interval=self.eigen_interval, **HP,
        )


class NoOptModule(pl.LightningModule):
    """For LightningCLI: the optimizer comes from the YAML."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x.float()), y)


class TinyData(pl.LightningDataModule):
    def __init__(self, n: int = 32, batch_size: int = 8) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self):
        return DataLoader(make_data(self.n, dtype=torch.float32), batch_size=self.batch_size)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.ln = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1)
        return self.out(F.gelu(self.ln(self.fc(y))))


def conv_data(n: int = 40, seed: int = 0, dtype=torch.float64) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))


class MixinConvModule(AdaFisherMixin, pl.LightningModule):
    """Every supported layer type, configured through the mixin (cosine schedule)."""

    def __init__(self, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        torch.manual_seed(seed)
        # float64 from the start: Lightning restores checkpoint weights *before* "64-true"
        # converts the module, so a float32-built module would round them (docs/lightning.md).
        self.net = ConvNet().double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)
