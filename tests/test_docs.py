"""Every ```python block in docs/*.md runs as written (each in a fresh interpreter)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = [
    (path, i, code)
    for path in sorted((ROOT / "docs").glob("*.md"))
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))
]


@pytest.mark.parametrize("path, index, code", BLOCKS, ids=[f"{p.name}[{i}]" for p, i, _ in BLOCKS])
def test_doc_snippet_runs(path, index, code, tmp_path):
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{path.name} block {index} failed:\n{run.stderr[-3000:]}"


# --- the docs stand alone ------------------------------------------------------------------

SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "lightning_logs", "build", "dist"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".txt", ".cfg", ".json"}


def _shipped_text_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if path.is_file() and path.suffix in TEXT_SUFFIXES and not parts & SKIP_DIRS \
                and not any(p.endswith(".egg-info") for p in parts):
            found.append(path)
    return found


def test_no_file_cites_the_internal_spec():
    """The numerics reference is docs/numerics.md; no file points at a document that does not
    ship (the pattern is spelled so that this file does not match itself)."""
    pattern = re.compile(r"\bS[P]EC(\.md|\b)")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in _shipped_text_files()
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # no headings in code blocks
    return {_slug(h) for h in re.findall(r"^#{1,6} +(.+?) *$", text, re.M)}


LINKED_PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "recipes" / "README.md",
                       *(ROOT / "docs").glob("*.md")])


@pytest.mark.parametrize("page", LINKED_PAGES, ids=[str(p.relative_to(ROOT)) for p in LINKED_PAGES])
def test_every_relative_link_resolves(page):
    """Every relative link (and image) of README, CHANGELOG and docs/ names an existing file,
    and every ``#anchor`` into a Markdown page names one of its headings."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_docs_have_an_index_that_links_every_page():
    index = (ROOT / "docs" / "index.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "index.md":
            assert f"]({page.name}" in index, page.name


def test_every_module_compiles_without_warnings():
    """An invalid escape in a docstring is a SyntaxWarning today and an error in a later Python."""
    import warnings

    for path in sorted((ROOT / "lightning_adafisher").rglob("*.py")) + sorted((ROOT / "examples").rglob("*.py")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(), str(path), "exec")
