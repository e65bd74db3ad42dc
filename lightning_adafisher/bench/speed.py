"""Side-by-side train-step time and optimizer memory: ``lightning-adafisher bench speed``.

Every optimizer trains its own copy of the same model on the same batch; one train step
(zero_grad + forward + backward + step) per optimizer per round, rounds interleaved so that
machine noise hits all of them alike; the median over rounds is reported, with ratios to the
baseline (fused Adam; fused AdamW for the GPT). Also reported: forward+backward alone (what the
optimizers add to), the optimizer step and the statistics hooks timed on their own, optimizer
state bytes, and AdaFisher's persistent workspace. Second-order peers from PyPI (Shampoo,
AdaHessian, K-FAC; :mod:`lightning_adafisher.bench.peers`) are timed too when their packages are
installed. ``--batch-sizes`` sweeps the batch size (statistics cost is linear in it). Results
are printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import warnings
from typing import Callable

import torch
from torch import nn

from lightning_adafisher.bench import ops as bench_ops
from lightning_adafisher.bench import peers as bench_peers
from lightning_adafisher.bench.ops import cuda_code_path
from lightning_adafisher.bench.peers import Batch, plain_step
from lightning_adafisher.optim import AdaFisher, AdaFisherW

__all__ = ["MODELS", "add_arguments", "run_from_args", "speed"]

OPS_STEPS = 10
"""Steps whose ops ``--count-ops`` counts: one cycle of a statistics-every-10-steps optimizer."""

GPT_VOCAB = 512
"""Vocabulary of the benchmark GPT (a small one: the head's cost is not what is measured)."""


def _resnet18(num_classes: int = 10) -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=num_classes)


def _cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """The CIFAR ResNet-18 the recipes train (3×3 stem, no max-pool: 32×32 maps in stage 1)."""
    from lightning_adafisher.tasks.models import build_image_model

    return build_image_model("cifar_resnet18", num_classes)


def _resnet50(num_classes: int = 10) -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(num_classes=num_classes)


def _tiny_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


def _gpt(context: int) -> nn.Module:
    """The paper's 4-layer GPT-1 (d=768, 12 heads, MLP 3072), dropout off, small vocabulary."""
    from lightning_adafisher.tasks.models import GPT

    return GPT(GPT_VOCAB, context_length=context, dropout=0.0)


def _gpt_tiny(context: int) -> nn.Module:
    from lightning_adafisher.tasks.models import GPT

    return GPT(GPT_VOCAB, context_length=context, n_layer=2, n_embd=32, n_head=2, d_ff=64, dropout=0.0)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": _resnet18, "cifar_resnet18": _cifar_resnet18, "resnet50": _resnet50, "tiny": _tiny_cnn,
}
LANGUAGE_MODELS: dict[str, Callable[[int], nn.Module]] = {"gpt": _gpt, "gpt_tiny": _gpt_tiny}
DEFAULT_BATCH = {"resnet18": 32, "cifar_resnet18": 32, "resnet50": 256, "tiny": 32, "gpt": 8, "gpt_tiny": 8}


def _optimizers(language: bool, fused: bool = False) -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    rows = _baselines_and_adafisher(language)
    if fused:  # opt-in: the first step compiles the fused kernel (tens of seconds on CPU)
        cls = AdaFisherW if language else AdaFisher
        prefix = "adafisherw" if language else "adafisher"
        rows[f"{prefix}_paper_k1_fused"] = lambda m: cls(m, variant="paper", update_interval=1, fused=True)
        rows[f"{prefix}_paper_k10_fused"] = lambda m: cls(m, variant="paper", update_interval=10, fused=True)
    return rows


