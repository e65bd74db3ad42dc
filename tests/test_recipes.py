"""Recipes: generated files are current, every YAML parses through the CLI, GPT-1's size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lightning_adafisher.cli import main
from lightning_adafisher.tasks.models import GPT

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def _generator():
    spec = importlib.util.spec_from_file_location("gen_recipes", ROOT / "scripts/gen_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_recipes_equal_the_generator_output():
    expected = _generator().all_recipes()
    committed = {str(p.relative_to(ROOT)): p.read_text() for p in RECIPES}
    assert committed == expected, "run: python scripts/gen_recipes.py"


def test_every_recipe_key_is_commented():
    for path in RECIPES:
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if ":" in stripped and not stripped.startswith(("#", "- class_path", "class_path", "init_args")) \
                    and not stripped.endswith(":"):
                assert "#" in line, f"{path.name}: uncommented key: {line}"


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe_parses_through_the_cli(path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(path), "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path" in printed and "optimizer" in printed


def test_gpt1_four_blocks_have_the_papers_parameter_count():
    model = GPT(vocab_size=40478)
    assert sum(p.numel() for p in model.blocks.parameters() if p.requires_grad) == 28_351_488


def test_gpt_loads_pretrained_embeddings_and_freezes_them(tmp_path):
    torch = pytest.importorskip("torch")
    model = GPT(vocab_size=50, context_length=8, n_layer=1, n_embd=16, n_head=2, d_ff=32)
    tok, pos = torch.randn(50, 16), torch.randn(512, 16)  # openai-gpt has 512 positions
    torch.save({"transformer.tokens_embed.weight": tok, "transformer.positions_embed.weight": pos},
               tmp_path / "pytorch_model.bin")
    model.load_pretrained_embeddings(str(tmp_path))
    assert torch.equal(model.tokens.weight, tok) and torch.equal(model.positions.weight, pos[:8])
    assert not model.tokens.weight.requires_grad and not model.positions.weight.requires_grad
    wrong = GPT(vocab_size=60, context_length=8, n_layer=1, n_embd=16, n_head=2, d_ff=32)
    with pytest.raises(ValueError, match=r"have shape \(50, 16\), the model \(60, 16\): use the GPT-1 BPE"):
        wrong.load_pretrained_embeddings(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pretrained GPT-1 checkpoint not found"):
        model.load_pretrained_embeddings(str(tmp_path / "missing.bin"))
