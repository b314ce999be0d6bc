"""The documentation's cross-references: every relative link and anchor in the Markdown files, and every repository
path or `*.md#anchor` that code and docs cite, points at something that exists (GitHub's heading anchors)."""

import re
import unicodedata
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
# The project's own folders: not a virtual environment or a run's output folder (a model card) in the checkout.
FOLDERS = ("docs", "benchmarks", "examples", "hf_sam", "tests")
MARKDOWN = sorted([*ROOT.glob("*.md"), *(p for folder in FOLDERS for p in (ROOT / folder).glob("*.md"))])
SOURCES = sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))
# A path into the repository as text cites it (`docs/methods.md#gsam`, `tests/test_trl.py`); not one under another
# folder (`/tmp/gen/generalization.jsonl`) or with a wildcard (`results/generalization_presets*`).
CITED = re.compile(
    r"(?<![\w/.-])((?:hf_sam|tests|docs|benchmarks|examples)/[\w/.-]*\w\.(?:py|md|jsonl?|yaml))(#[\w-]+)?"
)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link targets and markup dropped, lowercased, punctuation removed, spaces to
    hyphens (letters and digits of any script kept)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    kept = (ch for ch in text if ch in "-_ " or unicodedata.category(ch)[0] in "LNM")
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives `path`: its headings outside code blocks (a repeated one gets -1, -2, ...)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        base = slug(match.group(1))
        out.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return out


def test_slug_follows_github():
    assert slug("`generalization.py`: held-out accuracy against the plain optimizer") == (
        "generalizationpy-held-out-accuracy-against-the-plain-optimizer"
    )
    assert slug("DeepSpeed ZeRO-1 and ZeRO-2") == "deepspeed-zero-1-and-zero-2"
    assert slug("Every preset against `sam` on the short runs") == "every-preset-against-sam-on-the-short-runs"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_of_a_markdown_file_resolves(path):
    broken = []
    for match in re.finditer(r"\]\(([^)\s]+)\)", path.read_text()):
        target, _, anchor = match.group(1).partition("#")
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(f"{match.group(1)} (no file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{match.group(1)} (no heading)")
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"


def test_every_repository_path_and_anchor_cited_in_code_and_docs_exists():
    broken = []
    for path in MARKDOWN + SOURCES:
        for match in CITED.finditer(path.read_text()):
            cited, anchor = ROOT / match.group(1), (match.group(2) or "")[1:]
            if not cited.parent.is_dir():
                continue  # a folder this repository lacks: another repository's path (transformers' examples/pytorch)
            if not cited.exists():
                broken.append(f"{path.relative_to(ROOT)}: {match.group(0)} (no file)")
            elif anchor and cited.suffix == ".md" and anchor not in anchors(cited):
                broken.append(f"{path.relative_to(ROOT)}: {match.group(0)} (no heading)")
    assert not broken, broken
