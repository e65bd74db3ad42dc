"""DataModules on tiny datasets in the real on-disk formats (``tests/data_fixtures.py``).

Checks what a training run relies on: batch shapes, dtypes and label ranges; which transforms
are random and which are not; Cutout's exact hole; text windows and their shift; the BPE's round
trip and its cache; and, for every dataset, that missing files give one message naming what to
download and where to put it.
"""

from __future__ import annotations

import inspect
import json
import pickle
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from lightning_adafisher.tasks import data_text
from lightning_adafisher.tasks.data_text import TextDataModule, load_tokenizer, train_bpe
from lightning_adafisher.tasks.data_vision import (
    CIFARDataModule,
    Cutout,
    DatasetNotFoundError,
    DigitsDataModule,
    ImageNetDataModule,
    apply_cutout,
)
from tests.data_fixtures import (
    write_cifar, write_hf_wikitext2, write_imagefolder, write_ptb, write_wikitext2,
)

pytest.importorskip("torchvision")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("cifar10"), "cifar10", n_train=20, n_test=10)


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("cifar100"), "cifar100", n_train=30, n_test=12)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("imagenet"), classes=3, per_class=2, size=40)


@pytest.fixture
def no_hf_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes ``import datasets`` fail, whether or not the package is installed."""
    monkeypatch.setitem(sys.modules, "datasets", None)


def _all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------------------------------
# Cutout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("center", "size", "rows", "cols"),
    [
        ((5, 5), 4, (3, 7), (3, 7)),   # interior, even size: [c - 2, c + 2)
        ((5, 5), 5, (3, 8), (3, 8)),   # odd size: symmetric about the centre
        ((0, 0), 4, (0, 2), (0, 2)),   # corner: clipped on two sides
        ((9, 4), 5, (7, 10), (2, 7)),  # bottom edge: clipped on one side
        ((5, 5), 30, (0, 10), (0, 10)),  # larger than the image: everything
    ],
)
def test_apply_cutout_zeroes_exactly_the_clipped_square(center, size, rows, cols):
    image = torch.ones(3, 10, 10)
    apply_cutout(image, *center, size)
    expected = torch.ones(3, 10, 10)
    expected[:, rows[0]:rows[1], cols[0]:cols[1]] = 0
    assert torch.equal(image, expected)


def test_cutout_random_hole_is_one_clipped_square_and_input_untouched():
    torch.manual_seed(0)
    cutout, size = Cutout(6), 6
    image = torch.randn(3, 10, 10) + 5.0  # no zeros of its own
    candidates = {
        (cy, cx): apply_cutout(torch.ones(10, 10), cy, cx, size) == 0 for cy in range(10) for cx in range(10)
    }
    areas = set()
    for _ in range(40):
        out = cutout(image)
        hole = out == 0
        assert torch.equal(hole[0], hole[1]) and torch.equal(hole[0], hole[2])  # all channels
        assert any(torch.equal(hole[0], mask) for mask in candidates.values())
        assert torch.equal(out[~hole], image[~hole])
        areas.add(int(hole[0].sum()))
    assert (image != 0).all()  # the transform works on a copy
    assert max(areas) == size * size and min(areas) < size * size  # both whole and clipped holes
    assert Cutout(0)(image) is image


# ---------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dataset", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_batches(request, dataset, classes):
    root = request.getfixturevalue(f"{dataset}_root")
    dm = CIFARDataModule(root=str(root), dataset=dataset, batch_size=4, num_workers=0)
    assert dm.num_classes == classes  # before setup: what a CLI link reads
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.int64
    n_train = len(dm.train_set)
    _, y_train = _all_batches(dm.train_dataloader())
    assert len(y_train) == n_train and 0 <= y_train.min() and y_train.max() < classes
    # val_fraction=0: validation is the test set, as the paper reports test accuracy.
    dm.setup("test")
    assert dm.val_set is dm.test_set
    x_val, y_val = _all_batches(dm.val_dataloader())
    assert x_val.shape[1:] == (3, 32, 32) and y_val.max() < classes
    # DataLoader workers started with spawn/forkserver receive the datasets pickled.
    for dataset in (dm.train_set, dm.test_set):
        restored = pickle.loads(pickle.dumps(dataset))
        assert len(restored) == len(dataset) and restored[0][1] == dataset[0][1]
    assert torch.equal(pickle.loads(pickle.dumps(dm.test_set))[1][0], dm.test_set[1][0])


def test_cifar_train_augmentation_random_eval_transform_exact(cifar10_root):
    dm = CIFARDataModule(root=str(cifar10_root), batch_size=4, num_workers=0)
    dm.setup("fit")
    torch.manual_seed(0)
    draws = [dm.train_set[0][0] for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    first, second = dm.test_set[3][0], dm.test_set[3][0]
    assert torch.equal(first, second)
    # The evaluation transform is ToTensor + Normalize of the stored pixels, nothing else.
    with open(cifar10_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="latin1")["data"][3]
    pixels = torch.tensor(raw, dtype=torch.float32).reshape(3, 32, 32) / 255.0
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    torch.testing.assert_close(first, (pixels - mean) / std)


def test_cifar_cutout_in_train_transform_only(cifar10_root):
    dm = CIFARDataModule(root=str(cifar10_root), batch_size=4, num_workers=0, cutout=True, cutout_size=16)
    dm.setup("fit")
    torch.manual_seed(0)
    for i in range(5):
        hole = (dm.train_set[i][0] == 0).all(0)
        assert hole.sum() >= 8 * 8  # a corner centre still leaves an 8x8 hole
    assert not (dm.test_set[0][0] == 0).all(0).any()


def test_cifar_held_out_validation_is_seeded_disjoint_and_deterministic(cifar10_root):
    def split(seed: int) -> CIFARDataModule:
        dm = CIFARDataModule(root=str(cifar10_root), batch_size=4, num_workers=0, val_fraction=0.25, seed=seed)
        dm.setup("fit")
        return dm

    dm = split(0)
    train_idx, val_idx = set(dm.train_set.indices.tolist()), set(dm.val_set.indices.tolist())
    assert len(val_idx) == 5 and len(train_idx) == 15 and not train_idx & val_idx
    assert torch.equal(split(0).val_set.indices, dm.val_set.indices)
    assert not torch.equal(split(1).val_set.indices, dm.val_set.indices)
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])  # evaluation transform
    assert dm.test_set is None  # fit with a held-out split does not need the test pickles


def test_cifar_shuffle_is_seeded(cifar10_root):
    def first_labels(seed: int) -> torch.Tensor:
        dm = CIFARDataModule(root=str(cifar10_root), batch_size=20, num_workers=0, seed=seed)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))[1]

    assert torch.equal(first_labels(3), first_labels(3))


# ---------------------------------------------------------------------------------------------
# ImageNet
# ---------------------------------------------------------------------------------------------


def test_imagenet_batches(imagenet_root):
    dm = ImageNetDataModule(root=str(imagenet_root), batch_size=4, num_workers=0, image_size=32, resize_size=36)
    assert dm.num_classes == 3
    dm.prepare_data()
    dm.setup("fit")
    x, y = _all_batches(dm.train_dataloader())
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    x_val, y_val = _all_batches(dm.val_dataloader())
    x_test, y_test = _all_batches(dm.test_dataloader())
    assert len(pickle.loads(pickle.dumps(dm.train_set))) == 6
    assert torch.equal(x_val, x_test) and torch.equal(y_val, y_test)  # val doubles as test
    assert x_val.shape == (6, 3, 32, 32)


def test_imagenet_class_folders_must_match(tmp_path):
    root = write_imagefolder(tmp_path, classes=2, per_class=1, size=16)
    (root / "val" / "n00000001").rename(root / "val" / "n00000007")
    with pytest.raises(ValueError, match="class folders differ"):
        ImageNetDataModule(root=str(root)).setup("fit")


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------


def test_digits_split_and_batches():
    dm = DigitsDataModule(batch_size=64, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert dm.num_classes == 10
    dm.setup("fit")
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sizes == [1258, 180, 359] and sum(sizes) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    x_all, y_all = _all_batches(dm.train_dataloader())
    assert 0.0 <= x_all.min() and x_all.max() <= 1.0 and x_all.max() == 1.0
    assert set(y_all.tolist()) == set(range(10))
    # The three splits partition the 1,797 images: compare one random projection per image.
    from sklearn.datasets import load_digits

    probe = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    original = (torch.tensor(load_digits().images).flatten(1) / 16.0) @ probe
    parts = torch.cat([s.tensors[0].flatten(1).double() @ probe for s in (dm.train_set, dm.val_set, dm.test_set)])
    torch.testing.assert_close(parts.sort().values, original.sort().values)

    again = DigitsDataModule(seed=0)
    again.setup()
    assert torch.equal(again.test_set.tensors[1], dm.test_set.tensors[1])
    no_val = DigitsDataModule(val_fraction=0.0)
    no_val.setup()
    assert no_val.val_set is no_val.test_set


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.2), (0.1, 0.0), (0.5, 0.5)])
def test_digits_rejects_bad_fractions(val, test):
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=val, test_fraction=test)


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "layout"),
    [("wikitext2", "raw"), ("wikitext2", "tokens"), ("ptb", "ptb"), ("ptb", "simple-examples")],
)
def test_text_windows_are_shifted_stream_slices(tmp_path, no_hf_datasets, dataset, layout):
    write = write_wikitext2 if dataset == "wikitext2" else write_ptb
    root = write(tmp_path, layout=layout)
    T = 16
    dm = TextDataModule(dataset=dataset, root=str(root), context_length=T, batch_size=4, bpe_vocab_size=400)
    dm.prepare_data()
    dm.setup("fit")
    vocab = dm.vocab_size
    assert 256 < vocab <= 400  # the 256 byte symbols plus what the tiny corpus supports

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, T) and y.shape == (4, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Validation keeps stream order: window i is ids[i(T+1) : (i+1)(T+1)], targets shifted by one.
    stream = dm.encoded("valid")
    x_val, y_val = _all_batches(dm.val_dataloader())
    assert len(x_val) == len(stream) // (T + 1)
    windows = stream[: len(x_val) * (T + 1)].view(-1, T + 1)
    assert torch.equal(x_val, windows[:, :-1]) and torch.equal(y_val, windows[:, 1:])
    assert torch.equal(pickle.loads(pickle.dumps(dm.datasets["train"]))[2][0], dm.datasets["train"][2][0])
    ids = torch.cat([x_val.flatten(), dm.encoded("train")])
    assert ids.min() >= 0 and ids.max() < vocab


def test_text_bpe_round_trips_and_is_trained_on_train_only(tmp_path, no_hf_datasets):
    root = write_wikitext2(tmp_path)
    dm = TextDataModule(dataset="wikitext2", root=str(root), context_length=16, bpe_vocab_size=400)
    text = dm.texts()["valid"]
    assert dm.tokenizer.decode(dm.encode(text).tolist()) == text  # byte-level: exact
    assert "@-@" in text and " = " in text
    # Trained on the training split only: feeding it a different corpus changes the merges.
    other = train_bpe(dm.texts()["test"].splitlines(keepends=True), 400)
    assert other.get_vocab() != dm.tokenizer.get_vocab()
    assert train_bpe(dm.texts()["train"].splitlines(keepends=True), 400).get_vocab() == dm.tokenizer.get_vocab()


def test_text_tokenizer_and_encodings_are_reused_from_cache(tmp_path, monkeypatch, no_hf_datasets):
    root = write_ptb(tmp_path)
    cache = tmp_path / "cache"
    kwargs = dict(dataset="ptb", root=str(root), context_length=8, bpe_vocab_size=300, cache_dir=str(cache))
    first = TextDataModule(**kwargs)
    first.prepare_data()
    first.setup()
    cached = first.tokenizer_cache_file
    assert cached is not None and cached.is_file() and cached.parent == cache
    assert cached.name.startswith("ptb-ptb-bpe300-")
    encoded = sorted(cache.glob("*.pt"))
    assert len(encoded) == 3
    mtimes = {p: p.stat().st_mtime_ns for p in [cached, *encoded]}

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(data_text, "train_bpe", must_not_run)
    monkeypatch.setattr(TextDataModule, "encode", must_not_run)
    second = TextDataModule(**kwargs)
    second.prepare_data()
    second.setup()
    assert second.tokenizer_cache_file == cached
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert second.vocab_size == first.vocab_size
    assert torch.equal(second.datasets["train"].ids, first.datasets["train"].ids)
    # Default cache location: root/.cache.
    assert TextDataModule(dataset="ptb", root=str(root)).cache_dir == root / ".cache"


def test_text_split_shorter_than_a_window_is_an_error(tmp_path, no_hf_datasets):
    root = write_ptb(tmp_path, sentences=(40, 2, 2))
    dm = TextDataModule(dataset="ptb", root=str(root), context_length=200, bpe_vocab_size=300)
    with pytest.raises(ValueError, match=r"valid split .* fewer than context_length \+ 1 = 201"):
        dm.setup("fit")


def _gpt1_style_files(directory: Path, corpus: Path) -> Path:
    """vocab.json + merges.txt in GPT-1's format (character BPE, ``</w>`` suffix, lower case)."""
    from tokenizers.implementations import CharBPETokenizer

    bpe = CharBPETokenizer(lowercase=True)
    bpe.train([str(corpus)], vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(directory))
    return directory


