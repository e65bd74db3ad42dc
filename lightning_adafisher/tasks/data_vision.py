"""Vision DataModules: CIFAR-10/100 and ImageNet from their usual on-disk layouts, and
scikit-learn's handwritten digits (real data that ships with the package, for offline runs).

Nothing here downloads. Each module checks its files in ``prepare_data`` and again in ``setup``
(which runs on every rank) and raises :class:`DatasetNotFoundError` — naming what to download,
from where, and the exact path it is expected at — before torchvision is called, so a missing
dataset is one readable message instead of a deep stack trace.

Training loaders are :class:`~lightning_adafisher.tasks.data_common.ResumableDataLoader`: epoch
``e``'s order is a function of ``(seed, e)`` and a Lightning checkpoint written mid-epoch resumes
at the next batch (random augmentations draw from torch's global RNG, which is not checkpointed).

Image batches are ``(images, labels)`` with ``images`` float32 ``[B, C, H, W]`` (normalised with
the dataset's per-channel mean and std) and ``labels`` int64 ``[B]`` in ``[0, num_classes)``.
torchvision is imported on first use, so the digits module works without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typing_extensions import override

from lightning_adafisher.tasks.data_common import (
    DatasetNotFoundError, not_found_error, resumable_train_loader,
)

__all__ = [
    "CIFARDataModule",
    "Cutout",
    "DatasetNotFoundError",  # re-exported from data_common (its old home)
    "DigitsDataModule",
    "ImageNetDataModule",
    "apply_cutout",
]


def _require_torchvision(what: str) -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{what} needs torchvision: pip install 'lightning-adafisher[recipes]'") from err


def _loader(
    dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int | None,
    trainer: Any = None,
) -> DataLoader:
    if shuffle:
        # The training loader: epoch e's order is a function of (seed, e) alone, and Lightning
        # checkpoints where in the epoch it stands, so fit(ckpt_path=...) continues exactly.
        return resumable_train_loader(dataset, batch_size, num_workers, seed if seed is not None else 0,
                                      trainer, pin_memory=torch.cuda.is_available())
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        # Re-forking workers every epoch costs seconds on ImageNet-sized folders.
        persistent_workers=num_workers > 0,
    )


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ValueError(f"Invalid {key}: {value} (expected a positive integer)")


def _split_indices(n: int, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """A seeded permutation of ``range(n)`` cut into ``len(fractions) + 1`` parts; part ``i + 1``
    holds ``round(fractions[i] * n)`` indices and part 0 (training) the rest."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [round(f * n) for f in fractions]
    parts, start = [], n - sum(sizes)
    parts.append(perm[:start])
    for size in sizes:
        parts.append(perm[start:start + size])
        start += size
    return parts


# ---------------------------------------------------------------------------------------------
# Cutout
# ---------------------------------------------------------------------------------------------


def apply_cutout(image: torch.Tensor, center_y: int, center_x: int, size: int) -> torch.Tensor:
    """Zeroes the ``size`` x ``size`` square centred at ``(center_y, center_x)``, clipped at the
    borders (DeVries & Taylor, 2017), in place.

    The square spans rows ``[center_y - size // 2, center_y - size // 2 + size)`` intersected with
    ``[0, H)`` (columns likewise), so an even ``size`` is centred the way the original code does.

    Args:
        image: ``[..., H, W]`` tensor (channels, if any, in front).
        center_y: row of the centre, in ``[0, H)``.
        center_x: column of the centre, in ``[0, W)``.
        size: side of the square in pixels.

    Returns:
        ``image``, modified in place.
    """
    height, width = image.shape[-2:]
    top, left = center_y - size // 2, center_x - size // 2
    y0, y1 = max(top, 0), min(top + size, height)
    x0, x1 = max(left, 0), min(left + size, width)
    image[..., y0:y1, x0:x1] = 0
    return image


