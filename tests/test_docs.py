"""The repository documents itself: every docs/*.md path cited in the code, tests, benchmarks and README exists in
the repository, and every equation tag (E1..E9, E7.2, ...) cited there is defined in docs/method.md.

Convention of docs/method.md: an equation opens with a heading whose first word is its tag (`## E4 — ...`); a
numbered sub-item is introduced by its tag in bold (`**E7.2**`). Pure file reads, no imports of the package."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"

TEXT_SUFFIXES = {".py", ".md", ".txt", ".yaml", ".yml", ".toml", ".cfg", ".sh", ".json"}
DOC_PATH = re.compile(r"\bdocs/[A-Za-z0-9_.-]+?\.md\b")
TAG = re.compile(r"\bE[1-9](?:\.[0-9]+)?\b")
HEADING_TAG = re.compile(r"^#{1,6}\s+(E[1-9](?:\.[0-9]+)?)\b", re.MULTILINE)
BOLD_TAG = re.compile(r"\*\*(E[1-9](?:\.[0-9]+)?)\*\*")


def _sources(*roots: str, suffixes=TEXT_SUFFIXES):
    for name in roots:
        path = ROOT / name
        if path.is_file():
            yield path
            continue
        for p in sorted(path.rglob("*")):
            if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts:
                yield p


def _defined_tags() -> set[str]:
    text = METHOD.read_text(encoding="utf-8")
    return set(HEADING_TAG.findall(text)) | set(BOLD_TAG.findall(text))


def test_cited_docs_exist():
    missing = []
    for src in _sources("neuclip_ds", "tests", "benchmarks", "README.md"):
        for lineno, line in enumerate(src.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for ref in DOC_PATH.findall(line):
                if not (ROOT / ref).is_file():
                    missing.append(f"{src.relative_to(ROOT)}:{lineno}: {ref}")
    assert not missing, "cited documentation files missing from the repository:\n" + "\n".join(missing)


def test_method_doc_defines_e1_to_e9_as_headings():
    headings = set(HEADING_TAG.findall(METHOD.read_text(encoding="utf-8")))
    assert {f"E{k}" for k in range(1, 10)} <= headings
    # diagnostics.py and tests/test_diagnostics.py cite this section by name
    assert re.search(r"^#{1,6}\s+Normalizer error\s*$", METHOD.read_text(encoding="utf-8"), re.MULTILINE)


def test_every_cited_equation_is_defined():
    defined = _defined_tags()
    undefined = []
    for src in _sources("neuclip_ds", "tests", "benchmarks", "README.md", suffixes={".py", ".md"}):
        for lineno, line in enumerate(src.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for tag in TAG.findall(line):
                if tag not in defined:
                    undefined.append(f"{src.relative_to(ROOT)}:{lineno}: {tag}")
    assert not undefined, "equation tags cited but not defined in docs/method.md:\n" + "\n".join(undefined)


def test_every_sub_item_has_its_equation():
    for tag in _defined_tags():
        assert tag.split(".")[0] in _defined_tags(), f"{tag} is defined but its equation {tag.split('.')[0]} is not"
