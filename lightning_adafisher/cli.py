"""The ``lightning-adafisher`` console script: a LightningCLI plus ``bench`` and ``diagnostics``.

``lightning-adafisher fit --config recipe.yaml`` runs Lightning's CLI with any LightningModule
and DataModule (``class_path``/``init_args``). When the configured ``optimizer`` is AdaFisher or
AdaFisherW (``optimizer: {class_path: lightning_adafisher.AdaFisherW, init_args: {...}}``) and no
``AdaFisherCallback`` is configured, one is added, so the YAML needs nothing else.
``validate``, ``test`` and ``predict`` are Lightning's too. ``lightning-adafisher bench ...``
runs :mod:`lightning_adafisher.bench`, ``lightning-adafisher diagnostics ...``
:mod:`lightning_adafisher.diagnostics`.
"""

from __future__ import annotations

import sys
import warnings
from types import MethodType
from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_adafisher.callbacks import AdaFisherCallback
from lightning_adafisher.compat import lightning_cli_missing_methods, subcommands_action
from lightning_adafisher.optim import AdaFisher

__all__ = ["AdaFisherCLI", "main", "run_cli"]

EXTRA_SUBCOMMANDS = {
    "bench": "Benchmarks: step time and memory, quality, update sizes "
    "(see `lightning-adafisher bench --help`).",
    "diagnostics": "The paper's diagnostic figures on offline data "
    "(see `lightning-adafisher diagnostics --help`).",
}
"""Subcommands :func:`main` dispatches before LightningCLI; listed in its ``--help`` too."""


def _configured_class(value: Any) -> type | None:
    """The class a jsonargparse ``class_path`` entry names, if any."""
    path = getattr(value, "class_path", None) if value is not None else None
    if path is None and isinstance(value, dict):
        path = value.get("class_path")
    if not isinstance(path, str):
        return None
    module, _, name = path.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return None


def _value(config: Any, subcommand: str | None, key: str, default: Any) -> Any:
    """``key`` of the parsed ``config``, under ``subcommand`` when there is one."""
    if subcommand is not None and subcommand in config:
        config = config[subcommand]
    return config.get(key, default) if hasattr(config, "get") else default


class AdaFisherCLI(LightningCLI):
    """LightningCLI that adds ``AdaFisherCallback`` when an AdaFisher optimizer is configured,
    and after ``fit`` tests at the best checkpoint (``--test_after_fit false`` to skip)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="after fit, run the test loop at the best checkpoint (if the data has a test split)",
        )

    def _add_subcommands(self, parser: Any, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # List bench/diagnostics in `--help` next to fit/validate/test/predict; main() runs them
        # before LightningCLI parses anything, so these placeholder parsers are never used.
        action = subcommands_action(parser)
        if action is None:  # a jsonargparse without it: the help just does not list them
            return
        for name, description in EXTRA_SUBCOMMANDS.items():
            action.add_subcommand(name, self.init_parser(description=description), help=description)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        # LightningCLI builds the YAML's optimizer from model.parameters() right here, before
        # the Trainer exists: a model whose size depends on the data (CausalLM's vocabulary)
        # must be built first.
        build = getattr(self.model, "build_from_datamodule", None)
        if callable(build) and self.datamodule is not None:
            build(self.datamodule)
        if is_overridden("configure_model", self.model):
            # ... but a model that configure_model shards (fully_shard replaces the parameters)
            # must be built first too: pytorch-lightning#19110. Build the optimizer when the
            # Trainer asks for it, after configure_model.
            parent = super()._add_configure_optimizers_method_to_model

            def configure_optimizers(model: Any) -> Any:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*configure_optimizers` will be overridden")
                    parent(subcommand)
                return model.configure_optimizers()

            self.model.configure_optimizers = MethodType(configure_optimizers, self.model)
            return
        super()._add_configure_optimizers_method_to_model(subcommand)

    def after_fit(self) -> None:
        if not _value(self.config, self.subcommand, "test_after_fit", False):
            return
        datamodule = self.datamodule
        if datamodule is None or not is_overridden("test_dataloader", datamodule):
            return
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        self.trainer.test(self.model, datamodule=datamodule, ckpt_path="best" if best else None)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        value = _value(self.config_init, self.subcommand, "optimizer", None)
        optimizer_cls = _configured_class(value)
        if optimizer_cls is None:  # instantiated already in some LightningCLI versions
            optimizer_cls = value if isinstance(value, type) else None
        if isinstance(optimizer_cls, type) and issubclass(optimizer_cls, AdaFisher):
            configured = list(config.get("callbacks") or []) + list(callbacks)
            if not any(isinstance(c, AdaFisherCallback) for c in configured):
                callbacks = [*callbacks, AdaFisherCallback()]
        return super()._instantiate_trainer(config, callbacks)


def run_cli(argv: list[str] | None = None) -> AdaFisherCLI:
    """Run the LightningCLI and return it (its ``trainer`` and ``model``), for Python callers."""
    missing = lightning_cli_missing_methods()
    if missing:
        import lightning

        raise RuntimeError(
            f"lightning-adafisher's CLI extends LightningCLI's {', '.join(missing)}, which this "
            f"Lightning ({lightning.__version__}) does not have with the expected parameters. "
            "Install a Lightning version this package supports (see pyproject.toml), or use your "
            "own LightningCLI with AdaFisherCallback in trainer.callbacks."
        )
    return AdaFisherCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``bench ...``, ``diagnostics ...`` or a LightningCLI subcommand."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["bench"]:
        from lightning_adafisher.bench import main as bench_main

        bench_main(args[1:])
        return
    if args[:1] == ["diagnostics"]:
        from lightning_adafisher.diagnostics.commands import main as diagnostics_main

        diagnostics_main(args[1:])
        return
    try:
        run_cli(argv)
    except FileNotFoundError as err:
        # Imported here, on the error path only: cli sits below tasks in the layering.
        from lightning_adafisher.tasks.data_common import DatasetNotFoundError

        if not isinstance(err, DatasetNotFoundError):
            raise
        # The message says what is missing and where it goes; a traceback would bury it.
        print(f"lightning-adafisher: {err}\n  On the command line, the data directory is "
              "--data.root DIR.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