def _baselines_and_adafisher(language: bool) -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    if language:
        # Transformers are trained with decoupled decay: AdamW is the baseline.
        return {
            "adamw_fused": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True),
            "adamw_foreach": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True),
            "adafisherw_paper_k1": lambda m: AdaFisherW(m, variant="paper", update_interval=1),
            "adafisherw_paper_k10": lambda m: AdaFisherW(m, variant="paper", update_interval=10),
            "adafisherw_reference_k1": lambda m: AdaFisherW(m, variant="reference", update_interval=1),
            "adafisherw_eigen_k1": lambda m: AdaFisherW(m, variant="eigen", update_interval=1),
            "adafisherw_eigen_k10": lambda m: AdaFisherW(m, variant="eigen", update_interval=10),
        }
    return {
        "adam_fused": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True),
        "adam_foreach": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True),
        "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        "adafisher_paper_k1": lambda m: AdaFisher(m, variant="paper", update_interval=1),
        "adafisher_paper_k10": lambda m: AdaFisher(m, variant="paper", update_interval=10),
        "adafisherw_reference_k1": lambda m: AdaFisherW(m, variant="reference", update_interval=1),
        "adafisherw_eigen_k1": lambda m: AdaFisherW(m, variant="eigen", update_interval=1),
        "adafisherw_eigen_k10": lambda m: AdaFisherW(m, variant="eigen", update_interval=10),
    }


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def _workspace_bytes(opt: torch.optim.Optimizer | None) -> int:
    workspace = getattr(opt, "_workspace", None) or {}
    return sum(t.numel() * t.element_size() for t in workspace.values())


