"""One model training alone (no other model interleaved): median statistics-hook time, step time
and minor page faults per step (docs/performance.md, "Fifth round").

    .venv/bin/python scripts/hooks_alone.py [--old DIR] [--model cifar_resnet18] [--steps 15]

With ``--old DIR`` the copy of an older package in ``DIR/laf_orig`` trains instead of the working
tree (see scripts/bench_ab.py). Run old and new alternately, a few times each: a process trains
one model, so the allocator sees what it sees in real training.
"""

from __future__ import annotations

import argparse
import importlib
import resource
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default=None, help="directory holding an older copy as laf_orig")
    parser.add_argument("--model", default="cifar_resnet18", help="an image model of `bench speed`")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from lightning_adafisher.bench import MODELS

    if args.old:
        sys.path.insert(0, args.old)
    package = importlib.import_module("laf_orig" if args.old else "lightning_adafisher")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    model = MODELS[args.model]()
    opt = package.AdaFisher(model)
    opt.collector.timed = True
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    hooks, steps, faults = [], [], []
    for r in range(3 + args.steps):
        opt.collector.seconds = 0.0
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if r >= 3:
            steps.append((time.perf_counter() - start) * 1e3)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            hooks.append(opt.collector.seconds * 1e3)
    print(f"{'old' if args.old else 'new'} {args.model}: hooks {statistics.median(hooks):.2f} ms, "
          f"step {statistics.median(steps):.1f} ms, minor faults {statistics.median(faults):.0f} per step")


if __name__ == "__main__":
    main()
