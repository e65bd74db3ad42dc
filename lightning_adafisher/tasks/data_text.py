"""Language-modelling DataModule: WikiText-2 and Penn Treebank as fixed-length token windows.

Where the text comes from, in order:

1. local files in their usual layout under ``root`` —
   WikiText-2: ``wikitext-2-raw/wiki.{train,valid,test}.raw`` (or the tokenised
   ``wikitext-2/wiki.{train,valid,test}.tokens``); PTB: ``ptb/ptb.{train,valid,test}.txt`` (or
   ``simple-examples/data/ptb.{train,valid,test}.txt``, as Mikolov's archive unpacks);
2. the optional Hugging Face ``datasets`` package, from its local cache only (offline);
3. otherwise :class:`DatasetNotFoundError`, naming both ways to provide the data.

With ``hf_data_files`` (a path pattern with ``{split}``, e.g. the Hub's parquet files of
``Salesforce/wikitext``: ``.../wikitext-2-raw-v1/{split}-00000-of-00001.parquet``), the splits are
read from those local files through ``datasets.load_dataset`` instead (parquet, text, json, csv or
arrow, told by the extension; ``{split}`` is ``train``, ``validation``, ``test``).

Tokenizer: the one at ``tokenizer_path`` (e.g. GPT-1's ``vocab.json`` + ``merges.txt``), or a
byte-level BPE trained with ``tokenizers`` on the training split only. Trained tokenizers and
encoded splits are cached under ``cache_dir`` so later runs (and other ranks) only load them.

Each split's ids are concatenated into one stream and cut into non-overlapping windows of
``context_length + 1`` tokens; item ``i`` is ``(inputs, targets)``, two int64 ``[T]`` tensors with
``targets[t] == inputs[t + 1]`` for ``t < T - 1`` (the next token of the stream).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_adafisher.tasks.data_common import (
    DatasetNotFoundError, not_found_error, resumable_train_loader,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "DatasetNotFoundError",  # re-exported: the one error type of both data modules
    "TextDataModule",
    "TokenWindows",
    "load_tokenizer",
    "train_bpe",
]

SPLITS = ("train", "valid", "test")
_HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}

_GPT1_URL = (
    "https://huggingface.co/openai-community/openai-gpt/tree/main "
    "(vocab.json and merges.txt, or tokenizer.json)"
)

# Each layout: (tag used in cache names, folder under root, file name pattern).
_TEXT: dict[str, dict[str, Any]] = {
    "wikitext2": dict(
        name="WikiText-2",
        layouts=[
            ("raw", "wikitext-2-raw", "wiki.{split}.raw"),
            ("tokens", "wikitext-2", "wiki.{split}.tokens"),
        ],
        url="https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
        unpack="`unzip wikitext-2-raw-v1.zip -d {root}`",
        hf=("wikitext", "wikitext-2-raw-v1"),
        hf_files=("https://huggingface.co/datasets/Salesforce/wikitext/tree/main/wikitext-2-raw-v1 "
                  "({split}-00000-of-00001.parquet)"),
    ),
    "ptb": dict(
        name="Penn Treebank (Mikolov's PTB)",
        layouts=[
            ("ptb", "ptb", "ptb.{split}.txt"),
            ("simple-examples", "simple-examples/data", "ptb.{split}.txt"),
        ],
        url="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
        unpack="`tar -xzf simple-examples.tgz -C {root}`",
        hf=("ptb_text_only", None),
        hf_files="https://huggingface.co/datasets/ptb_text_only (the parquet file of each split)",
    ),
}


def _fingerprint(*parts: str) -> str:
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def _atomic_write(path: Path, write: Any) -> None:
    # Several ranks may build the same cache entry at once: each writes its own temporary file
    # and renames it into place, so a reader never sees a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _require_tokenizers() -> None:
    try:
        import tokenizers  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "TextDataModule needs tokenizers: pip install 'lightning-adafisher[recipes]'"
        ) from err


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def train_bpe(lines: Iterator[str] | list[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE (GPT-2's scheme): no unknown tokens, exact round trips.

    Args:
        lines: the training text, e.g. a file's lines.
        vocab_size: target vocabulary size, including the 256 byte symbols. Small corpora can
            stop short of it; read ``get_vocab_size()`` of the result.

    Returns:
        The trained ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def _bpe_from_vocab_merges(vocab_path: Path, merges_path: Path) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    if any(token.endswith("</w>") for token in vocab):
        # GPT-1 ("openai-gpt"): character BPE with an end-of-word suffix, lower-cased, BERT-style
        # cleaning and splitting — the same pipeline transformers builds for OpenAIGPTTokenizerFast.
        tokenizer = Tokenizer(models.BPE.from_file(
            str(vocab_path), str(merges_path), unk_token="<unk>", end_of_word_suffix="</w>"
        ))
        if tokenizer.token_to_id("<unk>") is not None:
            tokenizer.add_special_tokens(["<unk>"])
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    else:
        # No end-of-word suffix: a byte-level vocabulary (GPT-2 and its descendants).
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads a BPE tokenizer from local files.

    Args:
        path: a ``tokenizer.json`` file, or a directory holding ``tokenizer.json`` or
            ``vocab.json`` + ``merges.txt`` (GPT-1 character BPE with ``</w>`` suffixes, or a
            byte-level GPT-2-style vocabulary; told apart by the suffixes).

    Returns:
        A ``tokenizers.Tokenizer``.

    Raises:
        DatasetNotFoundError: nothing usable at ``path``; the message says what to download.
    """
    _require_tokenizers()
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        return Tokenizer.from_file(str(p))
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(p / "tokenizer.json"))
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return _bpe_from_vocab_merges(p / "vocab.json", p / "merges.txt")
        missing = [p.absolute() / "vocab.json", p.absolute() / "merges.txt"]
    else:
        missing = [p.absolute()]
    raise not_found_error(
        f"Tokenizer at tokenizer_path={str(path)!r}",
        missing,
        download=f"GPT-1's BPE: {_GPT1_URL}",
        put=(f"a directory holding vocab.json + merges.txt (or tokenizer.json), passed as "
             f"tokenizer_path (looked at {p.absolute()}); or leave tokenizer_path unset to train a "
             f"BPE on the training split"),
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (optional, offline)
# ---------------------------------------------------------------------------------------------


@contextmanager
def _hf_offline(datasets_module: Any) -> Iterator[None]:
    """Forces ``datasets`` (and ``huggingface_hub``) offline for the duration, then restores.

    Their offline switches are read from the environment at import time, so setting the
    environment now would be too late (or, before the import, would leak into the rest of the
    process); flipping the module-level flags is scoped to this call.
    """
    modules = [getattr(datasets_module, "config", None)]
    try:
        from huggingface_hub import constants

        modules.append(constants)
    except ImportError:
        pass
    saved = []
    for module in modules:
        for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if module is not None and hasattr(module, flag):
                saved.append((module, flag, getattr(module, flag)))
                setattr(module, flag, True)
    try:
        yield
    finally:
        for module, flag, value in saved:
            setattr(module, flag, value)


def _rows_to_texts(loaded: Any) -> dict[str, str]:
    texts = {}
    for split in SPLITS:
        rows = loaded[_HF_SPLITS[split]]
        column = "text" if "text" in rows.column_names else "sentence"
        # WikiText rows keep their newline, PTB sentences and the text builder's lines do not:
        # end every row with one.
        texts[split] = "".join(r if r.endswith("\n") else r + "\n" for r in rows[column])
    return texts


def _texts_from_hf_cache(path: str, config: str | None) -> tuple[dict[str, str] | None, str]:
    """Returns ``(texts, "")`` from the local Hugging Face cache, or ``(None, why not)``."""
    try:
        import datasets
    except ImportError:
        return None, "the optional `datasets` package is not installed"
    try:
        with _hf_offline(datasets):
            loaded = datasets.load_dataset(path, config)
        return _rows_to_texts(loaded), ""
    except Exception as err:  # noqa: BLE001 - any failure means "not in the cache"; we report it
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        return None, f"`datasets` could not load it offline ({type(err).__name__}: {first_line})"


_HF_BUILDERS = {".parquet": "parquet", ".txt": "text", ".raw": "text", ".tokens": "text",
                ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def _texts_from_hf_files(pattern: str, name: str, download: str, cache_dir: Path) -> dict[str, str]:
    """Each split's text from the local files ``pattern.format(split=...)`` through
    ``datasets.load_dataset(<builder>, data_files=...)`` (offline; its Arrow cache under
    ``cache_dir``)."""
    if "{split}" not in pattern:
        raise ValueError(f"Invalid hf_data_files: {pattern!r} (expected a path with {{split}} in it)")
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "hf_data_files needs the optional `datasets` package: pip install 'lightning-adafisher[recipes]'"
        ) from err
    files = {_HF_SPLITS[split]: Path(pattern.format(split=_HF_SPLITS[split])) for split in SPLITS}
    missing = [f.absolute() for f in files.values() if not f.is_file()]
    if missing:
        raise not_found_error(
            name, missing, download=download.format(split="{train,validation,test}"),
            put=f"the three files at hf_data_files={pattern!r} ({{split}}: train, validation, test)",
        )
    suffix = files["train"].suffix
    if suffix not in _HF_BUILDERS:
        raise ValueError(
            f"Invalid hf_data_files: {pattern!r} (unknown extension {suffix!r}; "
            f"valid: {', '.join(_HF_BUILDERS)})"
        )
    with _hf_offline(datasets):
        loaded = datasets.load_dataset(
            _HF_BUILDERS[suffix], data_files={k: str(v) for k, v in files.items()},
            cache_dir=str(cache_dir / "hf"),
        )
    return _rows_to_texts(loaded)


# ---------------------------------------------------------------------------------------------
# Dataset and DataModule
# ---------------------------------------------------------------------------------------------


class TokenWindows(Dataset):
    """Non-overlapping windows of ``context_length + 1`` tokens of one id stream.

    Item ``i`` is ``(ids[s : s + T], ids[s + 1 : s + T + 1])`` with ``s = i * (T + 1)``; the tail
    shorter than a window is dropped.

    Args:
        ids: int64 ``[N]`` token ids of a whole split.
        context_length: ``T``, the model's input length.
    """

    def __init__(self, ids: torch.Tensor, context_length: int) -> None:
        self.ids = ids
        self.context_length = context_length
        self.num_windows = len(ids) // (context_length + 1)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_windows:
            raise IndexError(index)
        start = index * (self.context_length + 1)
        window = self.ids[start:start + self.context_length + 1]
        return window[:-1], window[1:]


class TextDataModule(LightningDataModule):
    """WikiText-2 or Penn Treebank as ``(inputs, targets)`` windows of BPE tokens.

    See the module docstring for where the text is looked for. Batches are two int64
    ``[B, context_length]`` tensors; ``targets`` is ``inputs`` shifted left by one token. The
    training loader shuffles windows (epoch ``e``'s order a function of ``(seed, e)``) and resumes
    mid-epoch exactly from a Lightning checkpoint (a
    :class:`~lightning_adafisher.tasks.data_common.ResumableDataLoader`); validation and test
    keep stream order.

    A model reads :attr:`vocab_size` for its embedding and output sizes: the real size of the
    tokenizer (every id is below it), which can be smaller than the requested ``bpe_vocab_size``
    argument when the training text is small, or anything when ``tokenizer_path`` is given. It
    is available right after construction — reading it loads (or trains and caches) the
    tokenizer — so LightningCLI can link ``data.vocab_size`` to the model with
    ``apply_on="instantiate"``. The requested size stays in ``hparams.bpe_vocab_size`` (a
    different name from the model's ``vocab_size``, so Lightning's hparams merge never clashes).

    Caches (under ``cache_dir``): the trained tokenizer as
    ``{dataset}-{layout}-bpe{vocab_size}-{hash of the training text}.json`` and each encoded split
    as ``{dataset}-{layout}-{split}-{hash of tokenizer and text}.pt``; a changed text or
    tokenizer gets a new entry, and deleting the folder is always safe.

    Args:
        dataset: ``"wikitext2"`` or ``"ptb"``.
        root: directory holding the dataset folder(s) described above.
        tokenizer_path: a pretrained tokenizer (e.g. GPT-1's) to use instead of training one:
            a ``tokenizer.json`` or a directory with ``tokenizer.json`` or
            ``vocab.json`` + ``merges.txt``.
        context_length: tokens per input window (``T``).
        batch_size: windows per batch, for every loader.
        bpe_vocab_size: target size of the trained byte-level BPE (ignored with ``tokenizer_path``).
        cache_dir: where tokenizers and encoded splits are cached (default ``root/.cache``).
        num_workers: DataLoader worker processes (0 is enough: items are tensor slices).
        seed: seeds the training shuffle order.
        hf_data_files: read the splits with Hugging Face ``datasets`` from these local files
            instead: a path with ``{split}`` (``train``, ``validation``, ``test``), e.g. the Hub's
            ``.../wikitext-2-raw-v1/{split}-00000-of-00001.parquet``; parquet, text, json, csv
            or arrow by extension. ``root`` is then not read.
    """

    def __init__(
        self,
        dataset: str = "wikitext2",
        root: str = "data/text",
        tokenizer_path: str | None = None,
        context_length: int = 256,
        batch_size: int = 32,
        bpe_vocab_size: int = 8000,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        hf_data_files: str | None = None,
    ) -> None:
        super().__init__()
        key = dataset.lower().replace("-", "").replace("_", "")
        if key not in _TEXT:
            raise ValueError(f"Unknown dataset: {dataset!r} (valid: {', '.join(map(repr, _TEXT))})")
        for name, value in (("context_length", context_length), ("batch_size", batch_size),
                            ("bpe_vocab_size", bpe_vocab_size)):
            if value <= 0:
                raise ValueError(f"Invalid {name}: {value} (expected a positive integer)")
        self.save_hyperparameters()
        self.dataset = key
        self.root = Path(root)
        self.tokenizer_path = tokenizer_path
        self.context_length = context_length
        self.batch_size = batch_size
        self.requested_vocab_size = bpe_vocab_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / ".cache"
        self.num_workers = num_workers
        self.seed = seed
        self.hf_data_files = hf_data_files
        self._info = _TEXT[key]
        self._texts: dict[str, str] | None = None
        self._layout = ""
        self._tokenizer: Tokenizer | None = None
        self.tokenizer_cache_file: Path | None = None
        self.datasets: dict[str, TokenWindows] = {}

    # -- where the text comes from -----------------------------------------------------------

    def _local_texts(self) -> tuple[str, dict[str, str]] | None:
        for tag, folder, pattern in self._info["layouts"]:
            paths = {split: self.root / folder / pattern.format(split=split) for split in SPLITS}
            if all(p.is_file() for p in paths.values()):
                return tag, {split: p.read_text(encoding="utf-8") for split, p in paths.items()}
        return None

    def texts(self) -> dict[str, str]:
        """The raw text of each split (``"train"``, ``"valid"``, ``"test"``).

        Raises:
            DatasetNotFoundError: neither the local files nor the offline Hugging Face cache
                have it (or a file of ``hf_data_files`` is missing); the message names the URL,
                the expected paths and the ``datasets`` alternative.
        """
        if self._texts is not None:
            return self._texts
        if self.hf_data_files is not None:
            self._texts = _texts_from_hf_files(self.hf_data_files, str(self._info["name"]),
                                               str(self._info["hf_files"]), self.cache_dir)
            self._layout = "hf"
            return self._texts
        local = self._local_texts()
        if local is not None:
            self._layout, self._texts = local
            return self._texts
        hf_path, hf_config = self._info["hf"]
        hf_texts, why_not = _texts_from_hf_cache(hf_path, hf_config)
        if hf_texts is not None:
            self._layout, self._texts = "hf", hf_texts
            return self._texts
        root = self.root.absolute()
        _, first_folder, first_pattern = self._info["layouts"][0]
        expected = [root / folder / pattern.format(split="train")
                    for _, folder, pattern in self._info["layouts"]]
        hf_call = f"datasets.load_dataset({hf_path!r}" + (f", {hf_config!r})" if hf_config else ")")
        raise not_found_error(
            str(self._info["name"]),
            expected,
            download=str(self._info["url"]),
            put=(f"{self._info['unpack'].format(root=root)}, or place the three split files so that "
                 f"{root / first_folder / first_pattern.format(split='{train,valid,test}')} exist "
                 f"(or set root=)"),
            alternative=(f"with the optional `datasets` package, run {hf_call} once on a machine with "
                         f"internet so it is in the local Hugging Face cache ({why_not}); or download "
                         f"{self._info['hf_files'].format(split='{split}')} and pass hf_data_files= "
                         "their path with {split} for train/validation/test"),
        )

    # -- tokenizer ---------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        """The ``tokenizers.Tokenizer`` in use (loaded, or trained and cached, on first use)."""
        if self._tokenizer is None:
            self._tokenizer = self._load_or_train_tokenizer()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """What a model must size its embedding and output layer to: one more than the largest
        token id the tokenizer can produce."""
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def _load_or_train_tokenizer(self) -> Tokenizer:
        _require_tokenizers()
        if self.tokenizer_path is not None:
            return load_tokenizer(self.tokenizer_path)
        from tokenizers import Tokenizer

        train_text = self.texts()["train"]
        name = f"{self.dataset}-{self._layout}-bpe{self.requested_vocab_size}-{_fingerprint(train_text)}.json"
        self.tokenizer_cache_file = self.cache_dir / name
        if self.tokenizer_cache_file.is_file():
            return Tokenizer.from_file(str(self.tokenizer_cache_file))
        # The training split only: fitting merges on validation/test text would leak them.
        tokenizer = train_bpe(train_text.splitlines(keepends=True), self.requested_vocab_size)
        _atomic_write(self.tokenizer_cache_file, lambda tmp: tokenizer.save(str(tmp)))
        return tokenizer

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, text: str) -> torch.Tensor:
        """Encodes a whole text to an int64 id stream (no special tokens added)."""
        lines = text.splitlines(keepends=True)
        # Chunks of lines: one ``encode_batch`` call runs them in parallel, and no chunk is so
        # long that the pre-tokenizer's regex dominates.
        chunks = ["".join(lines[i:i + 512]) for i in range(0, len(lines), 512)]
        ids: list[int] = []
        for encoding in self.tokenizer.encode_batch(chunks, add_special_tokens=False):
            ids.extend(encoding.ids)
        return torch.tensor(ids, dtype=torch.long)

    def encoded(self, split: str) -> torch.Tensor:
        """The id stream of ``split``, from the cache when it is there (written otherwise)."""
        text = self.texts()[split]
        key = _fingerprint(self.tokenizer.to_str(), text)
        path = self.cache_dir / f"{self.dataset}-{self._layout}-{split}-{key}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        ids = self.encode(text)
        _atomic_write(path, lambda tmp: torch.save(ids, tmp))
        return ids

    # -- Lightning hooks ---------------------------------------------------------------------

    @override
    def prepare_data(self) -> None:
        # Runs once per node before ``setup`` on every rank: do the slow parts (training the
        # tokenizer, encoding) here so the other ranks find them in the cache.
        for split in SPLITS:
            self.encoded(split)

    @override
    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",),
                  "predict": ("test",)}.get(stage or "", SPLITS)
        for split in needed:
            if split in self.datasets:
                continue
            windows = TokenWindows(self.encoded(split), self.context_length)
            if len(windows) == 0:
                raise ValueError(
                    f"The {split} split of {self._info['name']} has {len(windows.ids)} tokens, fewer "
                    f"than context_length + 1 = {self.context_length + 1}; lower context_length"
                )
            self.datasets[split] = windows

    def _dataloader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"TextDataModule: call setup() before asking for the {split} loader")
        if shuffle:  # training: resumes mid-epoch exactly (see data_common.ResumableDataLoader)
            return resumable_train_loader(self.datasets[split], self.batch_size, self.num_workers,
                                          self.seed, self.trainer, pin_memory=torch.cuda.is_available())
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._dataloader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._dataloader("valid", shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._dataloader("test", shuffle=False)