class Cutout:
    """Transform: zero one ``size`` x ``size`` square at a uniformly random centre, clipped at
    the borders. Apply it to the normalised tensor (as the Cutout paper does), so the hole is the
    dataset's mean colour.

    The centre is drawn from torch's global RNG, which Lightning seeds per DataLoader worker, so
    runs are reproducible under ``seed_everything``.

    Args:
        size: side of the square in pixels (0 disables it).
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"Invalid cutout size: {size}")
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return image
        height, width = image.shape[-2:]
        center_y = int(torch.randint(height, ()).item())
        center_x = int(torch.randint(width, ()).item())
        return apply_cutout(image.clone(), center_y, center_x, self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class _CIFARImages(Dataset):
    """``images[indices[i]]`` as a PIL image through ``transform``, with its label.

    Holds the arrays torchvision parsed rather than the torchvision dataset itself: the
    presence-checked dataset class is created at run time and could not be pickled to
    DataLoader workers under the ``spawn``/``forkserver`` start methods. Sharing the arrays also
    lets a train/validation split use two transforms without loading the images twice.
    """

    def __init__(
        self, images: Any, labels: Sequence[int], indices: torch.Tensor | None, transform: Callable[[Any], Any]
    ) -> None:
        self.images = images  # uint8 [N, 32, 32, 3]
        self.labels = labels
        self.indices = indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images) if self.indices is None else len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        if self.indices is not None:
            index = int(self.indices[index])
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ---------------------------------------------------------------------------------------------

# Per-channel statistics of the training images (pixels in [0, 1]). Often quoted CIFAR-10 stds of
# (0.2023, 0.1994, 0.2010) are the std of per-image means, not of pixels; these are the pixel ones.
_CIFAR = {
    "cifar10": dict(
        name="CIFAR-10",
        folder="cifar-10-batches-py",
        files=["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
               "test_batch", "batches.meta"],
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": dict(
        name="CIFAR-100",
        folder="cifar-100-python",
        files=["train", "test", "meta"],
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def _cifar_dataset_class(dataset: str, verify_checksums: bool) -> type:
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if dataset == "cifar10" else CIFAR100
    if verify_checksums:
        return base

    # torchvision md5-checks the whole ~170 MB on every construction (seconds per run, per
    # rank) and rejects anything but the exact official files. With the md5s set to None its
    # ``check_integrity`` only checks that the files exist; parsing is still torchvision's.
    class _PresenceChecked(base):  # type: ignore[valid-type, misc]
        train_list = [[name, None] for name, _ in base.train_list]
        test_list = [[name, None] for name, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    _PresenceChecked.__name__ = base.__name__
    return _PresenceChecked


class _SplitDataModule(LightningDataModule):
    """Loaders over the ``train_set``/``val_set``/``test_set`` a subclass builds in ``setup``
    (shuffled training order seeded by ``seed``)."""

    batch_size: int
    num_workers: int
    seed: int
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset

    @override
    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_set, self.batch_size, self.num_workers, shuffle=True, seed=self.seed,
                       trainer=self.trainer)

    @override
    def val_dataloader(self) -> DataLoader:
        return _loader(self.val_set, self.batch_size, self.num_workers, shuffle=False, seed=None)

    @override
    def test_dataloader(self) -> DataLoader:
        return _loader(self.test_set, self.batch_size, self.num_workers, shuffle=False, seed=None)


class CIFARDataModule(_SplitDataModule):
    """CIFAR-10 or CIFAR-100 in torchvision's on-disk format (the "python version" archives).

    Expects ``root/cifar-10-batches-py/`` (``data_batch_1`` … ``data_batch_5``, ``test_batch``,
    ``batches.meta``) or ``root/cifar-100-python/`` (``train``, ``test``, ``meta``) — what the
    official tarballs unpack to. Training transform: ``RandomCrop(32, padding=4)``,
    ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` (dataset mean/std), then optionally
    :class:`Cutout`. Evaluation transform: ``ToTensor``, ``Normalize``.

    A model reads :attr:`num_classes` (10 or 100; available right after construction).

    Args:
        root: directory that contains the extracted dataset folder.
        dataset: ``"cifar10"`` or ``"cifar100"``.
        batch_size: samples per batch, for every loader.
        num_workers: DataLoader worker processes.
        cutout: add :class:`Cutout` to the training transform.
        cutout_size: side of the Cutout square in pixels (16 for CIFAR-10, 8 for CIFAR-100 in
            the Cutout paper).
        val_fraction: ``0`` — the validation loader is the test set (the paper reports test
            accuracy); ``> 0`` — this fraction of the training set, split off with ``seed`` and
            evaluated with the evaluation transform.
        seed: seeds the train/validation split and the training shuffle order.
        verify_checksums: md5-check the files like torchvision does (slow; off by default, when
            only the files' presence is checked).
    """

    def __init__(
        self,
        root: str = "data/cifar",
        dataset: str = "cifar10",
        batch_size: int = 128,
        num_workers: int = 4,
        cutout: bool = False,
        cutout_size: int = 16,
        val_fraction: float = 0.0,
        seed: int = 0,
        verify_checksums: bool = False,
    ) -> None:
        super().__init__()
        key = dataset.lower().replace("-", "").replace("_", "")
        if key not in _CIFAR:
            raise ValueError(f"Unknown dataset: {dataset!r} (valid: {', '.join(map(repr, _CIFAR))})")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"Invalid val_fraction: {val_fraction} (expected 0 <= val_fraction < 1)")
        _check_positive(batch_size=batch_size)
        if cutout and cutout_size <= 0:
            raise ValueError(f"Invalid cutout_size: {cutout_size}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.dataset = key
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cutout = cutout
        self.cutout_size = cutout_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.verify_checksums = verify_checksums
        self._info = _CIFAR[key]
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes: 10 for CIFAR-10, 100 for CIFAR-100."""
        return int(self._info["num_classes"])

    @property
    def data_dir(self) -> Path:
        """The dataset folder itself, e.g. ``root/cifar-10-batches-py``."""
        return self.root / str(self._info["folder"])

    def check_files(self) -> None:
        """Raises :class:`DatasetNotFoundError` unless every file of the dataset is present."""
        files = list(self._info["files"])
        if not self.data_dir.is_dir():
            missing = [f"{self.data_dir.absolute()}/ (with {', '.join(files)})"]
        else:
            missing = [str(self.data_dir.absolute() / f) for f in files if not (self.data_dir / f).is_file()]
        if missing:
            archive = str(self._info["url"]).rsplit("/", 1)[-1]
            root = self.root.absolute()
            raise not_found_error(
                str(self._info["name"]),
                missing,
                download=str(self._info["url"]),
                put=(f"extract it into {root} so that {self.data_dir.absolute()}/ exists, e.g. "
                     f"`mkdir -p {root} && tar -xzf {archive} -C {root}` "
                     f"(or set root= to the directory that holds {self._info['folder']}/)"),
            )

    def train_transform(self) -> Callable[[Any], torch.Tensor]:
        """RandomCrop(32, padding=4) + flip + ToTensor + Normalize (+ Cutout)."""
        _require_torchvision("CIFARDataModule")
        from torchvision import transforms as T

        steps: list[Callable[[Any], Any]] = [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(self._info["mean"], self._info["std"]),
        ]
        if self.cutout:
            steps.append(Cutout(self.cutout_size))
        return T.Compose(steps)

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        """ToTensor + Normalize (deterministic)."""
        _require_torchvision("CIFARDataModule")
        from torchvision import transforms as T

        return T.Compose([T.ToTensor(), T.Normalize(self._info["mean"], self._info["std"])])

    @override
    def prepare_data(self) -> None:
        self.check_files()

    @override
    def setup(self, stage: str | None = None) -> None:
        self.check_files()
        _require_torchvision("CIFARDataModule")
        cls = _cifar_dataset_class(self.dataset, self.verify_checksums)
        # Load only the splits the stage needs: the training pickles alone are ~150 MB.
        held_out = self.val_fraction > 0
        need_train = stage in (None, "fit") or (stage == "validate" and held_out)
        need_test = stage in (None, "test", "predict") or not held_out
        if need_test and self.test_set is None:
            test = cls(str(self.root), train=False, download=False)
            self.test_set = _CIFARImages(test.data, test.targets, None, self.eval_transform())
        if need_train and self.train_set is None:
            train = cls(str(self.root), train=True, download=False)
            if held_out:
                train_idx, val_idx = _split_indices(len(train.data), [self.val_fraction], self.seed)
                self.train_set = _CIFARImages(train.data, train.targets, train_idx, self.train_transform())
                self.val_set = _CIFARImages(train.data, train.targets, val_idx, self.eval_transform())
            else:
                self.train_set = _CIFARImages(train.data, train.targets, None, self.train_transform())
        if not held_out:
            self.val_set = self.test_set



# ---------------------------------------------------------------------------------------------
# ImageNet
# ---------------------------------------------------------------------------------------------

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGENET_URL = (
    "https://image-net.org/challenges/LSVRC/2012/2012-downloads.php "
    "(ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; free registration required)"
)
_VALPREP_URL = "https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh"


def _class_folders(directory: Path) -> list[str]:
    # Same rule as torchvision's ``find_classes``: every sub-directory, sorted by name.
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


class ImageNetDataModule(LightningDataModule):
    """ImageNet (ILSVRC-2012) as two ``ImageFolder`` trees: ``root/train/<class>/*`` and
    ``root/val/<class>/*``.

    Training transform: ``RandomResizedCrop(image_size)``, ``RandomHorizontalFlip``, ``ToTensor``,
    ``Normalize``; validation: ``Resize(resize_size)``, ``CenterCrop(image_size)``, ``ToTensor``,
    ``Normalize``. The labelled test set is not public, so the validation set doubles as the
    test set. Any dataset in the same layout works. The training order of epoch ``e`` is
    ``randperm`` seeded with ``e`` (the same for every run, like ``DistributedSampler``'s default).

    A model reads :attr:`num_classes` (the number of class folders in ``root/train``; available
    right after construction once the data is on disk).

    Args:
        root: directory holding ``train/`` and ``val/``.
        batch_size: samples per batch, for every loader.
        num_workers: DataLoader worker processes (JPEG decoding is the bottleneck).
        image_size: side of the square crops fed to the model.
        resize_size: shorter side after resizing, before the validation centre crop.
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        resize_size: int = 256,
    ) -> None:
        super().__init__()
        _check_positive(batch_size=batch_size, image_size=image_size, resize_size=resize_size)
        if resize_size < image_size:
            raise ValueError(f"Invalid resize_size: {resize_size} (must be >= image_size={image_size})")
        self.save_hyperparameters()
        self.root = Path(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.resize_size = resize_size
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._num_classes: int | None = None

    @property
    def num_classes(self) -> int:
        """Number of class folders in ``root/train`` (1000 for ImageNet)."""
        if self._num_classes is None:
            self.check_files()
            self._num_classes = len(_class_folders(self.root / "train"))
        return self._num_classes

    def check_files(self) -> None:
        """Raises :class:`DatasetNotFoundError` unless ``train/`` and ``val/`` hold class folders,
        and ``ValueError`` if the two splits' class folders differ (labels would not match)."""
        missing = [self.root / split for split in ("train", "val")
                   if not (self.root / split).is_dir() or not _class_folders(self.root / split)]
        if missing:
            root = self.root.absolute()
            raise not_found_error(
                "ImageNet (ILSVRC-2012)",
                [f"{p.absolute()}/<class folder>/" for p in missing],
                download=_IMAGENET_URL,
                put=(f"extract the training images to {root}/train/<wnid>/*.JPEG (one folder per class) "
                     f"and the validation images to {root}/val/<wnid>/*.JPEG (sort them into class "
                     f"folders, e.g. with {_VALPREP_URL}), or set root= to such a directory"),
            )
        train_classes = _class_folders(self.root / "train")
        val_classes = _class_folders(self.root / "val")
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))[:5]
            only_val = sorted(set(val_classes) - set(train_classes))[:5]
            raise ValueError(
                f"ImageNet class folders differ between {self.root / 'train'} and {self.root / 'val'} "
                f"({len(train_classes)} vs {len(val_classes)}; only in train: {only_train}, only in "
                f"val: {only_val}); ImageFolder would assign mismatched labels"
            )

    def train_transform(self) -> Callable[[Any], torch.Tensor]:
        """RandomResizedCrop(image_size) + flip + ToTensor + Normalize."""
        _require_torchvision("ImageNetDataModule")
        from torchvision import transforms as T

        return T.Compose([
            T.RandomResizedCrop(self.image_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
        ])

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        """Resize(resize_size) + CenterCrop(image_size) + ToTensor + Normalize."""
        _require_torchvision("ImageNetDataModule")
        from torchvision import transforms as T

        return T.Compose([
            T.Resize(self.resize_size),
            T.CenterCrop(self.image_size),
            T.ToTensor(),
            T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
        ])

    @override
    def prepare_data(self) -> None:
        self.check_files()

    @override
    def setup(self, stage: str | None = None) -> None:
        self.check_files()
        _require_torchvision("ImageNetDataModule")
        from torchvision.datasets import ImageFolder

        if stage in ("fit", None) and self.train_set is None:
            self.train_set = ImageFolder(str(self.root / "train"), transform=self.train_transform())
        if self.val_set is None:
            self.val_set = ImageFolder(str(self.root / "val"), transform=self.eval_transform())

    @override
    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_set, self.batch_size, self.num_workers, shuffle=True, seed=0,
                       trainer=self.trainer)

    @override
    def val_dataloader(self) -> DataLoader:
        return _loader(self.val_set, self.batch_size, self.num_workers, shuffle=False, seed=None)

    @override
    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ---------------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------------


class DigitsDataModule(_SplitDataModule):
    """scikit-learn's handwritten digits: 1,797 real 8x8 grey images of 0–9, shipped with
    scikit-learn, so it runs offline in seconds (the quickstart recipe's data).

    Images are float32 ``[B, 1, 8, 8]`` scaled to ``[0, 1]`` (pixel values / 16); labels int64.
    The split is a seeded permutation: ``test_fraction`` for test, ``val_fraction`` for
    validation, the rest for training. With ``val_fraction=0`` the validation loader is the test
    set (like :class:`CIFARDataModule`).

    A model reads :attr:`num_classes` (10).

    Args:
        batch_size: samples per batch, for every loader.
        val_fraction: fraction of all samples held out for validation.
        test_fraction: fraction of all samples held out for test (> 0).
        seed: seeds the split and the training shuffle order.
        num_workers: DataLoader worker processes (0: the data is tiny and in memory).
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_positive(batch_size=batch_size)
        if not (0.0 <= val_fraction and 0.0 < test_fraction and val_fraction + test_fraction < 1.0):
            raise ValueError(
                f"Invalid val_fraction/test_fraction: {val_fraction}/{test_fraction} "
                "(expected 0 <= val_fraction, 0 < test_fraction, val_fraction + test_fraction < 1)"
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("DigitsDataModule needs scikit-learn: pip install scikit-learn") from err
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        train_idx, val_idx, test_idx = _split_indices(
            len(images), [self.val_fraction, self.test_fraction], self.seed
        )
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.test_set = TensorDataset(images[test_idx], labels[test_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx]) if len(val_idx) else self.test_set

