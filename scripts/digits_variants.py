"""Learning-rate sensitivity of AdaFisherW's variants vs AdamW on the digits CNN of the demo.

Run from the repo root: ``.venv/bin/python scripts/digits_variants.py`` (1 thread, 10 epochs,
batch 64, weight decay 5e-4, seeds 0-2; test accuracy per learning rate, no validation-based
selection: it is a sensitivity table). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from lightning_adafisher import AdaFisherW
from lightning_adafisher.demo import digits_tensors, small_cnn

GRID = {"adamw": [3e-4, 1e-3, 3e-3], "paper": [3e-4, 1e-3, 3e-3], "reference": [1e-4, 3e-4, 1e-3]}


def run(kind: str, lr: float, seed: int, epochs: int = 10) -> float:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits_tensors(seed)
    model = small_cnn()
    if kind == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    else:
        opt = AdaFisherW(model, lr=lr, weight_decay=5e-4, variant=kind)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    for kind, lrs in GRID.items():
        for lr in lrs:
            accs = torch.tensor([run(kind, lr, seed) for seed in (0, 1, 2)])
            print(f"{kind:10s} lr {lr:<7g} test accuracy {accs.mean():.4f} ± {accs.std():.4f}", flush=True)


if __name__ == "__main__":
    main()