def test_text_pretrained_tokenizer_path(tmp_path, no_hf_datasets):
    root = write_wikitext2(tmp_path / "data")
    train_file = root / "wikitext-2-raw" / "wiki.train.raw"
    gpt1 = _gpt1_style_files(tmp_path / "gpt1", train_file)
    vocab = json.loads((gpt1 / "vocab.json").read_text())
    assert any(token.endswith("</w>") for token in vocab)

    dm = TextDataModule(dataset="wikitext2", root=str(root), tokenizer_path=str(gpt1), context_length=8)
    dm.setup("fit")
    assert dm.vocab_size == max(vocab.values()) + 1
    text = dm.texts()["valid"]
    decoded = dm.tokenizer.decode(dm.encode(text).tolist())
    assert re.findall(r"\w+", decoded) == re.findall(r"\w+", text.lower())  # GPT-1 lower-cases
    assert dm.tokenizer_cache_file is None  # nothing trained

    # A tokenizer.json, as a file or in a directory, and a byte-level vocab.json + merges.txt.
    trained = train_bpe(train_file.read_text().splitlines(keepends=True), 300)
    trained.save(str(tmp_path / "tok.json"))
    (tmp_path / "hub").mkdir()
    trained.save(str(tmp_path / "hub" / "tokenizer.json"))
    trained.model.save(str(tmp_path / "hub"))  # vocab.json + merges.txt beside it; tokenizer.json wins
    (tmp_path / "bytelevel").mkdir()
    trained.model.save(str(tmp_path / "bytelevel"))
    for path in (tmp_path / "tok.json", tmp_path / "hub", tmp_path / "bytelevel"):
        loaded = load_tokenizer(path)
        assert loaded.decode(loaded.encode(text).ids) == text
        assert loaded.get_vocab() == trained.get_vocab()


