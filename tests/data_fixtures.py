"""Tiny datasets in the real on-disk formats, for tests that must run offline and fast.

Each ``write_*`` function creates its files under ``root`` (created if needed), is deterministic
(same arguments, same bytes) and returns ``root`` as a ``Path`` — pass it as the DataModule's
``root``::

    root = write_cifar(tmp_path, "cifar10", n_train=20, n_test=10)
    dm = CIFARDataModule(root=str(root), dataset="cifar10", batch_size=4, num_workers=0)

========================  =========================================================================
function                  files (``root/...``)
========================  =========================================================================
``write_cifar``           ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` or
                          ``cifar-100-python/{train,test,meta}``: pickled dicts with torchvision's
                          keys, ``data`` uint8 ``[N, 3072]`` (channel-major 32x32)
``write_imagefolder``     ``{train,val}/<wnid>/*.JPEG``: ImageNet's ImageFolder layout
``write_wikitext2``       ``wikitext-2-raw/wiki.{train,valid,test}.raw`` (or ``wikitext-2/…tokens``
                          with ``layout="tokens"``): `` = Heading = `` lines, `` @-@ `` escapes
``write_ptb``             ``ptb/ptb.{train,valid,test}.txt`` (or ``simple-examples/data/…`` with
                          ``layout="simple-examples"``): lower case, ``N`` for numbers, ``<unk>``
``write_hf_wikitext2``    ``wikitext-2-raw-v1/{train,validation,test}-00000-of-00001.parquet``: the
                          Hugging Face Hub's files of WikiText-2 (or ``{split}.txt``)
========================  =========================================================================
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np

__all__ = ["write_cifar", "write_hf_wikitext2", "write_imagefolder", "write_ptb", "write_wikitext2"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the real files are Python 2 pickles


def write_cifar(
    root: str | Path, dataset: str = "cifar10", n_train: int = 20, n_test: int = 10, seed: int = 0
) -> Path:
    """Writes a tiny CIFAR-10 or CIFAR-100 in torchvision's "python version" format.

    Images are uniform random noise; labels cycle through the classes (``i % num_classes``), so
    each class appears once ``n`` reaches the class count.

    Args:
        root: directory to write into (the DataModule's ``root``).
        dataset: ``"cifar10"`` (5 training batches, ``test_batch``, ``batches.meta``) or
            ``"cifar100"`` (``train``, ``test``, ``meta``; coarse label = fine label // 5).
        n_train: training images (spread over the 5 CIFAR-10 batches; >= 5 for CIFAR-10).
        n_test: test images.
        seed: seeds the pixels.

    Returns:
        ``root`` as a ``Path``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)

    if dataset == "cifar10":
        if n_train < 5:
            raise ValueError("CIFAR-10 has 5 training batches: n_train must be >= 5")
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        offset = 0
        for b, count in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            labels = [int(i) % 10 for i in count]
            _dump(folder / f"data_batch_{b}", {
                "batch_label": f"training batch {b} of 5",
                "labels": labels,
                "data": images(len(labels)),
                "filenames": [f"img_{offset + i:05d}.png" for i in range(len(labels))],
            })
            offset += len(labels)
        _dump(folder / "test_batch", {
            "batch_label": "testing batch 1 of 1",
            "labels": [i % 10 for i in range(n_test)],
            "data": images(n_test),
            "filenames": [f"test_{i:05d}.png" for i in range(n_test)],
        })
        _dump(folder / "batches.meta", {
            "num_cases_per_batch": max(1, n_train // 5),
            "label_names": CIFAR10_CLASSES,
            "num_vis": 3 * 32 * 32,
        })
    elif dataset == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, n in (("train", n_train), ("test", n_test)):
            fine = [i % 100 for i in range(n)]
            _dump(folder / name, {
                "filenames": [f"{name}_{i:05d}.png" for i in range(n)],
                "batch_label": f"{name}ing batch 1 of 1",
                "fine_labels": fine,
                "coarse_labels": [f // 5 for f in fine],
                "data": images(n),
            })
        _dump(folder / "meta", {
            "fine_label_names": [f"fine_{i:03d}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)],
        })
    else:
        raise ValueError(f"Unknown dataset: {dataset!r} (valid: 'cifar10', 'cifar100')")
    return root


def write_imagefolder(
    root: str | Path, classes: int = 3, per_class: int = 2, size: int = 40, seed: int = 0
) -> Path:
    """Writes small JPEGs in ImageNet's ImageFolder layout, ``train/`` and ``val/``.

    Class folders are named like WordNet ids (``n00000000``, ``n00000001``, ...); each image is
    its class colour plus noise, ``size`` x ``size`` RGB.

    Args:
        root: directory to write into (the DataModule's ``root``).
        classes: number of class folders (the same in both splits).
        per_class: images per class and split.
        size: image side in pixels.
        seed: seeds the noise.

    Returns:
        ``root`` as a ``Path``.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            wnid = f"n{c:08d}"
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([(60 * c) % 256, (110 * c + 40) % 256, (170 * c + 90) % 256], dtype=np.int16)
            for i in range(per_class):
                noise = rng.integers(-40, 41, size=(size, size, 3))
                pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * per_class + i + 1:08d}.JPEG"
                Image.fromarray(pixels, "RGB").save(folder / name, format="JPEG", quality=90)
    return root


# Original prose, written for these fixtures, in WikiText's tokenised style (spaces around
# punctuation, " @-@ " / " @,@ " / " @.@ " for hyphens and separators inside words and numbers).
_WIKI_SENTENCES = [
    "The river rises in the northern hills and flows south for about 120 kilometres before it reaches the sea .",
    "Its lower course was canalised in the 18th century , when a series of locks was built to carry coal barges .",
    "The town grew around the old stone bridge , which was rebuilt in 1846 after a flood destroyed two of its arches .",
    "Local historians describe the market as one of the oldest in the region , with records dating from 1203 .",
    "A narrow @-@ gauge railway opened in 1889 and carried passengers until the line closed in 1951 .",
    "The population reached 4 @,@ 310 at the census of 1901 , but declined during the following decades .",
    "The church has a square tower of three stages and a peal of eight bells , the heaviest weighing 1 @.@ 2 tonnes .",
    "During the war the mill was used as a store , and after 1945 it was converted into a small museum .",
    "The album was recorded in six weeks and received mixed reviews from critics on its release .",
    "Critics praised the arrangements but found the lyrics repetitive , and the single reached number 14 in the chart .",
    "The band toured the album across Europe , playing forty @-@ two concerts in three months .",
    "In a later interview the singer said that the songs were written quickly and recorded almost live .",
    "The species is found in shallow coastal waters , where it feeds on small fish and crustaceans .",
    "Adults grow to a length of 30 centimetres , and the females are larger than the males .",
    "The first scientific description was published in 1837 , based on a specimen collected near the estuary .",
    "The game follows a small team of soldiers through a fictional war , told from the point of view of a young officer .",
]

_WIKI_TITLES = ["Afon Marrow", "Eastbridge", "The Quiet Hours ( album )", "Spotted coast goby", "Harrow Mill"]


def _wiki_article(rng: random.Random, title: str, unk: bool) -> str:
    lines = [f" = {title} = \n", " \n"]
    for heading in ("History", "Description"):
        lines += [f" = = {heading} = = \n", " \n"]
        for _ in range(2):
            sentences = rng.sample(_WIKI_SENTENCES, 3)
            paragraph = " ".join(sentences)
            if unk:  # the tokenised variant replaces rare words by <unk>
                words = paragraph.split(" ")
                words[rng.randrange(len(words))] = "<unk>"
                paragraph = " ".join(words)
            lines += [f" {paragraph} \n", " \n"]
    return "".join(lines)


def write_wikitext2(
    root: str | Path, layout: str = "raw", articles: tuple[int, int, int] = (12, 4, 4), seed: int = 0
) -> Path:
    """Writes a few KB of WikiText-2-formatted text.

    Format as in the real files: every line starts with a space, blank lines are `` \\n``,
    headings are `` = Title = `` / `` = = Section = = ``, text is tokenised with spaces around
    punctuation and `` @-@ ``-style escapes; the ``tokens`` layout also has ``<unk>``.

    Args:
        root: directory to write into (the DataModule's ``root``).
        layout: ``"raw"`` → ``root/wikitext-2-raw/wiki.{train,valid,test}.raw``;
            ``"tokens"`` → ``root/wikitext-2/wiki.{train,valid,test}.tokens``.
        articles: number of articles in train, valid, test (each ~1.3 KB).
        seed: seeds which sentences each article uses.

    Returns:
        ``root`` as a ``Path``.
    """
    if layout not in ("raw", "tokens"):
        raise ValueError(f"Unknown layout: {layout!r} (valid: 'raw', 'tokens')")
    root = Path(root)
    folder, ext = ("wikitext-2-raw", "raw") if layout == "raw" else ("wikitext-2", "tokens")
    (root / folder).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, count in zip(("train", "valid", "test"), articles):
        text = " \n" + "".join(
            _wiki_article(rng, _WIKI_TITLES[i % len(_WIKI_TITLES)], unk=layout == "tokens") for i in range(count)
        )
        (root / folder / f"wiki.{split}.{ext}").write_text(text, encoding="utf-8")
    return root


_PTB_SUBJECTS = ["the company", "the bank", "analysts", "the government", "investors", "the firm", "traders"]
_PTB_VERBS = ["said", "expects", "reported", "estimated", "forecast", "noted"]
_PTB_OBJECTS = [
    "a N N increase in quarterly profit", "sales of $ N million", "that prices will fall",
    "a loss of N cents a share", "the <unk> of its units", "higher interest rates next year",
    "that the market will recover", "a decline in <unk> orders",
]
_PTB_TAILS = ["", " in the third quarter", " according to <unk> & co.", " despite the <unk>", " last week"]


def write_ptb(
    root: str | Path, layout: str = "ptb", sentences: tuple[int, int, int] = (300, 80, 80), seed: int = 0
) -> Path:
    """Writes a few KB of text in Mikolov's Penn Treebank format.

    Format as in the real files: one sentence per line, a leading and a trailing space, lower
    case, no punctuation but ``$ & .`` inside tokens, numbers replaced by ``N``, rare words by
    ``<unk>``.

    Args:
        root: directory to write into (the DataModule's ``root``).
        layout: ``"ptb"`` → ``root/ptb/ptb.{train,valid,test}.txt``;
            ``"simple-examples"`` → ``root/simple-examples/data/ptb.{train,valid,test}.txt``.
        sentences: number of sentences in train, valid, test (~45 bytes each).
        seed: seeds the sentences.

    Returns:
        ``root`` as a ``Path``.
    """
    if layout not in ("ptb", "simple-examples"):
        raise ValueError(f"Unknown layout: {layout!r} (valid: 'ptb', 'simple-examples')")
    root = Path(root)
    folder = root / ("ptb" if layout == "ptb" else "simple-examples/data")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, count in zip(("train", "valid", "test"), sentences):
        lines = [
            f" {rng.choice(_PTB_SUBJECTS)} {rng.choice(_PTB_VERBS)} {rng.choice(_PTB_OBJECTS)}{rng.choice(_PTB_TAILS)} \n"
            for _ in range(count)
        ]
        (folder / f"ptb.{split}.txt").write_text("".join(lines), encoding="utf-8")
    return root


def write_hf_wikitext2(root: str | Path, source: str | Path, fmt: str = "parquet") -> str:
    """The splits of a ``write_wikitext2`` tree (``source``) as the Hugging Face Hub serves
    WikiText-2: ``root/wikitext-2-raw-v1/{train,validation,test}-00000-of-00001.parquet``, one
    row per line with its newline, column ``text`` (``fmt="parquet"``); or ``{split}.txt`` copies
    of the raw files (``fmt="text"``, for ``load_dataset("text", ...)``).

    Returns:
        The ``hf_data_files`` pattern (with ``{split}``).
    """
    root, source = Path(root), Path(source)
    folder = root / "wikitext-2-raw-v1"
    folder.mkdir(parents=True, exist_ok=True)
    for ours, theirs in (("train", "train"), ("valid", "validation"), ("test", "test")):
        text = (source / "wikitext-2-raw" / f"wiki.{ours}.raw").read_text(encoding="utf-8")
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = text.splitlines(keepends=True)
            pq.write_table(pa.table({"text": rows}), folder / f"{theirs}-00000-of-00001.parquet")
        else:
            (folder / f"{theirs}.txt").write_text(text, encoding="utf-8")
    return str(folder / ("{split}-00000-of-00001.parquet" if fmt == "parquet" else "{split}.txt"))
