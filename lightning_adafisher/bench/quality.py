"""Optimizer quality on offline data, after MLCommons AlgoPerf: equal tuning budgets, one
schedule for everyone, selection on validation, seeds, and steps/time to a target.

Run with ``lightning-adafisher bench quality``. Workloads (real data that ships inside packages,
no download):

* ``digits_cnn``: the quickstart's CNN with BatchNorm (``tasks.models.DigitsCNN``) on
  scikit-learn's 8×8 handwritten digits, 15 epochs, batch 32 — a convolutional network;
* ``digits_vit``: a pre-LN ViT (4×4 = 16 patches of 2×2 pixels, d=64, 2 blocks, 4 heads) on the
  same digits, 30 epochs, batch 32 — attention, LayerNorm and GELU MLPs on images;
* ``chargpt``: a character-level GPT (``tasks.models.GPT``, 2 layers, d=64, 4 heads, context 64)
  on the English text of ``pydoc_data.topics``, 800 steps of 16 windows, held-out loss;
* ``iris``, ``wine``, ``breast_cancer``: small MLPs on tabular data. Every optimizer reaches
  ~the same accuracy on them (they are saturated), so they are not in the default set.

Splits (60/20/20 stratified for the classification data, contiguous 90/5/5 for the text) are
fixed and do not move with the run seed; for every seed all optimizers start from the same
weights and see the same batches.

Protocol, the same for every optimizer:

* schedule: linear warm-up over the first 5% of steps, then cosine decay to 0 (per step);
* tuning: a log-spaced learning-rate grid of 5 points (per optimizer family), trained with
  seed 0; the chosen lr is the one with the best final validation metric (accuracy, ties by
  loss; loss for the GPT);
* reporting: the chosen lr retrained with every seed (≥ 3), test metric as mean ± std;
* target: AdamW's mean final validation metric at its chosen lr. The validation metric is
  evaluated ``--evals`` times during training; for each optimizer the first evaluation that
  reaches the target gives steps and seconds to target (mean over the seeds that reach it).

Output: JSON, a Markdown table (``--markdown``) and PNG learning curves (``--plot``).
"""

from __future__ import annotations

import argparse
import copy
import inspect
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

from lightning_adafisher.optim import DEFAULT_LR, AdaFisher, AdaFisherW

__all__ = ["TASKS", "OPTIMIZERS", "quality", "markdown", "plot", "warmup_cosine", "add_arguments", "run_from_args"]

ADAM_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SGD_LRS = (1e-2, 3e-2, 1e-1, 3e-1, 1.0)
WARMUP_FRACTION = 0.05
DECOUPLED_WD = 1e-2
"""Weight decay of the decoupled optimizers (AdamW's torch default); the coupled ones use none."""
TARGET = "adamw"
"""Whose final validation metric is the target of steps/seconds-to-target."""


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------

OptimizerFactory = Callable[[nn.Module, float], torch.optim.Optimizer]


def _adafisher(cls: type, variant: str, k: int, wd: float) -> OptimizerFactory:
    return lambda m, lr: cls(m, lr=lr, variant=variant, update_interval=k, weight_decay=wd)


def _soap(m: nn.Module, lr: float) -> torch.optim.Optimizer:
    from pytorch_optimizer import SOAP

    return SOAP(m.parameters(), lr=lr, weight_decay=DECOUPLED_WD)


def _shampoo(m: nn.Module, lr: float) -> torch.optim.Optimizer:
    from pytorch_optimizer import Shampoo

    return Shampoo(m.parameters(), lr=lr, momentum=0.9, preconditioning_compute_steps=10)


_DEFAULT_VARIANT = inspect.signature(AdaFisher.__init__).parameters["variant"].default


def _shipped_defaults(m: nn.Module, lr: float) -> torch.optim.Optimizer:
    return AdaFisherW(m)  # every hyperparameter at its default; ``lr`` is that default


