"""Command line of the diagnostics: ``lightning-adafisher diagnostics <command> --out DIR``.

Also reachable as ``python -m lightning_adafisher.diagnostics <command> ...``. Every command
writes PNGs and a JSON of the numbers behind them under ``--out`` and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["main"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that shows every option's default."""


def _trajectories(args: argparse.Namespace) -> str:
    from lightning_adafisher.diagnostics.trajectories import iris_experiment

    n = iris_experiment(args.out, lr=args.lr, epochs=args.epochs,
                        batch_size=args.batch_size or None, seed=args.seed, tag=args.tag,
                        n_points=args.points)
    losses = ", ".join(f"{k} {float(v['losses'][-1]):.3f}" for k, v in n["trajectories"].items())
    return f"final full-data loss: {losses}"


def _histograms(args: argparse.Namespace) -> str:
    from lightning_adafisher.diagnostics.histograms import digits_experiment

    n = digits_experiment(args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          every_n_steps=args.every, seed=args.seed)
    parts = []
    for run, layers in n["runs"].items():
        medians = ", ".join(f"{layer} {recs[-1]['q50']:.3g}" for layer, recs in layers.items())
        parts.append(f"{run} median at the end: {medians}")
    return "; ".join(parts)


def _kronecker(args: argparse.Namespace) -> str:
    from lightning_adafisher.diagnostics.kronecker import digits_experiment

    n = digits_experiment(args.out, layers=tuple(args.layers), epochs=args.epochs, lr=args.lr,
                          eval_batch=args.eval_batch, sigma=args.sigma, seed=args.seed)
    parts = []
    for layer, d in n["layers"].items():
        parts.append(f"layer {layer} SNR end: H {d['H_end']['snr_db_clean']:.1f} dB, "
                     f"S {d['S_end']['snr_db_clean']:.1f} dB")
    return "; ".join(parts)


def _true_fisher(args: argparse.Namespace) -> str:
    from lightning_adafisher.diagnostics.true_fisher import digits_experiment

    n = digits_experiment(args.out, epochs=args.epochs, lr=args.lr, eval_size=args.eval_size,
                          n_samples=args.samples, seed=args.seed)
    last = n["epochs"][-1]["adafisher"]
    return "relative MAE at the end: " + ", ".join(f"{k} {v['relative_mae']:.3f}" for k, v in last.items())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-adafisher diagnostics",
        description="Reproduce the AdaFisher paper's diagnostic figures on small offline data. "
        "Every command writes PNGs and a JSON of the numbers behind them under --out "
        "(docs/diagnostics.md).",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], str], help: str, **defaults: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        p.add_argument("--out", type=Path, required=True, default=argparse.SUPPRESS,
                       help="output folder (created)")
        p.add_argument("--seed", type=int, default=0,
                       help="data split, initialisation and batch order")
        p.add_argument("--lr", type=float, default=defaults.pop("lr", 1e-3),
                       help="learning rate of every optimizer")
        p.add_argument("--epochs", type=int, default=defaults.pop("epochs"),
                       help="passes over the training data")
        p.set_defaults(func=func)
        return p

    p = add("trajectories", _trajectories, "Adam/SGD/AdaFisher paths on an Iris loss surface "
            "(App. C, Figs. 1, 13)", epochs=20)
    p.add_argument("--batch-size", type=int, default=16, help="0: full batch")
    p.add_argument("--tag", default="", help="file name suffix: trajectories_<tag>.png")
    p.add_argument("--points", type=int, default=1500, help="scattered loss evaluations of the slice")
    p = add("histograms", _histograms, "preconditioner diagonal over training, Adam vs AdaFisher "
            "(Figs. 4, 11)", epochs=6)
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--every", type=int, default=5, help="record every N optimizer steps")
    p = add("kronecker", _kronecker, "full Kronecker factors: Gershgorin discs, noise, SNR (Eq. 7), "
            "heat maps, FFT (Figs. 3, 7-9)", epochs=10)
    p.add_argument("--layers", nargs="+", default=["2", "8"], help="module names of the digits CNN")
    p.add_argument("--eval-batch", type=int, default=256,
                   help="samples the full factors are estimated on")
    p.add_argument("--sigma", type=float, default=1e-3,
                   help="std of the off-diagonal noise added to the factors")
    p = add("true-fisher", _true_fisher, "MAE between the Kronecker-factored and the true Fisher "
            "diagonal (Fig. 12)", epochs=10)
    p.add_argument("--eval-size", type=int, default=512,
                   help="inputs the true Fisher is estimated on")
    p.add_argument("--samples", type=int, default=4, help="labels sampled per input")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    summary = args.func(args)
    print(f"{args.command}: {summary} ({time.perf_counter() - start:.1f} s) -> {args.out}")
