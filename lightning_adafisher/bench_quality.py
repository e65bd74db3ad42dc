"""Optimizer quality on offline data: AdaFisher(W) against Adam, AdamW and SGD.

``lightning-adafisher bench quality`` (or ``python -m lightning_adafisher.bench quality``).
Tasks (SPEC §6: real data that ships inside packages, no download):

* ``iris``: 2-layer MLP (4→32→3), 20 epochs, batch 16 — the paper's Fig. 1 setting;
* ``wine``, ``breast_cancer``: 2-layer MLPs (→64→classes), 20 epochs, batch 16 / 32;
* ``chargpt``: a character-level GPT (``tasks.models.GPT``, 2 layers, d=64, 4 heads, context 64)
  on the English text of ``pydoc_data.topics``, a fixed number of steps, held-out perplexity.

Features are standardised with the training split's mean/std; splits (60/20/20, stratified for
the tabular tasks; contiguous 90/5/5 for the text) are fixed (split seed 0) and do not move with
the run seed. For every run seed all optimizers start from the same initial weights and see the
same batch order.

Protocol: every optimizer trains at every learning rate of its grid for every seed; the best lr
is the one with the best mean validation metric (accuracy, ties broken by validation loss;
perplexity for the GPT); the test metric at that lr is reported as mean ± std over the seeds.
Then a wall-clock-equal comparison: the reference optimizer's (AdaFisherW, paper defaults)
mean training time at its best lr is the budget, and each optimizer retrains at its best lr
until that budget is spent (more or fewer epochs than the epoch-equal run).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_adafisher.optim import AdaFisher, AdaFisherW

__all__ = ["TASKS", "OPTIMIZERS", "quality", "add_arguments", "run_from_args"]

ADAM_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
SGD_LRS = (1e-2, 3e-2, 1e-1, 3e-1)
DECOUPLED_WD = 1e-2
"""Weight decay of the decoupled optimizers (AdamW's torch default); the coupled ones use none."""
REFERENCE = "adafisherw_paper_k1"
"""The shipped default (AdaFisherW, paper variant, statistics every step): the time budget."""


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------

OptimizerFactory = Callable[[nn.Module, float], torch.optim.Optimizer]


def _adafisher(cls: type, variant: str, k: int, wd: float) -> OptimizerFactory:
    return lambda m, lr: cls(m, lr=lr, variant=variant, update_interval=k, weight_decay=wd)


OPTIMIZERS: dict[str, tuple[OptimizerFactory, tuple[float, ...]]] = {
    "adam": (lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr), ADAM_LRS),
    "adamw": (lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=DECOUPLED_WD), ADAM_LRS),
    "sgd": (lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), SGD_LRS),
    "adafisher_paper_k1": (_adafisher(AdaFisher, "paper", 1, 0.0), ADAM_LRS),
    "adafisher_paper_k10": (_adafisher(AdaFisher, "paper", 10, 0.0), ADAM_LRS),
    "adafisher_paper_k100": (_adafisher(AdaFisher, "paper", 100, 0.0), ADAM_LRS),
    "adafisherw_paper_k1": (_adafisher(AdaFisherW, "paper", 1, DECOUPLED_WD), ADAM_LRS),
    "adafisherw_paper_k10": (_adafisher(AdaFisherW, "paper", 10, DECOUPLED_WD), ADAM_LRS),
    "adafisherw_paper_k100": (_adafisher(AdaFisherW, "paper", 100, DECOUPLED_WD), ADAM_LRS),
    "adafisher_reference_k1": (_adafisher(AdaFisher, "reference", 1, 0.0), ADAM_LRS),
    "adafisher_reference_k10": (_adafisher(AdaFisher, "reference", 10, 0.0), ADAM_LRS),
    "adafisher_reference_k100": (_adafisher(AdaFisher, "reference", 100, 0.0), ADAM_LRS),
    "adafisherw_reference_k1": (_adafisher(AdaFisherW, "reference", 1, DECOUPLED_WD), ADAM_LRS),
    "adafisherw_reference_k10": (_adafisher(AdaFisherW, "reference", 10, DECOUPLED_WD), ADAM_LRS),
    "adafisherw_reference_k100": (_adafisher(AdaFisherW, "reference", 100, DECOUPLED_WD), ADAM_LRS),
}


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


@dataclass
class Task:
    """Data on the CPU, a model builder and how to batch and score."""

    name: str
    build: Callable[[], nn.Module]
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    batch_size: int
    epochs: int = 0
    """Epoch budget (classification); 0 for step-budgeted tasks."""
    steps: int = 0
    """Step budget (language model)."""
    language: bool = False
    info: dict = field(default_factory=dict)


