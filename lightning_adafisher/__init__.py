"""AdaFisher (ICLR 2025) for PyTorch and Lightning.

Plain PyTorch needs only torch::

    from lightning_adafisher import AdaFisherW
    optimizer = AdaFisherW(model, lr=1e-3, weight_decay=5e-4)

The Lightning pieces (``AdaFisherCallback``, ``AdaFisherMixin``) are imported on first use so
that ``import lightning_adafisher`` never imports Lightning.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from lightning_adafisher.layers import LayerHelper, layer_helper_for, register_layer_helper
from lightning_adafisher.optim import AdaFisher, AdaFisherW

try:
    __version__ = version("lightning-adafisher")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AdaFisher",
    "AdaFisherW",
    "AdaFisherCallback",
    "AdaFisherMixin",
    "LayerHelper",
    "layer_helper_for",
    "register_layer_helper",
    "__version__",
]

_LAZY = {
    "AdaFisherCallback": "lightning_adafisher.callbacks",
    "AdaFisherMixin": "lightning_adafisher.module",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_adafisher' has no attribute {name!r}")