OPTIMIZERS: dict[str, tuple[OptimizerFactory, tuple[float, ...]]] = {
    "adafisherw_defaults": (_shipped_defaults, (DEFAULT_LR[_DEFAULT_VARIANT],)),
    "adam": (lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr), ADAM_LRS),
    "adamw": (lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=DECOUPLED_WD), ADAM_LRS),
    "sgd": (lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), SGD_LRS),
    "soap": (_soap, ADAM_LRS),
    "shampoo": (_shampoo, ADAM_LRS),
    "adafisherw_eigen_k1": (_adafisher(AdaFisherW, "eigen", 1, DECOUPLED_WD), ADAM_LRS),
    "adafisherw_eigen_k10": (_adafisher(AdaFisherW, "eigen", 10, DECOUPLED_WD), ADAM_LRS),
    "adafisher_paper_k1": (_adafisher(AdaFisher, "paper", 1, 0.0), ADAM_LRS),
    "adafisher_paper_k10": (_adafisher(AdaFisher, "paper", 10, 0.0), ADAM_LRS),
    "adafisherw_paper_k1": (_adafisher(AdaFisherW, "paper", 1, DECOUPLED_WD), ADAM_LRS),
    "adafisherw_paper_k10": (_adafisher(AdaFisherW, "paper", 10, DECOUPLED_WD), ADAM_LRS),
    "adafisher_reference_k1": (_adafisher(AdaFisher, "reference", 1, 0.0), ADAM_LRS),
    "adafisherw_reference_k1": (_adafisher(AdaFisherW, "reference", 1, DECOUPLED_WD), ADAM_LRS),
    "adafisherw_reference_k10": (_adafisher(AdaFisherW, "reference", 10, DECOUPLED_WD), ADAM_LRS),
}
DEFAULT_OPTIMIZERS = (
    "adamw", "sgd", "soap", "shampoo", "adafisherw_eigen_k1", "adafisherw_eigen_k10",
    "adafisherw_paper_k1", "adafisherw_reference_k1",
)


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


def _digits(name: str, epochs: int, subset: int | None) -> Task:
    import sklearn.datasets

    from lightning_adafisher.tasks.models import DigitsCNN

    data = sklearn.datasets.load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    if subset is not None:
        keep = _stratified_split(y)[0][:subset]
        x, y = x[keep], y[keep]
    tr, va, te = _stratified_split(y)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    if name == "digits_cnn":
        build: Callable[[], nn.Module] = lambda: DigitsCNN(10)  # noqa: E731
        model = "DigitsCNN (2 conv + BatchNorm, 2 linear)"
    else:
        build = lambda: ViT(image=8, patch=2, d=64, depth=2, heads=4, classes=10)  # noqa: E731
        model = "ViT 2x2 patches, d=64, 2 pre-LN blocks, 4 heads"
    return Task(
        name, build, (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), 32, epochs=epochs,
        info=dict(model=model, n_train=len(tr), n_val=len(va), n_test=len(te), epochs=epochs, batch_size=32),
    )


