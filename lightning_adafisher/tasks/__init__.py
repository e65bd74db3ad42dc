"""LightningModules and DataModules that the recipes name (``lightning_adafisher.tasks.X``).

Imported lazily so that ``import lightning_adafisher.tasks`` stays cheap and a missing optional
dependency of one task (torchvision, tokenizers) does not break the others.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ImageClassifier": "classification",
    "CausalLM": "language_model",
    "GPT": "models",
    "DigitsCNN": "models",
    "build_image_model": "models",
    "CIFARDataModule": "data_vision",
    "ImageNetDataModule": "data_vision",
    "DigitsDataModule": "data_vision",
    "DatasetNotFoundError": "data_common",
    "TextDataModule": "data_text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"lightning_adafisher.tasks.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lightning_adafisher.tasks' has no attribute {name!r}")
