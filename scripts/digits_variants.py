"""Learning-rate sensitivity of AdaFisherW's variants vs AdamW on the digits CNN of the demo.

Run from the repo root: ``.venv/bin/python scripts/digits_variants.py`` (1 thread, 10 epochs,
batch 64, weight decay 5e-4, seeds 0-2; test accuracy per learning rate, no validation-based
selection: it is a sensitivity table). ``--intervals`` instead compares update_interval 1, 10
and 100 for both variants at two learning rates each. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import sys
import warnings

import torch

from lightning_adafisher.demo import train

GRID = {"adamw": [3e-4, 1e-3, 3e-3], "paper": [3e-4, 1e-3, 3e-3], "reference": [1e-4, 3e-4, 1e-3]}


INTERVAL_GRID = {"paper": [1e-3, 3e-3], "reference": [3e-4, 1e-3]}


def run(kind: str, lr: float, seed: int, update_interval: int = 1) -> float:
    if kind == "adamw":
        return train("adamw", epochs=10, seed=seed, lr=lr)
    return train("adafisherw", epochs=10, seed=seed, lr=lr, variant=kind, update_interval=update_interval)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if "--intervals" in sys.argv[1:]:
        for kind, lrs in INTERVAL_GRID.items():
            for lr in lrs:
                for k in (1, 10, 100):
                    accs = torch.tensor([run(kind, lr, seed, k) for seed in (0, 1, 2)])
                    print(f"{kind:10s} lr {lr:<7g} k {k:<4d} test accuracy {accs.mean():.4f} ± {accs.std():.4f}", flush=True)
        return
    for kind, lrs in GRID.items():
        for lr in lrs:
            accs = torch.tensor([run(kind, lr, seed) for seed in (0, 1, 2)])
            print(f"{kind:10s} lr {lr:<7g} test accuracy {accs.mean():.4f} ± {accs.std():.4f}", flush=True)


if __name__ == "__main__":
    main()