class _EncoderBlock(nn.Module):
    """Pre-LN transformer encoder block with explicit ``nn.Linear`` projections (as most
    hand-written ViTs and GPTs have; ``nn.MultiheadAttention`` applies its input projection
    inside ``F.multi_head_attention_forward``, where no layer hook can see it)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc_out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.norm2(x))))


class ViT(nn.Module):
    """A small pre-LN vision transformer: linear patch embedding, learned positions, mean pool."""

    def __init__(self, image: int, patch: int, d: int, depth: int, heads: int, classes: int) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch * patch, d)
        self.pos = nn.Parameter(torch.zeros(1, (image // patch) ** 2, d))
        self.blocks = nn.ModuleList(_EncoderBlock(d, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch
        patches = x.unfold(2, p, p).unfold(3, p, p).reshape(x.shape[0], -1, p * p)
        h = self.embed(patches) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


TASKS = ("digits_cnn", "digits_vit", "chargpt", "iris", "wine", "breast_cancer")
DEFAULT_TASKS = ("digits_cnn", "digits_vit", "chargpt")


def _make_task(name: str, cfg: argparse.Namespace) -> Task:
    subset = cfg.subset
    if name == "iris":
        return _tabular(name, "load_iris", 32, 16, cfg.epochs, subset)
    if name == "wine":
        return _tabular(name, "load_wine", 64, 16, cfg.epochs, subset)
    if name == "breast_cancer":
        return _tabular(name, "load_breast_cancer", 64, 32, cfg.epochs, subset)
    if name == "digits_cnn":
        return _digits(name, cfg.cnn_epochs if cfg.epochs is None else cfg.epochs, subset)
    if name == "digits_vit":
        return _digits(name, cfg.vit_epochs if cfg.epochs is None else cfg.epochs, subset)
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
    if not math.isfinite(loss):
        loss = math.inf
    if task.language:
        return dict(loss=loss)
    return dict(loss=loss, accuracy=(out.argmax(-1) == y).float().mean().item())


def _metric(task: Task) -> str:
    return "loss" if task.language else "accuracy"


def _better(task: Task, a: float, b: float) -> bool:
    """Whether metric value ``a`` is at least as good as ``b``."""
    return a <= b if task.language else a >= b


def _steps(task: Task) -> int:
    if task.language:
        return task.steps
    return task.epochs * math.ceil(len(task.train[0]) / task.batch_size)


def warmup_cosine(step: int, total: int, warmup_fraction: float = WARMUP_FRACTION) -> float:
    """The lr factor of step ``step`` (0-based): linear warm-up, then cosine decay to 0."""
    warmup = max(1, round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _train(
    task: Task, model: nn.Module, make: OptimizerFactory, lr: float, seed: int, evals: int = 10,
) -> dict:
    """Train a fresh copy of ``model`` for the task's steps under the warm-up + cosine schedule;
    returns final validation/test metrics, the validation curve and the training time."""
    model = copy.deepcopy(model)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GPT's tied head; identity warnings
        opt = make(model, lr)
    steps = _steps(task)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: warmup_cosine(k, steps))
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(task, gen)
    marks = {max(1, round(steps * (i + 1) / evals)) for i in range(evals)}
    curve: list[dict] = []
    elapsed, diverged = 0.0, False
    for step in range(1, steps + 1):
        start = time.perf_counter()
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, x, y)
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        try:
            opt.step()
        except RuntimeError as error:  # e.g. a peer's SVD of non-finite statistics
            diverged = True
            warnings.warn(f"{type(opt).__name__} failed at step {step} (counted as diverged): {error}")
            break
        schedule.step()
        elapsed += time.perf_counter() - start
        if step in marks:
            val = _evaluate(task, model, task.val)
            curve.append(dict(step=step, seconds=elapsed, **{f"val_{k}": v for k, v in val.items()}))
    val, test = _evaluate(task, model, task.val), _evaluate(task, model, task.test)
    if diverged or not math.isfinite(val["loss"]):
        worst = dict(loss=math.inf) if task.language else dict(loss=math.inf, accuracy=0.0)
        val, test = dict(worst), dict(worst)
    return dict(
        **{f"val_{k}": v for k, v in val.items()}, **{f"test_{k}": v for k, v in test.items()},
        seconds=elapsed, steps=steps, diverged=diverged, curve=curve,
    )


def _score(task: Task, run: dict) -> tuple[float, float]:
    """Higher is better: (val accuracy, −val loss), or (−val loss, 0) for the language model."""
    if task.language:
        return (-run["val_loss"], 0.0)
    return (run["val_accuracy"], -run["val_loss"])


def _summary(values: list[float]) -> dict[str, float]:
    # A diverged run makes the whole cell non-finite, not a crash.
    if not all(math.isfinite(v) for v in values):
        return dict(mean=math.nan, std=math.nan)
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0)


def _to_target(task: Task, runs: list[dict], target: float) -> dict:
    """Steps and seconds at the first evaluation whose validation metric reaches ``target``."""
    key = f"val_{_metric(task)}"
    hits = [next((c for c in r["curve"] if _better(task, c[key], target)), None) for r in runs]
    reached = [h for h in hits if h is not None]
    return dict(
        reached=len(reached), runs=len(runs),
        steps=_summary([h["step"] for h in reached]) if reached else None,
        seconds=_summary([h["seconds"] for h in reached]) if reached else None,
    )


def quality(
    tasks: list[str], optimizers: list[str], seeds: list[int], cfg: argparse.Namespace,
    lr_override: list[float] | None = None, log: Callable[[str], None] = print,
) -> dict:
    """Run the protocol of the module docstring; returns a JSON-ready dict."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out: dict = dict(
        benchmark="quality", seeds=seeds, threads=torch.get_num_threads(), torch=torch.__version__,
        machine=platform.machine(), processor=platform.processor(), target_optimizer=TARGET,
        decoupled_weight_decay=DECOUPLED_WD, schedule=f"linear warm-up {WARMUP_FRACTION:.0%}, cosine to 0",
        tasks={},
    )
    wall = time.perf_counter()
    for task_name in tasks:
        task = _make_task(task_name, cfg)
        metric = _metric(task)
        inits = {}
        for seed in seeds:
            torch.manual_seed(seed)
            inits[seed] = task.build()
        result: dict = dict(info=dict(task.info, steps=_steps(task)), metric=metric, optimizers={})
        runs_of: dict[str, list[dict]] = {}
        for opt_name in optimizers:
            make, grid = OPTIMIZERS[opt_name]
            grid = tuple(lr_override) if lr_override else grid
            tuning = {lr: _train(task, inits[seeds[0]], make, lr, seeds[0], cfg.evals) for lr in grid}
            best_lr = max(grid, key=lambda lr: _score(task, tuning[lr]))
            runs = [tuning[best_lr]] + [
                _train(task, inits[s], make, best_lr, s, cfg.evals) for s in seeds[1:]
            ]
            runs_of[opt_name] = runs
            result["optimizers"][opt_name] = dict(
                best_lr=best_lr,
                test=_summary([r[f"test_{metric}"] for r in runs]),
                val=_summary([r[f"val_{metric}"] for r in runs]),
                seconds=_summary([r["seconds"] for r in runs]),
                tuning={str(lr): dict(val=r[f"val_{metric}"], diverged=r["diverged"]) for lr, r in tuning.items()},
                curves=[r["curve"] for r in runs],
            )
            row = result["optimizers"][opt_name]
            log(f"[{task_name}] {opt_name:26s} lr {best_lr:g}  test {metric} "
                f"{row['test']['mean']:.4f} ± {row['test']['std']:.4f}  ({row['seconds']['mean']:.2f} s/run)")
        if TARGET in result["optimizers"]:
            target = result["optimizers"][TARGET]["val"]["mean"]
            result["target"] = dict(optimizer=TARGET, val=target)
            if math.isfinite(target):
                for opt_name, runs in runs_of.items():
                    result["optimizers"][opt_name]["to_target"] = _to_target(task, runs, target)
        out["tasks"][task_name] = result
    out["total_seconds"] = time.perf_counter() - wall
    return out


