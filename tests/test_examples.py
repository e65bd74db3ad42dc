"""Every script under ``examples/`` runs as written (each in a fresh interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "custom_layer.py": [],  # asserts its factors against a float64 reference itself
    "digits_demo.py": ["--epochs", "1"],
}


def test_every_example_is_listed():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, str(ROOT / "examples" / name), *EXAMPLES[name]],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{name} failed:\n{run.stderr[-3000:]}"
    assert run.stdout.strip(), f"{name} printed nothing"
