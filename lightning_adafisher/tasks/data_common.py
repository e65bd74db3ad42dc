"""What every DataModule here shares: the missing-data error and its one message format, and
the training loader that resumes mid-epoch exactly.

Nothing here imports torchvision or tokenizers, so the text and vision modules (and the CLI,
which turns the error into one short message) can both use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "DatasetNotFoundError",
    "ResumableDataLoader",
    "ResumableSampler",
    "not_found_error",
    "resumable_train_loader",
]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset (or tokenizer) is not on disk.

    The message names what is missing, where to download it and exactly where to put it. It is
    a ``FileNotFoundError``, so code that already handles missing files keeps working.
    """


def not_found_error(
    name: str, missing: Sequence[str | Path], download: str, put: str, alternative: str | None = None
) -> DatasetNotFoundError:
    """Builds the one message format every DataModule here uses for missing data.

    Args:
        name: human name of the dataset, e.g. ``"CIFAR-10"``.
        missing: what was looked for and not found, as absolute paths (a relative ``root``
            says little in a log from another working directory).
        download: where to get it (the official URL, with the file to fetch).
        put: where the files must end up, as a command or a path.
        alternative: a second way to provide it (e.g. the Hugging Face cache), if any.

    Returns:
        The error, for the caller to ``raise`` (so the traceback points at the caller).
    """
    lines = [f"{name} not found (nothing is downloaded automatically)."]
    lines += [f"  Missing: {p}" for p in missing]
    lines += [f"  Download: {download}", f"  Put it at: {put}"]
    if alternative:
        lines.append(f"  Or: {alternative}")
    return DatasetNotFoundError("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Training loader that resumes mid-epoch
# ---------------------------------------------------------------------------------------------


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose next epoch can start part-way through.

    The order of epoch ``e`` depends only on ``(seed, e)`` (``randperm`` seeded with ``seed + e``,
    then this rank's share, as ``DistributedSampler`` does), so a run resumed from any checkpoint
    sees the epochs in the same order as an uninterrupted one; Lightning calls :meth:`set_epoch`
    at every epoch start. ``start`` skips the first indices of the next epoch (this rank's), by
    index, without loading their data.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that Lightning checkpoints mid-epoch.

    Lightning's fit loop saves ``state_dict()`` of every training loader that has one in the
    checkpoint and, when it resumes mid-epoch, calls ``load_state_dict`` before it creates the
    iterator. The state is ``{"epoch": e, "batches": k}``: epoch ``e`` of the sampler, of which
    the training loop has taken ``k`` batches. Restored, the next iteration starts at batch
    ``k`` of epoch ``e``; the skipped batches are skipped by index, never loaded.

    The iterator is created lazily, at the first batch asked for: Lightning calls
    ``set_epoch`` after it calls ``iter()`` on a resumed run, and with worker processes the
    first indices are sent to the workers as soon as the real iterator exists.

    If Lightning rebuilds the loader with another sampler (``overfit_batches`` puts in a
    ``SequentialSampler``), it is a plain ``DataLoader`` with an empty state.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches = 0

    def _resumable(self) -> bool:
        return isinstance(self.sampler, ResumableSampler) and self.batch_size is not None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        start = self.sampler.start if self._resumable() else 0  # type: ignore[attr-defined]
        self._batches = start // (self.batch_size or 1)
        for batch in super().__iter__():
            self._batches += 1  # counted when handed out: a checkpoint now has it consumed
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the training loop stands: the sampler's epoch and the batches taken of it."""
        if not self._resumable():
            return {}
        return {"epoch": int(self.sampler.epoch), "batches": self._batches}  # type: ignore[attr-defined]

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue at batch ``state_dict["batches"]`` of epoch ``state_dict["epoch"]``."""
        if not state_dict or not self._resumable():
            return
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):  # saved after the epoch's last batch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        sampler.set_epoch(epoch)
        sampler.start = batches * self.batch_size  # type: ignore[operator]
        self._batches = batches


def resumable_train_loader(
    dataset: Dataset, batch_size: int, num_workers: int, seed: int, trainer: Any = None, **kwargs: Any,
) -> ResumableDataLoader:
    """A shuffled :class:`ResumableDataLoader`: this rank's share of a ``(seed, epoch)``-seeded
    permutation (``trainer.world_size`` ranks; one without a trainer), batches of ``batch_size``.

    Lightning does not replace its sampler under DDP (it is a ``DistributedSampler`` already).
    """
    num_replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
    return ResumableDataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        persistent_workers=num_workers > 0, **kwargs,
    )
