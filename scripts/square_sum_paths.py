"""Ways to compute the hooks' sums of squares on ResNet-18's layer shapes (batch 32).

    .venv/bin/python scripts/square_sum_paths.py [--threads 2]

``Σ_b x²`` (a conv's ``h`` before the window sums) and ``Σ_{b,y,x} G²`` (its ``s``): the
eager ``square().sum(...)`` the hooks use, ``torch.var_mean`` (one pass, then ``B·(var + mean²)``),
``linalg.vecdot``, and ``torch.compile`` of ``(t * t).sum(...)`` (one pass, no temporary);
median ms of 30 calls each, warm. docs/performance.md, "Fourth round".
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _ms(f, t, n=30):
    f(t)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f(t)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    over_batch = torch.compile(lambda t: (t * t).sum(0), dynamic=False)
    per_channel = torch.compile(lambda t: (t * t).sum((0, 2, 3)), dynamic=False)
    candidates = {
        "x: square().sum(0)": lambda t: t.square().sum(0),
        "x: var_mean(0)": lambda t: torch.var_mean(t, 0, correction=0),
        "x: vecdot(0)": lambda t: torch.linalg.vecdot(t.flatten(1), t.flatten(1), dim=0),
        "x: compiled": over_batch,
        "G: square().sum((0,2,3))": lambda t: t.square().sum((0, 2, 3)),
        "G: var_mean((0,2,3))": lambda t: torch.var_mean(t, (0, 2, 3), correction=0),
        "G: compiled": per_channel,
    }
    for shape in [(32, 64, 32, 32), (32, 128, 16, 16), (32, 256, 8, 8), (32, 512, 4, 4)]:
        t = torch.randn(shape)
        print(shape)
        for name, f in candidates.items():
            print(f"  {name:26s} {_ms(f, t):7.3f} ms")


if __name__ == "__main__":
    main()
