"""Benchmarks: ``lightning-adafisher bench <name>`` (or ``python -m lightning_adafisher.bench``).

* ``speed`` (:mod:`~lightning_adafisher.bench.speed`): train-step time and optimizer memory
  beside fused Adam/AdamW and, when installed, second-order peers from PyPI
  (:mod:`~lightning_adafisher.bench.peers`);
* ``quality`` (:mod:`~lightning_adafisher.bench.quality`): optimizer quality on offline data,
  AlgoPerf-style (equal tuning budgets, one schedule, seeds, steps to a target);
* ``updates`` (:mod:`~lightning_adafisher.bench.updates`): update size and spread per layer type.

Each prints a table and writes JSON; ``docs/benchmarks.md`` shows the results and how to read
them. Nothing here is imported by ``import lightning_adafisher``.
"""

from __future__ import annotations

import argparse
import re
from importlib import import_module

__all__ = ["BENCHMARKS", "HelpFormatter", "main", "plain"]

BENCHMARKS = {
    "speed": "train-step time and optimizer memory beside fused Adam/AdamW",
    "quality": "optimizer quality on offline data, AlgoPerf-style",
    "updates": "update size and spread per layer type",
}
"""Subcommand → one-line help; each is the module ``lightning_adafisher.bench.<name>``."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with every option's default and the description's line breaks kept."""


def plain(doc: str | None) -> str:
    """A module docstring as plain text for ``--help``: reStructuredText roles and literals
    (``:mod:`~x```, double backquotes) are shown as their text."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc or "")
    return text.replace("``", "").strip()


def main(argv: list[str] | None = None) -> None:
    """``lightning-adafisher bench <name> [options]``."""
    parser = argparse.ArgumentParser(
        prog="lightning-adafisher bench", description=plain(__doc__).split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    modules = {}
    for name, help in BENCHMARKS.items():
        module = modules[name] = import_module(f"lightning_adafisher.bench.{name}")
        p = sub.add_parser(name, help=help, description=plain(module.__doc__), formatter_class=HelpFormatter)
        module.add_arguments(p)
    args = parser.parse_args(argv)
    modules[args.benchmark].run_from_args(args)
