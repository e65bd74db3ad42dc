"""Old package against the working tree inside the `bench speed` harness (ResNet-18 b32, 2 threads).

    .venv/bin/python scripts/bench_ab.py OLD_DIR [--repeats 30] [--model resnet18]

``OLD_DIR`` holds a copy of an older package imported as ``laf_orig``, made with e.g.::

    mkdir -p /tmp/old && cd /tmp/old && git -C REPO archive REV lightning_adafisher | tar x \
      && mv lightning_adafisher laf_orig \
      && grep -rl lightning_adafisher laf_orig | xargs sed -i 's/lightning_adafisher/laf_orig/g'

Two AdaFisher (paper, k=1, eager) models of each version train interleaved with fused/foreach
Adam and SGD, so that the caches are as cold as in `bench speed`; printed per row: median step,
ratio to fused Adam, statistics-hook time, ``opt.step`` time and the ratio rebuilt from parts.
This is how the "Third round" before/after pairs of docs/performance.md were measured.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from lightning_adafisher import bench
from lightning_adafisher.optim import AdaFisher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="directory holding the older copy as laf_orig")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--model", default="resnet18")
    args = parser.parse_args()
    sys.path.insert(0, args.old)
    old = importlib.import_module("laf_orig")

    def rows(language: bool, fused: bool = False) -> dict:
        return {
            "adam_fused": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True),
            "adam_foreach": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True),
            "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
            "old": lambda m: old.AdaFisher(m),
            "new": lambda m: AdaFisher(m),
            "old_2": lambda m: old.AdaFisher(m),
            "new_2": lambda m: AdaFisher(m),
        }

    bench._optimizers = rows  # type: ignore[assignment]
    bench.AdaFisher = (AdaFisher, old.AdaFisher)  # type: ignore[assignment]  # time both collectors
    result = bench.speed(args.model, repeats=args.repeats, peers=False)
    for r in result["rows"]:
        print(
            f"{r['optimizer']:14s} median {r['median_step_ms']:7.1f} ms  ×{r['ratio_to_baseline']:.3f}  "
            f"stats {r['statistics_ms'] or 0:6.2f}  opt.step {r['optimizer_step_ms'] or 0:6.2f}  "
            f"parts ×{r['component_ratio_to_baseline'] or 0:.3f}"
        )


if __name__ == "__main__":
    main()