def _stratified_split(y: Tensor, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[], [], []]
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_train, n_val = round(0.6 * len(idx)), round(0.2 * len(idx))
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train:n_train + n_val])
        parts[2].append(idx[n_train + n_val:])
    return tuple(torch.cat(p).sort().values for p in parts)  # type: ignore[return-value]


def _tabular(name: str, loader: str, hidden: int, batch_size: int, epochs: int, subset: int | None) -> Task:
    import sklearn.datasets

    data = getattr(sklearn.datasets, loader)()
    x = torch.as_tensor(data.data, dtype=torch.float32)
    y = torch.as_tensor(data.target, dtype=torch.long)
    if subset is not None:
        keep = _stratified_split(y)[0][:subset]
        x, y = x[keep], y[keep]
    tr, va, te = _stratified_split(y)
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-8)
    x = (x - mean) / std
    d_in, n_cls = x.shape[1], int(y.max()) + 1

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, n_cls))

    return Task(
        name, build, (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), batch_size, epochs=epochs,
        info=dict(model=f"MLP {d_in}-{hidden}-{n_cls}", n_train=len(tr), n_val=len(va), n_test=len(te),
                  epochs=epochs, batch_size=batch_size),
    )


def _pydoc_text() -> str:
    import pydoc_data.topics

    return "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def _chargpt(context: int, steps: int, batch_size: int, eval_windows: int, subset: int | None) -> Task:
    from lightning_adafisher.tasks.models import GPT

    text = _pydoc_text()
    if subset is not None:
        text = text[:subset]
    # Printable ASCII plus newline; anything else (rare in the docs) maps to one unknown id.
    alphabet = "\n" + "".join(chr(c) for c in range(32, 127))
    index = {ch: i for i, ch in enumerate(alphabet)}
    ids = torch.tensor([index.get(ch, len(alphabet)) for ch in text], dtype=torch.long)
    vocab = len(alphabet) + 1
    n = len(ids)
    splits = ids[: int(0.9 * n)], ids[int(0.9 * n): int(0.95 * n)], ids[int(0.95 * n):]

    def windows(seq: Tensor, count: int) -> tuple[Tensor, Tensor]:
        # Evenly spaced, fixed windows: the same held-out tokens for every run.
        starts = torch.linspace(0, len(seq) - context - 2, count).long()
        xs = torch.stack([seq[s: s + context] for s in starts])
        ys = torch.stack([seq[s + 1: s + context + 1] for s in starts])
        return xs, ys

    def build() -> nn.Module:
        return GPT(vocab, context_length=context, n_layer=2, n_embd=64, n_head=4, d_ff=256, dropout=0.0)

    return Task(
        "chargpt", build, (splits[0], splits[0]), windows(splits[1], eval_windows),
        windows(splits[2], eval_windows), batch_size, steps=steps, language=True,
        info=dict(model="GPT 2 layers d=64 4 heads d_ff=256", context=context, vocab=vocab,
                  train_chars=len(splits[0]), eval_windows=eval_windows, steps=steps,
                  batch_size=batch_size),
    )


TASKS = ("iris", "wine", "breast_cancer", "chargpt")


