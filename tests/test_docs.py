"""The repository's text speaks of the product only, and every figure the docs cite has its file.

- No tracked text names how the work on it was organised: results carry
  dates, commits and commands instead. Prompt data is exempt (its prompts are other people's text).
- Every `benchmarks/results/...` file that README.md or docs/ name exists, and every relative
  link in them resolves.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", "node_modules"}
TEXT_SUFFIXES = {".py", ".md", ".sh", ".json", ".jsonl", ".toml", ".yaml", ".yml", ".txt", ".cpp", ".h", ".cu",
                 ".cuh", ".tpl", ".cfg", ".log", ""}
# Prompt text written by others (datasets), not by this project.
EXEMPT = [ROOT / "benchmarks" / "data", ROOT / "adadepth" / "artifacts"]
# Split so that this file does not match itself.
PROCESS_WORDS = re.compile("|".join([
    r"\bsess" r"ions?[ -]?\d",                                    # "<that word> 3", "<that word>-10"
    r"\b(?:this|next|a|that|each|later|earlier|previous|GPU) sess" r"ion\b",
    r"\biss" r"ues?\b", r"\btick" r"ets?\b",
]), re.IGNORECASE)


def text_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix in TEXT_SUFFIXES and not any(path.is_relative_to(e) for e in EXEMPT):
            files.append(path)
    return files


def test_no_text_speaks_of_how_the_work_was_organised():
    hits = []
    for path in text_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if PROCESS_WORDS.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_the_pattern_catches_what_it_should():
    for bad in ["measured in sess" "ion 4", "sess" "ion-10 labels", "the next sess" "ion should",
                "see iss" "ue #5", "a GPU sess" "ion has"]:
        assert PROCESS_WORDS.search(bad), bad
    for fine in ['@pytest.fixture(scope="session")', "a park warden has issued 24 citations", "sessionStorage"]:
        assert not PROCESS_WORDS.search(fine), fine


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_cited_results_and_links_exist(doc):
    text = doc.read_text()
    missing = [m for m in re.findall(r"benchmarks/results/[\w./-]+\.\w+", text) if not (ROOT / m).exists()]
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        if not (doc.parent / target).resolve().exists():
            missing.append(target)
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def test_readme_stays_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; details belong in docs/"
    for page in ("serving", "deployment", "benchmarks", "quality", "training", "architecture"):
        assert (ROOT / "docs" / f"{page}.md").exists(), page