def test_text_vocab_size_is_available_before_setup(tmp_path, no_hf_datasets):
    root = write_ptb(tmp_path)
    dm = TextDataModule(dataset="ptb", root=str(root), bpe_vocab_size=300)
    assert dm.vocab_size == dm.tokenizer.get_vocab_size() <= 300
    assert dm.hparams.bpe_vocab_size == 300  # the requested size stays in hparams


class _FakeSplit:
    def __init__(self, column: str, rows: list[str]) -> None:
        self.column_names = [column]
        self._rows = rows

    def __getitem__(self, column: str) -> list[str]:
        assert column in self.column_names
        return self._rows


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.config = types.SimpleNamespace(HF_DATASETS_OFFLINE=False, HF_HUB_OFFLINE=False)
    module.load_dataset = load
    monkeypatch.setitem(sys.modules, "datasets", module)
    return module


def test_text_falls_back_to_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    calls = []

    def load_dataset(path, config=None):
        calls.append((path, config, module.config.HF_HUB_OFFLINE, module.config.HF_DATASETS_OFFLINE))
        rows = [" the bank said sales of $ N million \n", " investors expects that prices will fall "] * 40
        return {split: _FakeSplit("sentence", rows) for split in ("train", "validation", "test")}

    module = _fake_datasets(monkeypatch, load_dataset)
    dm = TextDataModule(dataset="ptb", root=str(tmp_path), context_length=8, bpe_vocab_size=300)
    dm.setup("fit")
    assert calls == [("ptb_text_only", None, True, True)]  # offline during the call ...
    assert module.config.HF_HUB_OFFLINE is False  # ... and restored afterwards
    assert dm.texts()["train"].count("\n") == 80  # rows without a newline get one
    assert len(dm.datasets["train"]) > 0


