"""The ``lightning-adafisher`` console script: a LightningCLI plus ``bench``.

``lightning-adafisher fit --config recipe.yaml`` runs Lightning's CLI with any LightningModule
and DataModule (``class_path``/``init_args``). When the configured ``optimizer`` is AdaFisher or
AdaFisherW (``optimizer: {class_path: lightning_adafisher.AdaFisherW, init_args: {...}}``) and no
``AdaFisherCallback`` is configured, one is added, so the YAML needs nothing else.
``lightning-adafisher bench ...`` runs :mod:`lightning_adafisher.bench`.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

from lightning_adafisher.callbacks import AdaFisherCallback
from lightning_adafisher.optim import AdaFisher

__all__ = ["AdaFisherCLI", "main"]


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


class AdaFisherCLI(LightningCLI):
    """LightningCLI that adds ``AdaFisherCallback`` when an AdaFisher optimizer is configured."""

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        optimizer_cls = _configured_class(self._get(self.config_init, "optimizer"))
        if optimizer_cls is None:  # instantiated already in some LightningCLI versions
            value = self._get(self.config_init, "optimizer")
            optimizer_cls = value if isinstance(value, type) else None
        if isinstance(optimizer_cls, type) and issubclass(optimizer_cls, AdaFisher):
            configured = list(config.get("callbacks") or []) + list(callbacks)
            if not any(isinstance(c, AdaFisherCallback) for c in configured):
                callbacks = [*callbacks, AdaFisherCallback()]
        return super()._instantiate_trainer(config, callbacks)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["bench"]:
        from lightning_adafisher.bench import main as bench_main

        bench_main(args[1:])
        return
    AdaFisherCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=True,
    )


if __name__ == "__main__":
    main()
