"""Plain-PyTorch example: a small CNN on scikit-learn's handwritten digits (real data, offline).

    python examples/digits_demo.py [--optimizer adafisherw|adamw] [--epochs N]

trains on a fixed 80/20 split of the 1,797 8×8 digit images and prints the test accuracy and
the run time. Needs scikit-learn (``pip install scikit-learn``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_adafisher import AdaFisherW


def digits_tensors(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The digits as ``[N, 1, 8, 8]`` float tensors scaled to [0, 1], split 80/20."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("this example needs scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(x))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(inplace=True), nn.Linear(64, 10),
    )


def train(
    optimizer: str = "adafisherw", epochs: int = 10, batch_size: int = 64, seed: int = 0,
    lr: float | None = None, variant: str = "eigen", update_interval: int = 1,
) -> float:
    """Train the small CNN and return its test accuracy."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits_tensors(seed)
    model = small_cnn()
    if optimizer == "adafisherw":
        opt: torch.optim.Optimizer = AdaFisherW(
            model, lr=lr, weight_decay=5e-4, variant=variant, update_interval=update_interval
        )
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3 if lr is None else lr, weight_decay=5e-4)
    else:
        raise ValueError(f"Invalid optimizer: {optimizer!r} (expected 'adafisherw' or 'adamw')")
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train), generator=g).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a small CNN on the digits with AdaFisherW or AdamW.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--optimizer", default="adafisherw", choices=["adafisherw", "adamw"],
                        help="optimizer")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    parser.add_argument("--seed", type=int, default=0, help="split, initialisation and batch order")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    acc = train(args.optimizer, args.epochs, seed=args.seed)
    print(f"{args.optimizer}: test accuracy {acc:.4f} on digits after {args.epochs} epochs "
          f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