@pytest.mark.parametrize("fmt", ["parquet", "text"])
def test_text_from_local_files_through_hugging_face_datasets(tmp_path, fmt):
    pytest.importorskip("datasets")
    source = write_wikitext2(tmp_path / "local")
    pattern = write_hf_wikitext2(tmp_path / "hub", source, fmt)
    kw = dict(dataset="wikitext2", context_length=8, bpe_vocab_size=300, batch_size=4)
    hf = TextDataModule(root=str(tmp_path / "empty"), hf_data_files=pattern,
                        cache_dir=str(tmp_path / "cache_hf"), **kw)
    local = TextDataModule(root=str(source), cache_dir=str(tmp_path / "cache_local"), **kw)
    assert hf.texts() == local.texts()  # the same characters, split by split
    assert hf.texts()["valid"].startswith(" \n = ")
    for dm in (hf, local):
        dm.prepare_data()
        dm.setup("fit")
    assert hf.vocab_size == local.vocab_size
    for split in ("train", "valid"):
        assert torch.equal(hf.datasets[split].ids, local.datasets[split].ids)
    for a, b in zip(hf.train_dataloader(), local.train_dataloader()):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (tmp_path / "cache_hf" / "hf").is_dir()  # datasets' Arrow cache stays in cache_dir
    assert hf.tokenizer_cache_file.name.startswith("wikitext2-hf-bpe300-")