def speed(
    model_name: str = "resnet18",
    batch_size: int | None = None,
    image_size: int = 32,
    repeats: int = 10,
    warmup: int = 3,
    device: str = "cpu",
    threads: int | None = 2,
    seed: int = 0,
    context: int = 64,
    fused: bool = False,
    peers: bool = True,
    only: list[str] | None = None,
    count_ops: bool = False,
) -> dict:
    """Run the benchmark at one batch size and return its results (see module docstring).

    ``model_name``: ``resnet18`` (torchvision's, ImageNet stem), ``cifar_resnet18`` (the recipes'),
    ``resnet50``/``tiny`` (images ``image_size``², 10 classes, fused Adam
    baseline) or ``gpt``/``gpt_tiny`` (``context`` tokens of a 512-token vocabulary, next-token
    loss, fused AdamW baseline). ``only``: time just these optimizers (the baseline is always
    timed, first). ``count_ops``: after the timed rounds, also count the compute ops each
    optimizer's train step dispatches over ``OPS_STEPS`` steps, on the code path CUDA runs
    (:mod:`lightning_adafisher.bench.ops`), after one uncounted step on it: a GPU's launch
    count in steady state, measurable on any machine.
    """
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    language = model_name in LANGUAGE_MODELS
    batch_size = batch_size or DEFAULT_BATCH[model_name]
    torch.manual_seed(seed)
    if language:
        base = LANGUAGE_MODELS[model_name](context).to(dev)
        x = torch.randint(0, GPT_VOCAB, (batch_size, context), device=dev)
        y = torch.randint(0, GPT_VOCAB, (batch_size, context), device=dev)
    else:
        base = MODELS[model_name]().to(dev)
        x = torch.randn(batch_size, 3, image_size, image_size, device=dev)
        y = torch.randint(0, 10, (batch_size,), device=dev)

    batch = Batch(x, y)
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer | None, Callable[[], None]]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step_seconds: dict[str, list[float]] = {}
        rows = _optimizers(language, fused)
        if only:
            unknown = sorted(set(only) - set(rows) - (set(bench_peers.peers()) if peers else set()))
            if unknown:
                raise ValueError(f"Invalid --only: {unknown} (expected names from {', '.join(rows)})")
            first = next(iter(rows))
            rows = {name: make for name, make in rows.items() if name == first or name in only}
        for name, make in rows.items():
            model = copy.deepcopy(base)
            opt = make(model)
            step_seconds[name] = []
            runs[name] = (model, opt, plain_step(model, opt, batch, step_seconds=step_seconds[name]))
            if isinstance(opt, AdaFisher) and opt.collector is not None:
                opt.collector.timed = True  # host time spent computing statistics
        peer_names = set()
        if peers:
            for name, factory in bench_peers.peers().items():
                if only and name not in only:
                    continue
                model = copy.deepcopy(base)
                runs[name] = (model, *factory(model, batch))
                peer_names.add(name)
    plain = copy.deepcopy(base)

    def fwd_bwd() -> None:
        plain.zero_grad(set_to_none=True)
        Batch.loss(plain(x), y).backward()

    runs["fwd_bwd_only"] = (plain, None, fwd_bwd)
    baseline_name = next(iter(runs))

    peak: dict[str, int] = {}

    def one_step(name: str, step: Callable[[], None]) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
            resident = torch.cuda.memory_allocated(dev)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peers warn on every step (deprecated hooks)
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            # what the step needs above everything resident (activations, temporaries, state growth)
            above = torch.cuda.max_memory_allocated(dev) - resident
            peak[name] = max(peak.get(name, 0), above)
        return time.perf_counter() - start

    skipped: dict[str, str] = {}
    times: dict[str, list[float]] = {name: [] for name in runs}
    stats_seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(warmup + repeats):
        if r == warmup:
            for seconds in step_seconds.values():
                seconds.clear()
        for name, (_, opt, step) in list(runs.items()):
            collector = opt.collector if isinstance(opt, AdaFisher) else None
            if collector is not None:
                collector.seconds = 0.0
            try:
                elapsed = one_step(name, step)
            except Exception as error:  # noqa: BLE001 - a peer's own failure, reported
                if name not in peer_names:
                    raise
                skipped[name] = f"step {r + 1}: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                del runs[name], times[name]
                continue
            if r >= warmup:
                times[name].append(elapsed)
                if collector is not None:
                    stats_seconds[name].append(collector.seconds)
    ops: dict[str, list[int]] = {}
    if count_ops:
        for name, (_, opt, step) in runs.items():
            if isinstance(opt, AdaFisher) and any(group.get("fused") for group in opt.param_groups):
                # under a dispatch mode the compiled update runs op by op: not its kernel count
                skipped[name] = "op count: a compiled (fused=True) update is not counted"
                continue
            try:
                with warnings.catch_warnings(), cuda_code_path([opt]):
                    warnings.simplefilter("ignore")
                    step()  # not counted: fills that code path's caches (layouts, constants)
                    ops[name] = [bench_ops.count_ops(step).total for _ in range(OPS_STEPS)]
            except Exception as error:  # noqa: BLE001 - a peer that cannot run under a dispatch mode
                if name not in peer_names:
                    raise
                skipped[name] = f"op count: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    median = {name: statistics.median(ts) for name, ts in times.items()}
    mean = {name: statistics.fmean(ts) for name, ts in times.items()}
    baseline = median[baseline_name]
    base_bytes = _state_bytes(runs[baseline_name][1])  # type: ignore[arg-type]

    def mean_ms(values: list[float]) -> float | None:
        return statistics.fmean(values) * 1e3 if values else None

    # Components, each measured inside the interleaved steps: less noisy than whole steps,
    # whose forward+backward varies by more than an optimizer costs on a shared machine.
    fwd_bwd_ms = median["fwd_bwd_only"] * 1e3
    base_step_ms = mean_ms(step_seconds[baseline_name]) or 0.0
    rows = []
    for name, (_, opt, _) in runs.items():
        opt_ms = mean_ms(step_seconds.get(name, []))
        stats_ms = mean_ms(stats_seconds[name])
        component_ratio = None
        if opt_ms is not None:
            component_ratio = (fwd_bwd_ms + (stats_ms or 0.0) + opt_ms) / (fwd_bwd_ms + base_step_ms)
        rows.append(
            dict(
                optimizer=name,
                median_step_ms=median[name] * 1e3,
                mean_step_ms=mean[name] * 1e3,
                ratio_to_baseline=median[name] / baseline,
                # The mean counts a statistics-every-k optimizer's cycle fairly when repeats is a
                # multiple of k; the median shows its typical (non-statistics) step.
                mean_ratio_to_baseline=mean[name] / mean[baseline_name],
                state_bytes=_state_bytes(opt) if opt is not None else 0,
                state_ratio_to_baseline=(_state_bytes(opt) / base_bytes) if opt is not None else 0.0,
                workspace_bytes=_workspace_bytes(opt),
                peak_step_bytes=peak.get(name),  # CUDA only: None on CPU
                optimizer_step_ms=opt_ms,
                statistics_ms=stats_ms,
                component_ratio_to_baseline=component_ratio,
                # mean and most over OPS_STEPS steps (a statistics-every-k optimizer's cycle)
                ops_per_step=statistics.fmean(ops[name]) if name in ops else None,
                ops_max=max(ops[name]) if name in ops else None,
                ops_ratio_to_baseline=(max(ops[name]) / max(ops[baseline_name])) if name in ops else None,
            )
        )
    return dict(
        benchmark="speed",
        model=model_name,
        baseline=baseline_name,
        batch_size=batch_size,
        image_size=None if language else image_size,
        context=context if language else None,
        repeats=repeats,
        warmup=warmup,
        device=str(dev),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        machine=platform.machine(),
        rows=rows,
        skipped=skipped,
    )


