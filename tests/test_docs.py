"""The repository's text speaks of the product only, and every figure the docs cite has its file.

- No tracked text names how the work on it was organised: results carry
  dates, commits and commands instead. Prompt data is exempt (its prompts are other people's text).
- Every `benchmarks/results/...` file that README.md or docs/ name exists, and every relative
  link in them resolves, down to the section it names.
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


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown page's headings: lower case, punctuation dropped, spaces to '-'."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_section_links_exist(doc):
    """A link to `page.md#section` (or `#section` on the same page) names a heading that exists:
    a section removed or renamed must not leave links pointing nowhere."""
    missing = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", doc.read_text()):
        if "://" in target:
            continue
        page = doc if not target else (doc.parent / target).resolve()
        if page.suffix == ".md" and page.exists() and anchor not in heading_anchors(page.read_text()):
            missing.append(f"{target}#{anchor}")
    assert not missing, f"{doc.name} links to sections that do not exist: {missing}"


def test_heading_anchors_follow_github():
    assert heading_anchors("## Where a decode step's time goes\n# GPU (H200)\n## bf16 against float32") == {
        "where-a-decode-steps-time-goes", "gpu-h200", "bf16-against-float32"}


def test_readme_stays_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; details belong in docs/"
    for page in ("serving", "deployment", "benchmarks", "quality", "training", "architecture"):
        assert (ROOT / "docs" / f"{page}.md").exists(), page