def _make_task(name: str, cfg: argparse.Namespace) -> Task:
    subset = cfg.subset
    if name == "iris":
        return _tabular(name, "load_iris", 32, 16, cfg.epochs, subset)
    if name == "wine":
        return _tabular(name, "load_wine", 64, 16, cfg.epochs, subset)
    if name == "breast_cancer":
        return _tabular(name, "load_breast_cancer", 64, 32, cfg.epochs, subset)
    if name == "chargpt":
        return _chargpt(cfg.context, cfg.gpt_steps, cfg.gpt_batch_size, cfg.gpt_eval_windows,
                        None if subset is None else subset * 200)
    raise ValueError(f"Invalid task: {name!r} (expected one of {', '.join(TASKS)})")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _batches(task: Task, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless batches: shuffled epochs (classification) or random windows (text)."""
    x, y = task.train
    if task.language:
        ctx = task.info["context"]
        while True:
            starts = torch.randint(0, len(x) - ctx - 1, (task.batch_size,), generator=generator)
            idx = starts.unsqueeze(1) + torch.arange(ctx)
            yield x[idx], x[idx + 1]
    while True:
        perm = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), task.batch_size):
            b = perm[i: i + task.batch_size]
            yield x[b], y[b]


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@torch.no_grad()
def _evaluate(task: Task, model: nn.Module, split: tuple[Tensor, Tensor]) -> dict[str, float]:
    model.eval()
    x, y = split
    out = model(x)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).item()
    model.train()
    if task.language:
        return dict(loss=loss, perplexity=math.exp(min(loss, 50.0)))
    return dict(loss=loss, accuracy=(out.argmax(-1) == y).float().mean().item())


def _train(
    task: Task, model: nn.Module, make: OptimizerFactory, lr: float, seed: int,
    time_budget: float | None = None,
) -> dict[str, float]:
    """Train a fresh copy of ``model``; returns validation/test metrics and the training time.

    Without ``time_budget`` the task's epoch/step budget applies; with it, training runs until
    the budget (seconds of training, evaluation excluded) is spent.
    """
    model = copy.deepcopy(model)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GPT's tied head; identity warnings
        opt = make(model, lr)
    gen = torch.Generator().manual_seed(seed)
    if task.language:
        steps = task.steps
    else:
        steps = task.epochs * math.ceil(len(task.train[0]) / task.batch_size)
    batches = _batches(task, gen)
    taken, elapsed, diverged = 0, 0.0, False
    start = time.perf_counter()
    while (taken < steps) if time_budget is None else (time.perf_counter() - start < time_budget):
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, x, y)
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        opt.step()
        taken += 1
    elapsed = time.perf_counter() - start
    val, test = _evaluate(task, model, task.val), _evaluate(task, model, task.test)
    if diverged or not math.isfinite(val["loss"]):
        worst = dict(loss=float("inf"), perplexity=float("inf")) if task.language else dict(loss=float("inf"), accuracy=0.0)
        val, test = dict(worst), dict(worst)
    return dict(
        **{f"val_{k}": v for k, v in val.items()}, **{f"test_{k}": v for k, v in test.items()},
        seconds=elapsed, steps=taken, diverged=diverged,
    )


def _score(task: Task, runs: list[dict]) -> tuple[float, float]:
    """Higher is better: (mean val accuracy, −mean val loss) or (−mean val perplexity, 0)."""
    if task.language:
        ppl = [r["val_perplexity"] for r in runs]
        return (-statistics.fmean(ppl) if all(math.isfinite(v) for v in ppl) else -math.inf, 0.0)
    return (statistics.fmean(r["val_accuracy"] for r in runs), -statistics.fmean(r["val_loss"] for r in runs))


def _summary(values: list[float]) -> dict[str, float]:
    # A diverged run (inf/NaN loss or perplexity) makes the whole cell non-finite, not a crash.
    if not all(math.isfinite(v) for v in values):
        return dict(mean=math.inf, std=math.nan)
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0)


def quality(
    tasks: list[str], optimizers: list[str], seeds: list[int], cfg: argparse.Namespace,
    lr_override: list[float] | None = None, time_equal: bool = True, log: Callable[[str], None] = print,
) -> dict:
    """Run the protocol of the module docstring; returns a JSON-ready dict."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out: dict = dict(
        benchmark="quality", seeds=seeds, threads=torch.get_num_threads(), torch=torch.__version__,
        machine=platform.machine(), reference=REFERENCE, decoupled_weight_decay=DECOUPLED_WD,
        tasks={},
    )
    wall = time.perf_counter()
    for task_name in tasks:
        task = _make_task(task_name, cfg)
        metric = "perplexity" if task.language else "accuracy"
        inits = {}
        for seed in seeds:
            torch.manual_seed(seed)
            inits[seed] = task.build()
        result: dict = dict(info=task.info, metric=metric, optimizers={})
        for opt_name in optimizers:
            make, grid = OPTIMIZERS[opt_name]
            grid = tuple(lr_override) if lr_override else grid
            per_lr = {}
            for lr in grid:
                per_lr[lr] = [_train(task, inits[s], make, lr, s) for s in seeds]
            best_lr = max(grid, key=lambda lr: _score(task, per_lr[lr]))
            best = per_lr[best_lr]
            result["optimizers"][opt_name] = dict(
                best_lr=best_lr,
                test=_summary([r[f"test_{metric}"] for r in best]),
                val=_summary([r[f"val_{metric}"] for r in best]),
                seconds=_summary([r["seconds"] for r in best]),
                by_lr={
                    str(lr): dict(
                        val=_summary([r[f"val_{metric}"] for r in runs]),
                        test=_summary([r[f"test_{metric}"] for r in runs]),
                        diverged=sum(r["diverged"] for r in runs),
                    )
                    for lr, runs in per_lr.items()
                },
            )
            row = result["optimizers"][opt_name]
            log(f"[{task_name}] {opt_name:26s} lr {best_lr:g}  test {metric} "
                f"{row['test']['mean']:.4f} ± {row['test']['std']:.4f}  ({row['seconds']['mean']:.2f} s/run)")
        if time_equal and REFERENCE in result["optimizers"]:
            budget = result["optimizers"][REFERENCE]["seconds"]["mean"]
            result["time_budget_seconds"] = budget
            for opt_name in optimizers:
                make, _ = OPTIMIZERS[opt_name]
                row = result["optimizers"][opt_name]
                runs = [_train(task, inits[s], make, row["best_lr"], s, time_budget=budget) for s in seeds]
                row["time_equal"] = dict(
                    test=_summary([r[f"test_{metric}"] for r in runs]),
                    steps=_summary([float(r["steps"]) for r in runs]),
                )
        out["tasks"][task_name] = result
    out["total_seconds"] = time.perf_counter() - wall
    return out