def markdown(result: dict) -> str:
    """The result as Markdown tables, one per workload."""
    lines: list[str] = []
    for task_name, task in result["tasks"].items():
        metric = task["metric"]
        arrow = "lower is better" if metric == "loss" else "higher is better"
        target = task.get("target")
        lines.append(f"### {task_name}: {task['info']['model']}, {task['info']['steps']} steps\n")
        lines.append(f"Test {metric} ({arrow}), mean ± std over seeds {result['seeds_by_task'][task_name]}"
                     + (f"; target: {target['optimizer']}'s final validation {metric} "
                        f"{target['val']:.4f}" if target else "") + ".\n")
        lines.append(f"| optimizer | chosen lr | test {metric} | val {metric} | steps to target | "
                     "seconds to target | s/run |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for name, row in task["optimizers"].items():
            reach = row.get("to_target")
            if reach is None or reach["steps"] is None:
                steps = seconds = f"not reached (0/{reach['runs']})" if reach else "–"
            else:
                part = "" if reach["reached"] == reach["runs"] else f" ({reach['reached']}/{reach['runs']} seeds)"
                steps = f"{reach['steps']['mean']:.0f}{part}"
                seconds = f"{reach['seconds']['mean']:.1f}"
            lines.append(
                f"| {name} | {row['best_lr']:g} | {row['test']['mean']:.4f} ± {row['test']['std']:.4f} | "
                f"{row['val']['mean']:.4f} ± {row['val']['std']:.4f} | {steps} | {seconds} | "
                f"{row['seconds']['mean']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Validation curves (mean over seeds at the chosen lr), one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"].items())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, (task_name, task) in zip(axes[0], tasks):
        key = f"val_{task['metric']}"
        for name, row in task["optimizers"].items():
            curves = [c for c in row["curves"] if c]
            if not curves or any(len(c) != len(curves[0]) for c in curves):
                continue
            steps = [p["step"] for p in curves[0]]
            values = [statistics.fmean(c[i][key] for c in curves) for i in range(len(steps))]
            style = "-" if name.startswith("adafisher") else "--"
            ax.plot(steps, values, style, label=f"{name} (lr {row['best_lr']:g})")
        if "target" in task:
            ax.axhline(task["target"]["val"], color="grey", lw=0.8)
        ax.set_title(task_name)
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {task['metric']}")
        if task["metric"] == "accuracy":
            ax.set_ylim(max(0.0, ax.get_ylim()[0]), 1.0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    parser.add_argument("--tasks", type=_names(TASKS), default=list(DEFAULT_TASKS),
                        help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--optimizers", type=_names(list(OPTIMIZERS)), default=list(DEFAULT_OPTIMIZERS),
                        help=f"comma-separated, from {', '.join(OPTIMIZERS)}")
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2],
                        help="seed 0's runs tune the lr; the chosen lr runs every seed")
    parser.add_argument("--lrs", type=_floats, default=None,
                        help="one lr grid for every optimizer (default: per-family 5-point grids)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every classification task (default: per task)")
    parser.add_argument("--cnn-epochs", type=int, default=15, help="digits_cnn: epochs")
    parser.add_argument("--vit-epochs", type=int, default=30, help="digits_vit: epochs")
    parser.add_argument("--gpt-steps", type=int, default=800, help="chargpt: training steps")
    parser.add_argument("--gpt-batch-size", type=int, default=16, help="chargpt: windows per batch")
    parser.add_argument("--gpt-eval-windows", type=int, default=256, help="chargpt: windows per evaluation")
    parser.add_argument("--context", type=int, default=64, help="chargpt: characters per window")
    parser.add_argument("--evals", type=int, default=10,
                        help="validation evaluations per run, for steps-to-target")
    parser.add_argument("--subset", type=int, default=None,
                        help="keep this many training rows (tests); GPT: 200× as many characters")
    parser.add_argument("--quick", action="store_true",
                        help="a seconds-long smoke run: tiny subsets, 2 lrs, 1 seed, few steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="1: these models are too small for intra-op threads to pay off")
    parser.add_argument("--out", default="bench_quality.json", help="where to write the JSON")
    parser.add_argument("--markdown", default=None, help="also write the tables here")
    parser.add_argument("--plot", default=None, help="also write the learning curves here (PNG)")


def run_from_args(args: argparse.Namespace) -> dict:
    if args.quick:
        args.subset, args.epochs, args.gpt_steps = 60, 2, 4
        args.gpt_batch_size, args.gpt_eval_windows, args.context, args.evals = 2, 4, 16, 2
        args.seeds = args.seeds[:1]
        args.lrs = args.lrs or [1e-3, 1e-2]
    result = quality(args.tasks, args.optimizers, args.seeds, args, args.lrs)
    result["seeds_by_task"] = {t: args.seeds for t in result["tasks"]}
    table = markdown(result)
    print("\n" + table)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.plot:
        plot(result, args.plot)
    print(f"total {result['total_seconds']:.0f} s; wrote {args.out}")
    return result