def _print_table(result: dict) -> None:
    print(
        f"{result['model']} batch {result['batch_size']} on {result['device']} "
        f"({result['threads']} threads), median of {result['repeats']} interleaved steps"
    )
    base = result["baseline"]
    print(
        f"{'optimizer':26s} {'step ms':>8s} {'× ' + base:>14s} {'mean ×':>7s} "
        f"{'opt.step ms':>11s} {'stats ms':>8s} {'parts ×':>7s} "
        f"{'state MB':>9s} {'× ' + base:>14s} {'wksp MB':>8s}"
    )

    def opt(value: float | None, fmt: str) -> str:
        return "—".rjust(len(format(0.0, fmt))) if value is None else format(value, fmt)

    for row in result["rows"]:
        print(
            f"{row['optimizer']:26s} {row['median_step_ms']:8.1f} {row['ratio_to_baseline']:14.3f} "
            f"{row['mean_ratio_to_baseline']:7.3f} {opt(row['optimizer_step_ms'], '11.2f')} "
            f"{opt(row['statistics_ms'], '8.2f')} {opt(row['component_ratio_to_baseline'], '7.3f')} "
            f"{row['state_bytes'] / 2**20:9.2f} "
            f"{row['state_ratio_to_baseline']:14.3f} {row['workspace_bytes'] / 2**20:8.2f}"
        )
    counted = [row for row in result["rows"] if row.get("ops_max") is not None]
    if counted:
        print(f"compute ops per train step on CUDA's code path ({OPS_STEPS} steps):")
        print(f"{'optimizer':26s} {'mean':>7s} {'most':>6s} {'most × ' + base:>18s}")
        for row in counted:
            print(f"{row['optimizer']:26s} {row['ops_per_step']:7.1f} {row['ops_max']:6d} "
                  f"{row['ops_ratio_to_baseline']:18.2f}")
    for name, reason in result.get("skipped", {}).items():
        print(f"{name:26s} skipped: {reason}")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(sp: argparse.ArgumentParser) -> None:
    """The options of ``bench speed``."""
    sp.add_argument("--model", choices=sorted(MODELS) + sorted(LANGUAGE_MODELS), default="resnet18",
                    help="resnet18: torchvision's (ImageNet stem: 8x8 maps after it on 32x32 images); "
                         "cifar_resnet18: the recipes' (3x3 stem, 32x32 first stage)")
    sp.add_argument("--batch-size", type=int, default=None,
                    help="None: 32 (images), 8 (GPT)")
    sp.add_argument("--batch-sizes", type=_int_list, default=None,
                    help="sweep, e.g. 16,32,64,128 (overrides --batch-size)")
    sp.add_argument("--image-size", type=int, default=32, help="height and width of the images")
    sp.add_argument("--context", type=int, default=64, help="GPT tokens per sequence")
    sp.add_argument("--repeats", type=int, default=10, help="timed rounds (the median is reported)")
    sp.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    sp.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    sp.add_argument("--fused", action="store_true",
                    help="also time AdaFisher(fused=True) (compiles on the first step)")
    sp.add_argument("--no-peers", dest="peers", action="store_false",
                    help="skip the installed second-order peers (pytorch-optimizer, asdfghjkl)")
    sp.add_argument("--only", type=lambda text: [v for v in text.split(",") if v], default=None,
                    help="time just these optimizers, comma-separated (the baseline always)")
    sp.add_argument("--count-ops", action="store_true",
                    help="also count the compute ops per train step on the code path CUDA runs "
                         "(a GPU's kernel launches; taken on any device)")
    sp.add_argument("--out", default="bench_speed.json", help="where to write the JSON")


def run_from_args(args: argparse.Namespace) -> dict:
    """Run ``bench speed`` as parsed by :func:`add_arguments`; print, write and return the result."""
    sizes = args.batch_sizes or [args.batch_size]
    results = []
    for size in sizes:
        result = speed(
            args.model, size, args.image_size, args.repeats, args.warmup,
            args.device, args.threads, context=args.context, fused=args.fused, peers=args.peers,
            only=args.only, count_ops=args.count_ops,
        )
        _print_table(result)
        results.append(result)
    out = results[0] if len(results) == 1 else dict(benchmark="speed_sweep", model=args.model, results=results)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")
    return out
