"""Optimizer-side costs of AdaFisher on ResNet-18, each timed alone, beside fused Adam's step.

    .venv/bin/python scripts/step_components.py [--threads 2] [--rounds 30] [--old DIR] [--model resnet18]

Prints, as medians over interleaved rounds (docs/performance.md, "Second round"):

* ``update``: ``optimizer.step()`` on a step without statistics;
* ``fold+update``: the fold of one real statistics step, then the update;
* the same for ``fused=True`` (the first call compiles, tens of seconds);
* ``hooks``: the statistics hooks' own time per training step: the passes over ``x`` and ``G``
  per layer type, and the rest.

``--old DIR`` also times a copy of an older package found in ``DIR/laf_orig`` (copy the package
there and rename its imports), interleaved with the working tree: how the before/after pairs of
the performance notes were measured.
"""

from __future__ import annotations

import argparse
import collections
import copy
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
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--old", default=None, help="directory holding an older copy as laf_orig")
    parser.add_argument("--model", default="resnet18", help="an image model of `bench speed`")
    args = parser.parse_args()

    import lightning_adafisher as laf
    from lightning_adafisher.bench import MODELS

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = MODELS[args.model]()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    warnings.simplefilter("ignore")

    def fwd_bwd(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    adam_model = copy.deepcopy(base)
    adam = torch.optim.Adam(adam_model.parameters(), fused=True)
    fwd_bwd(adam_model)
    adam.step()
    packages = [("new", laf, {}), ("fused", laf, {"fused": True})]
    if args.old:
        sys.path.insert(0, args.old)
        packages.insert(0, ("old", importlib.import_module("laf_orig"), {}))
    optimizers = {}
    for name, package, kwargs in packages:
        model = copy.deepcopy(base)
        opt = package.AdaFisher(model, **kwargs)
        fwd_bwd(model)
        opt.step()
        opt.collector.active = True
        fwd_bwd(model)
        optimizers[name] = (opt, opt.collector.consume())
    times: dict[str, list[float]] = collections.defaultdict(list)
    with torch.no_grad():
        for r in range(3 + args.rounds):
            start = time.perf_counter()
            adam.step()
            if r >= 3:
                times["fused Adam step"].append(time.perf_counter() - start)
            for name, (opt, pending) in optimizers.items():
                start = time.perf_counter()
                for group in opt.param_groups:
                    opt._update_group(group)
                middle = time.perf_counter()
                opt._fold(pending)
                for group in opt.param_groups:
                    opt._update_group(group)
                if r >= 3:
                    times[f"{name} update"].append(middle - start)
                    times[f"{name} fold+update"].append(time.perf_counter() - middle)
    adam_ms = statistics.median(times["fused Adam step"]) * 1e3
    for key, values in times.items():
        ms = statistics.median(values) * 1e3
        print(f"{key:22s} {ms:7.2f} ms  × Adam's step {ms / adam_ms:5.2f}")

    # the hooks' own time inside training: the passes over x and G (the functional helpers the
    # hooks call; the norm layers' are finished at the step), and the collector's whole hook time
    from lightning_adafisher import functional as fn

    spent: dict[str, float] = collections.defaultdict(float)
    for name in ("conv2d_input_stats", "conv2d_output_stats", "linear_input_stats", "linear_output_stats"):
        original = getattr(fn, name)

        def timed(*a, _f=original, _key=name, **k):
            start = time.perf_counter()
            out = _f(*a, **k)
            spent[_key] += time.perf_counter() - start
            return out

        setattr(fn, name, timed)
    model = copy.deepcopy(base)
    opt = laf.AdaFisher(model)
    opt.collector.timed = True
    steps = 15
    for r in range(3 + steps):
        if r == 3:
            spent.clear()
            opt.collector.seconds = 0.0
        opt.collector.active = True
        fwd_bwd(model)
        opt.collector.consume()
    for key, seconds in sorted(spent.items()):
        print(f"hooks {key:32s} {seconds / steps * 1e3:6.2f} ms per step")
    total = opt.collector.seconds / steps * 1e3
    print(f"hooks total {total:.2f} ms per step (the rest, {total - sum(spent.values()) / steps * 1e3:.2f} ms: "
          "hook bodies, norm-layer routes, hook registration)")

if __name__ == "__main__":
    main()
