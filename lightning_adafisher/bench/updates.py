"""Update size and spread per layer type: why the diagonal variants lose to Adam.

``lightning-adafisher bench updates``. Every optimizer trains the same model from the same
weights on the same batches (a workload of :mod:`lightning_adafisher.bench.quality`) at one
learning rate; at every step the update ``Δp`` of each parameter is grouped by the type of the
layer that owns it (``Linear``, ``Conv2d``, ``Embedding``, ``LayerNorm``, ``BatchNorm``, or
``identity`` for parameters no AdaFisher helper supports). Reported, averaged over training:

* ``rms``: root mean square of ``Δp / lr`` over the group's entries (Adam's is ≈ 1 when the
  gradient is consistent);
* ``spread``: the standard deviation of ``log10 |Δp|`` over the entries, i.e. over how many
  decades one step's entries range (a preconditioner that sends some entries to ``F = λ`` makes
  those ``1/λ`` times larger than the rest).

The warm-up + cosine schedule is not used here: the lr is constant, so ``Δp / lr`` is the
preconditioned direction itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import warnings

import torch
from torch import Tensor, nn

from lightning_adafisher.bench import quality as bq
from lightning_adafisher.compat import batchnorm_types
from lightning_adafisher.layers import layer_helper_for

__all__ = ["updates", "add_arguments", "run_from_args"]

KINDS = {
    nn.Linear: "Linear", nn.Conv2d: "Conv2d", nn.Embedding: "Embedding", nn.LayerNorm: "LayerNorm",
    **{kind: "BatchNorm" for kind in batchnorm_types()},
}


def _kinds(model: nn.Module) -> dict[int, str]:
    """Parameter id → the kind of layer that owns it (the first owner, for tied weights)."""
    kinds: dict[int, str] = {}
    for module in model.modules():
        kind = next((name for cls, name in KINDS.items() if isinstance(module, cls)), None)
        if kind is None or layer_helper_for(module) is None:
            kind = "identity"
        for p in module.parameters(recurse=False):
            kinds.setdefault(id(p), kind)
    return kinds


def _measure(task: bq.Task, init: nn.Module, make: bq.OptimizerFactory, lr: float, steps: int,
             seed: int) -> dict[str, dict[str, float]]:
    model = copy.deepcopy(init)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make(model, lr)
    kinds = _kinds(model)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = bq._batches(task, torch.Generator().manual_seed(seed))
    rms: dict[str, list[float]] = {}
    spread: dict[str, list[float]] = {}
    for _ in range(steps):
        x, y = next(batches)
        before = [p.detach().clone() for p in params]
        opt.zero_grad(set_to_none=True)
        loss = bq._loss(model, x, y)
        if not torch.isfinite(loss):
            break
        loss.backward()
        opt.step()
        deltas: dict[str, list[Tensor]] = {}
        for p, old in zip(params, before):
            deltas.setdefault(kinds[id(p)], []).append((p.detach() - old).flatten())
        for kind, parts in deltas.items():
            d = torch.cat(parts).double()
            rms.setdefault(kind, []).append(d.square().mean().sqrt().item() / lr)
            nonzero = d[d != 0].abs()
            if nonzero.numel() > 1:
                spread.setdefault(kind, []).append(nonzero.log10().std().item())
    return {
        kind: dict(rms=statistics.fmean(rms[kind]),
                   spread=statistics.fmean(spread[kind]) if spread.get(kind) else math.nan)
        for kind in rms
    }


def updates(tasks: list[str], optimizers: list[str], lr: float, steps: int, seed: int,
            cfg: argparse.Namespace) -> dict:
    torch.set_num_threads(cfg.threads)
    out: dict = dict(benchmark="updates", lr=lr, steps=steps, seed=seed, tasks={})
    for task_name in tasks:
        task = bq._make_task(task_name, cfg)
        torch.manual_seed(seed)
        init = task.build()
        out["tasks"][task_name] = {
            name: _measure(task, init, bq.OPTIMIZERS[name][0], lr, steps, seed) for name in optimizers
        }
    return out


def markdown(result: dict) -> str:
    lines = []
    for task_name, rows in result["tasks"].items():
        kinds = sorted({kind for row in rows.values() for kind in row})
        lines.append(f"### {task_name}: lr {result['lr']:g}, {result['steps']} steps, "
                     "mean over steps of RMS(Δp/lr) / spread (std of log10|Δp|)\n")
        lines.append("| optimizer | " + " | ".join(kinds) + " |")
        lines.append("| --- |" + " --- |" * len(kinds))
        for name, row in rows.items():
            cells = [f"{row[k]['rms']:.3g} / {row[k]['spread']:.2f}" if k in row else "–" for k in kinds]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=bq._names(bq.TASKS), default=["digits_cnn", "chargpt"],
                        help="comma-separated")
    parser.add_argument("--optimizers", type=bq._names(list(bq.OPTIMIZERS)),
                        default=["adamw", "adafisherw_paper_k1", "adafisherw_reference_k1", "adafisherw_eigen_k1"],
                        help="comma-separated")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="one constant learning rate for every optimizer")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument("--subset", type=int, default=None, help="keep this many training rows (tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default="bench_updates.json", help="where to write the JSON")
    # the workloads' own settings, as in bench quality
    parser.set_defaults(epochs=None, cnn_epochs=15, vit_epochs=30, gpt_steps=800, gpt_batch_size=16,
                        gpt_eval_windows=64, context=64)


def run_from_args(args: argparse.Namespace) -> dict:
    result = updates(args.tasks, args.optimizers, args.lr, args.steps, args.seed, args)
    print(markdown(result))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result
