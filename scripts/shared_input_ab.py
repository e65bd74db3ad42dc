"""Statistics-hook time per step, an older package against the working tree, on models whose
layers share inputs (docs/performance.md, "Fifth round").

    .venv/bin/python scripts/shared_input_ab.py OLD_DIR [--steps 25] [--threads 2]

``OLD_DIR`` holds a copy of an older package imported as ``laf_orig`` (see scripts/bench_ab.py).
Models (``--models``): four pre-norm transformer blocks with separate q/k/v and gate/up
projections (``blocks``: d=512, batch 8×256 tokens), torchvision's ResNet-18 (``resnet18``) and
the recipes' CIFAR ResNet-18 (``cifar_resnet18``), 10 classes, batch 32 at 32×32. Two models of
each version train interleaved; printed: median and mean of ``collector.seconds`` per step.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import lightning_adafisher as laf

D, TOKENS, BATCH = 512, 256, 8


class Block(nn.Module):
    """Pre-norm attention + gated MLP with one Linear per projection (LLaMA-style layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        q, k, v = (p(h).view(BATCH, TOKENS, 8, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(BATCH, TOKENS, D)
        x = x + self.o(a)
        h = self.ln2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def hook_times(base: nn.Module, x: torch.Tensor, y: torch.Tensor, packages: dict, steps: int) -> None:
    runs = {}
    for name, package in packages.items():
        model = copy.deepcopy(base)
        opt = package.AdaFisher(model)
        opt.collector.timed = True
        runs[name] = (model, opt, [])
    for r in range(3 + steps):
        for model, opt, times in runs.values():
            opt.collector.active, opt.collector.seconds = True, 0.0
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x).flatten(0, -2), y.flatten()).backward()
            opt.collector.consume()
            if r >= 3:
                times.append(opt.collector.seconds * 1e3)
    for name, (_, _, times) in runs.items():
        print(f"  {name:6s} hooks ms median {statistics.median(times):6.2f}  mean {statistics.mean(times):6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old_dir")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="blocks,resnet18,cifar_resnet18")
    args = parser.parse_args()
    from lightning_adafisher.bench import MODELS

    sys.path.insert(0, args.old_dir)
    old = importlib.import_module("laf_orig")
    packages = {"old": old, "new": laf, "old_2": old, "new_2": laf}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    images = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    for name in args.models.split(","):
        if name == "blocks":
            print(f"transformer, 4 blocks, separate q/k/v, d={D}, batch {BATCH}x{TOKENS}")
            blocks = nn.Sequential(*(Block() for _ in range(4)), nn.Linear(D, 10))
            tokens = torch.randn(BATCH, TOKENS, D), torch.randint(0, 10, (BATCH, TOKENS))
            hook_times(blocks, *tokens, packages, args.steps)
        else:
            print(f"{name}, batch 32, 32x32")
            hook_times(MODELS[name](), *images, packages, args.steps)


if __name__ == "__main__":
    main()
