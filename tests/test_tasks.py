"""Every task runs through its recipe and the CLI (fast_dev_run) on tiny data in the real
on-disk formats, with tiny model sizes where the recipe's model is large."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_adafisher import AdaFisher
from lightning_adafisher.cli import run_cli
from tests import data_fixtures

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu"]


def _fit(recipe: str, *overrides: str, root: Path):
    cli = run_cli([
        "fit", "--config", str(ROOT / "recipes" / recipe), *COMMON,
        "--trainer.default_root_dir", str(root / "runs"), *overrides,
    ])
    return cli.trainer, cli.model


def _assert_adafisher_folded(trainer, module_with_weight):
    opt = trainer.optimizers[0]
    if isinstance(opt, AdaFisher):
        assert opt.state[module_with_weight.weight]["factor_updates"] == 1


def test_quickstart_fast_dev_run(tmp_path):
    trainer, model = _fit("quickstart.yaml", root=tmp_path)
    assert 0.0 <= float(trainer.callback_metrics["test_acc"]) <= 1.0
    _assert_adafisher_folded(trainer, model.net.features[0])


CIFAR_DEFAULT = [("cifar10", "resnet18", "adafisher"), ("cifar100", "mobilenetv3", "sgd")]
CIFAR_SLOW = [
    (d, m, o)
    for d in ("cifar10", "cifar100")
    for m in ("resnet18", "resnet50", "resnet101", "densenet121", "mobilenetv3")
    for o in ("adafisher", "sgd", "adam")
    if (d, m, o) not in CIFAR_DEFAULT and o == "adafisher"
]


@pytest.mark.parametrize(
    "dataset, cnn, opt",
    CIFAR_DEFAULT + [pytest.param(*c, marks=pytest.mark.slow) for c in CIFAR_SLOW],
)
def test_cifar_recipes_fast_dev_run(tmp_path, dataset, cnn, opt):
    data_fixtures.write_cifar(tmp_path, dataset, n_train=8, n_test=4)
    trainer, model = _fit(
        f"{dataset}/{cnn}_{opt}.yaml",
        "--data.root", str(tmp_path), "--data.batch_size", "4", "--data.num_workers", "0",
        root=tmp_path,
    )
    logits = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 10 if dataset == "cifar10" else 100)
    assert "test_acc" in trainer.callback_metrics
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.stride == (1, 1) and first_conv.kernel_size == (3, 3)  # CIFAR stem
    _assert_adafisher_folded(trainer, first_conv)


def test_imagenet_recipe_fast_dev_run(tmp_path):
    data_fixtures.write_imagefolder(tmp_path, classes=3, per_class=2, size=40)
    trainer, model = _fit(
        "imagenet/resnet50_adafisher_b256.yaml",
        "--model.init_args.num_classes", "3", "--data.root", str(tmp_path), "--data.batch_size", "2",
        "--data.num_workers", "0", "--data.image_size", "32", "--data.resize_size", "36",
        root=tmp_path,
    )
    assert "test_acc_top5" in trainer.callback_metrics
    _assert_adafisher_folded(trainer, model.net.conv1)


TINY_GPT = [
    "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2", "--model.d_ff", "64",
    "--model.context_length", "16", "--data.context_length", "16", "--data.bpe_vocab_size", "300",
    "--data.batch_size", "2",
]


@pytest.mark.parametrize("dataset, opt", [("wikitext2", "adafisherw"), ("ptb", "adamw")])
def test_language_model_recipes_fast_dev_run(tmp_path, dataset, opt):
    writer = data_fixtures.write_wikitext2 if dataset == "wikitext2" else data_fixtures.write_ptb
    writer(tmp_path)
    trainer, model = _fit(
        f"lm/gpt1_{dataset}_{opt}.yaml", *TINY_GPT, "--data.root", str(tmp_path),
        "--data.cache_dir", str(tmp_path / "cache"), root=tmp_path,
    )
    vocab = trainer.datamodule.vocab_size
    assert model.net.tokens.weight.shape[0] == vocab
    ppl = float(trainer.callback_metrics["test_ppl"])
    # an almost untrained model predicts close to uniformly: perplexity near the vocabulary size
    assert math.isfinite(ppl) and 0.2 * vocab < ppl < 5 * vocab
    _assert_adafisher_folded(trainer, model.net.tokens)  # embeddings get factors (extension)


@pytest.mark.parametrize(("recipe", "name", "missing"), [
    ("cifar10/resnet18_adafisher.yaml", "CIFAR-10", "cifar-10-batches-py/"),
    ("lm/gpt1_wikitext2_adafisherw.yaml", "WikiText-2", "wikitext-2-raw/wiki.train.raw"),
])
def test_cli_missing_dataset_is_one_message_without_traceback(tmp_path, recipe, name, missing):
    from lightning_adafisher.tasks.data_text import _TEXT
    from lightning_adafisher.tasks.data_vision import _CIFAR

    empty = tmp_path / "empty"
    empty.mkdir()
    exe = Path(sys.executable).with_name("lightning-adafisher")
    run = subprocess.run(
        [str(exe), "fit", "--config", str(ROOT / "recipes" / recipe), "--data.root", str(empty),
         "--trainer.accelerator", "cpu"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    url = (_CIFAR["cifar10"] if name == "CIFAR-10" else _TEXT["wikitext2"])["url"]
    message = run.stderr[run.stderr.index("lightning-adafisher: "):]
    assert message.startswith(f"lightning-adafisher: {name} not found (nothing is downloaded automatically).\n"
                              f"  Missing: {empty / missing}")
    assert f"  Download: {url}\n" in message
    assert "  Put it at: " in message and str(empty) in message.split("Put it at: ")[1]
    assert message.endswith("  On the command line, the data directory is --data.root DIR.\n")


def test_recipes_readme_and_the_error_name_the_same_wikitext2_download():
    from lightning_adafisher.tasks.data_text import _TEXT

    readme = (ROOT / "recipes" / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| WikiText-2 |"))
    assert _TEXT["wikitext2"]["url"] in row
    assert "datasets.load_dataset('wikitext', 'wikitext-2-raw-v1')" in row
