"""Shared helpers of the diagnostics: optional imports, figures, data, small models, JSON.

matplotlib, scipy and scikit-learn are the optional ``diagnostics`` extra; they are imported
inside functions so that importing any diagnostics module needs torch only.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "optional",
    "new_figure",
    "save_figure",
    "write_json",
    "iris_2d",
    "digits_tensors",
    "digits_cnn",
]

DPI = 100
"""Figures are saved at this resolution without tight cropping, so a ``figsize`` of
``(w, h)`` inches gives a PNG of exactly ``(w·DPI) × (h·DPI)`` pixels."""


def optional(name: str) -> ModuleType:
    """Import a module of the ``diagnostics`` extra, with an actionable message if missing."""
    try:
        return import_module(name)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"lightning_adafisher.diagnostics needs {name.split('.')[0]}: "
            "pip install 'lightning-adafisher[diagnostics]'"
        ) from err


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` not managed by pyplot (no global state, no backend switch)."""
    figure = optional("matplotlib.figure")
    return figure.Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(fig: Any, path: str | Path, colours: int | None = 256) -> Path:
    """Write ``fig`` as a PNG of exactly its ``figsize × DPI`` pixels; returns the path.

    With ``colours``, the image is stored with an adaptive palette of that many colours
    (Pillow, a matplotlib dependency): 3–4× smaller files, indistinguishable for plots.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if colours is None:
        fig.savefig(path, dpi=DPI, format="png")
        return path
    image = optional("PIL.Image")
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    buffer.seek(0)
    with image.open(buffer) as rgba:
        palette = rgba.convert("RGB").quantize(
            colors=colours, method=image.Quantize.MEDIANCUT, dither=image.Dither.NONE
        )
    palette.save(path, format="PNG", optimize=True)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # JSON has no inf/nan literal
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if callable(getattr(value, "tolist", None)):  # tensors, numpy arrays and scalars
        return _jsonable(value.tolist())
    return value


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``data`` as indented JSON (tensors as lists, non-finite floats as strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=1) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Data and models shipped with scikit-learn (offline, real)
# --------------------------------------------------------------------------------------------


def iris_2d(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Iris standardised per feature, then projected on its first two principal components."""
    datasets = optional("sklearn.datasets")
    decomposition = optional("sklearn.decomposition")
    preprocessing = optional("sklearn.preprocessing")
    iris = datasets.load_iris()
    standard = preprocessing.StandardScaler().fit_transform(iris.data)
    x = decomposition.PCA(n_components=2).fit_transform(standard)
    return torch.tensor(x, dtype=dtype), torch.tensor(iris.target, dtype=torch.long)


def digits_tensors(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8×8 digits as ``[N, 1, 8, 8]`` in [0, 1], shuffled and split 80/20."""
    datasets = optional("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(x))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def digits_with_adafisher(seed: int, lr: float) -> tuple[Tensor, Tensor, nn.Module, Any]:
    """Seeded digits training split, a fresh :func:`digits_cnn` and AdaFisher (paper variant)
    attached to it: the shared start of the diagnostics that train a network."""
    from lightning_adafisher.optim import AdaFisher

    torch.manual_seed(seed)
    x_train, y_train, _, _ = digits_tensors(seed)
    model = digits_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisher(model, lr=lr, variant="paper")
    return x_train, y_train, model, opt


def digits_cnn() -> nn.Sequential:
    """Two conv and two linear layers, no BatchNorm (per-sample gradients need none).

    The shape of the toy model of the paper's Figure 12 (2 conv + 2 linear), sized for 8×8.
    """
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )
