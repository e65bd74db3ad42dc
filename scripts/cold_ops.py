"""How much one small op costs inside a hook, first call against a repeat (CPU).

    .venv/bin/python scripts/cold_ops.py

Forward hooks and autograd-node post-hooks on every BatchNorm of a ResNet-18 (b32, 2 threads)
time a sequence of ops on a 64-element tensor: ``square`` twice, then ``div``, ``sum``, ``mul``,
a no-op and a little pure Python. The first ``square`` pays for its code being cold after the
layer's kernel; the second, right after, does not (docs/performance.md, "Third round").
Also prints the step time and the minor page faults per forward+backward: run it once more
with ``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
MALLOC_TOP_PAD_=268435456`` to see what glibc's trimming costs.
"""

from __future__ import annotations

import collections
import resource
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    import torchvision

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    seen: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    small = torch.randn(64)
    sequence = [
        ("square", lambda: small.square()), ("square again", lambda: small.square()),
        ("div", lambda: small.div(3.0)), ("sum", lambda: small.sum()), ("mul", lambda: small.mul(2.0)),
        ("no-op", lambda: None), ("python", lambda: sum(range(50))),
    ]

    def probe(where: str) -> None:
        for name, op in sequence:
            start = time.perf_counter()
            op()
            seen[(where, name)].append(time.perf_counter() - start)

    def forward_hook(module, args, output):
        probe("forward hook")
        output.grad_fn.register_hook(lambda grad_inputs, grad_outputs: probe("backward node hook"))

    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_hook(forward_hook)
    faults, seconds = [], []
    for r in range(12):
        if r == 2:
            seen.clear()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        seconds.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    for (where, name), values in seen.items():
        print(f"{where:20s} {name:14s} {statistics.median(values) * 1e6:6.1f} µs")
    print(
        f"forward+backward (with the probes) {statistics.median(seconds[2:]) * 1e3:.1f} ms, "
        f"minor page faults per step {statistics.median(faults[2:]):.0f} (medians)"
    )


if __name__ == "__main__":
    main()
