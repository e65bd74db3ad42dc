"""What every DataModule here shares: the missing-data error and its one message format.

Nothing here imports torchvision or tokenizers, so the text and vision modules (and the CLI,
which turns the error into one short message) can both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["DatasetNotFoundError", "not_found_error"]


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
