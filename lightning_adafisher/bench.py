"""Side-by-side step-time and optimizer-memory benchmark: AdaFisher against torch baselines.

``python -m lightning_adafisher.bench speed`` (or ``lightning-adafisher bench speed``). Every
optimizer trains its own copy of the same model on the same batch; one train step
(zero_grad + forward + backward + step) per optimizer per round, rounds interleaved so that
machine noise hits all of them alike; the median over rounds is reported, with ratios to the
baseline (fused Adam). Also reported: forward+backward alone (what the optimizers add to),
and optimizer state bytes. Results are printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_adafisher.optim import AdaFisher, AdaFisherW

__all__ = ["main", "speed"]


def _resnet18(num_classes: int = 10) -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=num_classes)


def _tiny_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {"resnet18": _resnet18, "tiny": _tiny_cnn}


def _optimizers(device: torch.device) -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    return {
        "adam_fused": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True),
        "adam_foreach": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True),
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        "adafisher_paper_k1": lambda m: AdaFisher(m, variant="paper", update_interval=1),
        "adafisher_paper_k10": lambda m: AdaFisher(m, variant="paper", update_interval=10),
        "adafisherw_reference_k1": lambda m: AdaFisherW(m, variant="reference", update_interval=1),
    }


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def speed(
    model_name: str = "resnet18",
    batch_size: int = 32,
    image_size: int = 32,
    repeats: int = 10,
    warmup: int = 3,
    device: str = "cpu",
    threads: int | None = 2,
    seed: int = 0,
) -> dict:
    """Run the benchmark and return its results (see module docstring)."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(seed)
    base = MODELS[model_name]().to(dev)
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)

    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer | None]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in _optimizers(dev).items():
            model = _copy(base)
            runs[name] = (model, make(model))
    runs["fwd_bwd_only"] = (_copy(base), None)

    def one_step(model: nn.Module, opt: torch.optim.Optimizer | None) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if opt is not None:
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(warmup + repeats):
        for name, (model, opt) in runs.items():
            elapsed = one_step(model, opt)
            if r >= warmup:
                times[name].append(elapsed)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    baseline = median["adam_fused"]
    adam_bytes = _state_bytes(runs["adam_fused"][1])  # type: ignore[arg-type]
    rows = []
    for name, (_, opt) in runs.items():
        rows.append(
            dict(
                optimizer=name,
                median_step_ms=median[name] * 1e3,
                ratio_to_adam_fused=median[name] / baseline,
                state_bytes=_state_bytes(opt) if opt is not None else 0,
                state_ratio_to_adam=(_state_bytes(opt) / adam_bytes) if opt is not None else 0.0,
            )
        )
    return dict(
        benchmark="speed",
        model=model_name,
        batch_size=batch_size,
        image_size=image_size,
        repeats=repeats,
        warmup=warmup,
        device=str(dev),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        machine=platform.machine(),
        rows=rows,
    )


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _print_table(result: dict) -> None:
    print(
        f"{result['model']} batch {result['batch_size']} on {result['device']} "
        f"({result['threads']} threads), median of {result['repeats']} interleaved steps"
    )
    print(f"{'optimizer':28s} {'step ms':>9s} {'× adam_fused':>13s} {'state MB':>9s} {'× adam':>7s}")
    for row in result["rows"]:
        print(
            f"{row['optimizer']:28s} {row['median_step_ms']:9.1f} {row['ratio_to_adam_fused']:13.3f} "
            f"{row['state_bytes'] / 2**20:9.2f} {row['state_ratio_to_adam']:7.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-adafisher bench", description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    sp = sub.add_parser("speed", help="train-step time and optimizer memory vs torch baselines")
    sp.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--image-size", type=int, default=32)
    sp.add_argument("--repeats", type=int, default=10)
    sp.add_argument("--warmup", type=int, default=3)
    sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--out", default="bench_speed.json", help="where to write the JSON")
    args = parser.parse_args(argv)
    result = speed(
        args.model, args.batch_size, args.image_size, args.repeats, args.warmup,
        args.device, args.threads,
    )
    _print_table(result)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