def test_text_hf_data_files_errors(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    pattern = str(tmp_path / "hub" / "{split}-00000-of-00001.parquet")
    with pytest.raises(DatasetNotFoundError) as err:
        TextDataModule(dataset="wikitext2", root=str(tmp_path), hf_data_files=pattern).setup("fit")
    _assert_message(err, "WikiText-2 not found", tmp_path / "hub" / "train-00000-of-00001.parquet",
                    tmp_path / "hub" / "validation-00000-of-00001.parquet",
                    "huggingface.co/datasets/Salesforce/wikitext/tree/main/wikitext-2-raw-v1 "
                    "({train,validation,test}-00000-of-00001.parquet)")
    with pytest.raises(ValueError, match=r"Invalid hf_data_files: 'x.parquet' \(expected a path with \{split\}"):
        TextDataModule(dataset="wikitext2", root=str(tmp_path), hf_data_files="x.parquet").texts()
    monkeypatch.setitem(sys.modules, "datasets", None)  # the fallback without the package
    with pytest.raises(ImportError, match=r"hf_data_files needs the optional `datasets` package: "
                                          r"pip install 'lightning-adafisher\[recipes\]'"):
        TextDataModule(dataset="wikitext2", root=str(tmp_path), hf_data_files=pattern).texts()


def _assert_message(err: pytest.ExceptionInfo, *parts: str | Path) -> None:
    message = str(err.value)
    for part in parts:
        assert str(part) in message, f"{part!s} not in:\n{message}"


@pytest.mark.parametrize(
    ("dataset", "folder", "first", "url"),
    [
        ("cifar10", "cifar-10-batches-py", "data_batch_1", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
        ("cifar100", "cifar-100-python", "train", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    ],
)
def test_cifar_missing_data_message(tmp_path, dataset, folder, first, url):
    dm = CIFARDataModule(root=str(tmp_path / "nowhere"), dataset=dataset)
    for hook in (dm.prepare_data, lambda: dm.setup("fit")):
        with pytest.raises(DatasetNotFoundError) as err:
            hook()
        _assert_message(err, "CIFAR-1", "not found", url, f"{tmp_path / 'nowhere' / folder}/ (with {first}",
                        f"tar -xzf {url.rsplit('/', 1)[-1]} -C {tmp_path / 'nowhere'}")
    # Only what is actually missing is listed.
    root = write_cifar(tmp_path / "partial", dataset, n_train=5, n_test=2)
    missing = root / folder / ("test_batch" if dataset == "cifar10" else "test")
    missing.unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        CIFARDataModule(root=str(root), dataset=dataset).setup("fit")
    assert str(err.value).count("Missing:") == 1
    _assert_message(err, missing)


def test_imagenet_missing_data_message(tmp_path):
    dm = ImageNetDataModule(root=str(tmp_path / "imagenet"))
    for hook in (dm.prepare_data, lambda: dm.setup("fit"), lambda: dm.num_classes):
        with pytest.raises(DatasetNotFoundError) as err:
            hook()
        _assert_message(err, "ImageNet", "image-net.org", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                        tmp_path / "imagenet" / "train", tmp_path / "imagenet" / "val", "valprep.sh")


@pytest.mark.parametrize(
    ("dataset", "expected", "url", "hf"),
    [
        ("wikitext2", ["wikitext-2-raw/wiki.train.raw", "wikitext-2/wiki.train.tokens"],
         "wikitext-2-raw-v1.zip", "datasets.load_dataset('wikitext', 'wikitext-2-raw-v1')"),
        ("ptb", ["ptb/ptb.train.txt", "simple-examples/data/ptb.train.txt"],
         "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz", "datasets.load_dataset('ptb_text_only')"),
    ],
)
def test_text_missing_data_message(tmp_path, no_hf_datasets, dataset, expected, url, hf):
    dm = TextDataModule(dataset=dataset, root=str(tmp_path))
    for hook in (dm.prepare_data, lambda: dm.setup("fit"), lambda: dm.vocab_size):
        with pytest.raises(DatasetNotFoundError) as err:
            hook()
        _assert_message(err, "not found", url, hf, "`datasets` package is not installed",
                        *(tmp_path / e for e in expected))


def test_text_missing_data_message_when_hf_cache_fails(tmp_path, monkeypatch):
    def load_dataset(path, config=None):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(DatasetNotFoundError) as err:
        TextDataModule(dataset="wikitext2", root=str(tmp_path)).setup("fit")
    _assert_message(err, "could not load it offline (ConnectionError: Couldn't reach 'wikitext'",
                    tmp_path / "wikitext-2-raw" / "wiki.train.raw")


def test_dataset_not_found_error_lives_in_a_neutral_module_and_old_imports_work():
    from lightning_adafisher import tasks
    from lightning_adafisher.tasks import data_common, data_vision

    assert data_common.DatasetNotFoundError is data_vision.DatasetNotFoundError
    assert data_text.DatasetNotFoundError is data_common.DatasetNotFoundError
    assert tasks.DatasetNotFoundError is data_common.DatasetNotFoundError
    assert data_common.DatasetNotFoundError.__module__ == "lightning_adafisher.tasks.data_common"
    assert issubclass(DatasetNotFoundError, FileNotFoundError)


def test_bad_tokenizer_path_message(tmp_path, no_hf_datasets):
    root = write_ptb(tmp_path / "data")
    dm = TextDataModule(dataset="ptb", root=str(root), tokenizer_path=str(tmp_path / "gpt1"))
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup("fit")
    _assert_message(err, "Tokenizer", tmp_path / "gpt1", "huggingface.co/openai-community/openai-gpt",
                    "vocab.json", "merges.txt")
    (tmp_path / "gpt1").mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        TextDataModule(dataset="ptb", root=str(root), tokenizer_path=str(tmp_path / "gpt1")).vocab_size
    _assert_message(err, tmp_path / "gpt1" / "vocab.json", tmp_path / "gpt1" / "merges.txt")


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def test_unknown_dataset_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown dataset: 'cifar1000' \(valid: 'cifar10', 'cifar100'\)"):
        CIFARDataModule(dataset="cifar1000")
    with pytest.raises(ValueError, match=r"Unknown dataset: 'wikitext103' \(valid: 'wikitext2', 'ptb'\)"):
        TextDataModule(dataset="wikitext103")
    # Spelling variants of the valid names are accepted.
    assert CIFARDataModule(dataset="CIFAR-100").num_classes == 100
    assert TextDataModule(dataset="WikiText-2").dataset == "wikitext2"


@pytest.mark.parametrize("cls", [CIFARDataModule, ImageNetDataModule, DigitsDataModule, TextDataModule])
def test_constructor_arguments_are_plain_and_cli_parsable(cls):
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        assert param.default is None or type(param.default) in (str, int, float, bool), param
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(cls, "data")
    config = parser.parse_args([])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
    assert type(instantiate(config)["data"]) is cls


# ---------------------------------------------------------------------------------------------
# The training loader that resumes mid-epoch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resumable_loader_continues_where_its_state_says(num_workers):
    from torch.utils.data import TensorDataset

    from lightning_adafisher.tasks.data_common import resumable_train_loader

    data = TensorDataset(torch.arange(10))
    make = lambda: resumable_train_loader(data, 3, num_workers, seed=5)  # noqa: E731
    straight = make()
    epochs = []
    for epoch in range(2):
        straight.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
        epochs.append([b[0].tolist() for b in straight])
    g = torch.Generator().manual_seed(5 + 1)
    assert sum(epochs[1], []) == torch.randperm(10, generator=g).tolist()  # order = f(seed, epoch)
    assert epochs[0] != epochs[1] and [len(b) for b in epochs[0]] == [3, 3, 3, 1]

    first = make()
    first.sampler.set_epoch(1)
    it = iter(first)
    taken = [next(it)[0].tolist(), next(it)[0].tolist()]
    assert first.state_dict() == {"epoch": 1, "batches": 2}
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)  # Lightning: iter() first, then set_epoch(1), then the first batch
    resumed.sampler.set_epoch(1)
    assert taken + [b[0].tolist() for b in it] == epochs[1]
    assert resumed.state_dict() == {"epoch": 1, "batches": 4}
    # a state saved after the last batch of epoch 0 continues with epoch 1 from its start
    after_last = make()
    after_last.load_state_dict({"epoch": 0, "batches": 4})
    assert [b[0].tolist() for b in after_last] == epochs[1]


def test_recipe_train_loaders_are_resumable(cifar10_root, tmp_path, no_hf_datasets):
    from lightning_adafisher.tasks.data_common import ResumableDataLoader

    cifar = CIFARDataModule(root=str(cifar10_root), batch_size=4, num_workers=0)
    cifar.setup("fit")
    digits = DigitsDataModule()
    digits.setup("fit")
    text = TextDataModule(dataset="ptb", root=str(write_ptb(tmp_path)), context_length=8, bpe_vocab_size=300)
    text.setup("fit")
    for dm in (cifar, digits, text):
        loader = dm.train_dataloader()
        assert isinstance(loader, ResumableDataLoader) and loader.sampler.seed == dm.seed
        assert type(dm.val_dataloader()) is torch.utils.data.DataLoader