def print_table(result: dict) -> None:
    for task_name, task in result["tasks"].items():
        metric = task["metric"]
        arrow = "lower is better" if metric == "perplexity" else "higher is better"
        print(f"\n{task_name}: test {metric} ({arrow}), mean ± std over seeds {result['seeds']}")
        budget = task.get("time_budget_seconds")
        hdr = f"{'optimizer':26s} {'best lr':>8s} {'epoch-equal':>17s} {'s/run':>6s}"
        if budget is not None:
            hdr += f" {'time-equal (' + format(budget, '.2f') + ' s)':>22s} {'steps':>6s}"
        print(hdr)
        for name, row in task["optimizers"].items():
            line = (f"{name:26s} {row['best_lr']:8g} {row['test']['mean']:9.4f} ± {row['test']['std']:.4f} "
                    f"{row['seconds']['mean']:6.2f}")
            if "time_equal" in row:
                te = row["time_equal"]
                line += f" {te['test']['mean']:13.4f} ± {te['test']['std']:.4f} {te['steps']['mean']:6.0f}"
            print(line)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(choices: tuple[str, ...] | list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return names

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=_names(TASKS), default=list(TASKS))
    parser.add_argument("--optimizers", type=_names(list(OPTIMIZERS)), default=list(OPTIMIZERS))
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2, 3, 4])
    parser.add_argument("--lrs", type=_floats, default=None,
                        help="one lr grid for every optimizer (default: per-optimizer grids)")
    parser.add_argument("--epochs", type=int, default=20, help="tabular tasks")
    parser.add_argument("--gpt-steps", type=int, default=100)
    parser.add_argument("--gpt-batch-size", type=int, default=16)
    parser.add_argument("--gpt-eval-windows", type=int, default=64)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--gpt-seeds", type=_ints, default=[0, 1],
                        help="seeds for the GPT task (it is ~20× the cost of the others)")
    parser.add_argument("--subset", type=int, default=None,
                        help="keep this many training rows (tests); GPT: 200× as many characters")
    parser.add_argument("--no-time-equal", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="1: these models are too small for intra-op threads to pay off")
    parser.add_argument("--out", default="bench_quality.json", help="where to write the JSON")


def run_from_args(args: argparse.Namespace) -> dict:
    result: dict | None = None
    tabular = [t for t in args.tasks if t != "chargpt"]
    parts = []
    if tabular:
        parts.append(quality(tabular, args.optimizers, args.seeds, args, args.lrs, not args.no_time_equal))
    if "chargpt" in args.tasks:
        parts.append(quality(["chargpt"], args.optimizers, args.gpt_seeds, args, args.lrs, not args.no_time_equal))
    for part in parts:
        if result is None:
            result = part
            result["seeds_by_task"] = {t: part["seeds"] for t in part["tasks"]}
        else:
            result["tasks"].update(part["tasks"])
            result["seeds_by_task"].update({t: part["seeds"] for t in part["tasks"]})
            result["total_seconds"] += part["total_seconds"]
    assert result is not None
    for task_name, task in result["tasks"].items():
        print_table(dict(result, tasks={task_name: task}, seeds=result["seeds_by_task"][task_name]))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\ntotal {result['total_seconds']:.0f} s; wrote {args.out}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-adafisher bench quality", description=__doc__)
    add_arguments(parser)
    run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
