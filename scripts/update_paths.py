"""``optimizer.step()`` of AdaFisher's update paths on ResNet-18, beside fused Adam's.

    .venv/bin/python scripts/update_paths.py [--threads 2] [--rounds 40] [--old DIR]

Times ``step()`` without statistics (``update_interval`` large) for the single-tensor path
(the CPU default) and the multi-tensor path (``foreach=True``, the CUDA default), interleaved
with fused Adam, median over rounds. ``--old DIR`` adds the multi-tensor path of an older copy
of the package in ``DIR/laf_orig`` (made as in ``scripts/bench_ab.py``) and checks that both
multi-tensor paths leave bitwise equal parameters: how the fourth round's chunked-``F`` row of
docs/performance.md was measured.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--old", default=None, help="directory holding an older copy as laf_orig")
    args = parser.parse_args()
    import torchvision

    import lightning_adafisher as laf

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def make(build):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        opt = build(model)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return model, opt

    builds = {
        "fused Adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True),
        "single-tensor": lambda m: laf.AdaFisher(m, update_interval=10**6),
        "multi-tensor": lambda m: laf.AdaFisher(m, foreach=True, update_interval=10**6),
    }
    if args.old:
        sys.path.insert(0, args.old)
        old = importlib.import_module("laf_orig")
        builds["old multi-tensor"] = lambda m: old.AdaFisher(m, foreach=True, update_interval=10**6)
    runs = {name: make(build) for name, build in builds.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (_, opt) in runs.items():
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:18s} step() {statistics.median(values) * 1e3:7.2f} ms")
    if args.old:
        same = all(
            torch.equal(p, q)
            for p, q in zip(runs["multi-tensor"][0].parameters(), runs["old multi-tensor"][0].parameters())
        )
        print(f"multi-tensor parameters bitwise equal to the old copy's: {same}")


if __name__ == "__main__":
    main()
