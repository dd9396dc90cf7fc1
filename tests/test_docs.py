"""The repository documents itself: every docs/*.md path cited in the code, tests, benchmarks and README exists in
the repository, every equation tag (E1..E9, E7.2, ...) cited there is defined in docs/method.md, and every public
function and method of the package carries type hints.

Convention of docs/method.md: an equation opens with a heading whose first word is its tag (`## E4 — ...`); a
numbered sub-item is introduced by its tag in bold (`**E7.2**`). Pure file reads, no imports of the package."""

import ast
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
    for src in _sources("neuclip_ds", "tests", "benchmarks", "docs", "README.md"):
        for lineno, line in enumerate(src.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for ref in DOC_PATH.findall(line):
                if not (ROOT / ref).is_file():
                    missing.append(f"{src.relative_to(ROOT)}:{lineno}: {ref}")
    assert not missing, "cited documentation files missing from the repository:\n" + "\n".join(missing)


MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", path.read_text(encoding="utf-8"), re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def test_markdown_links_resolve():
    """Every relative link of the README and the docs names a file of the repository, and a `#anchor` names one
    of that file's headings: moving a section must not leave a dead link behind."""
    broken = []
    pages = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for lineno, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for target in MD_LINK.findall(line):
                if "://" in target or target.startswith("mailto:"):
                    continue
                file, _, anchor = target.partition("#")
                path = (page.parent / file).resolve() if file else page
                if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _heading_anchors(path)):
                    broken.append(f"{page.relative_to(ROOT)}:{lineno}: {target}")
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)


def test_method_doc_defines_e1_to_e9_as_headings():
    headings = set(HEADING_TAG.findall(METHOD.read_text(encoding="utf-8")))
    assert {f"E{k}" for k in range(1, 10)} <= headings
    # diagnostics.py and tests/test_diagnostics.py cite this section by name
    assert re.search(r"^#{1,6}\s+Normalizer error\s*$", METHOD.read_text(encoding="utf-8"), re.MULTILINE)


def test_every_cited_equation_is_defined():
    defined = _defined_tags()
    undefined = []
    for src in _sources("neuclip_ds", "tests", "benchmarks", "docs", "README.md", suffixes={".py", ".md"}):
        for lineno, line in enumerate(src.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for tag in TAG.findall(line):
                if tag not in defined:
                    undefined.append(f"{src.relative_to(ROOT)}:{lineno}: {tag}")
    assert not undefined, "equation tags cited but not defined in docs/method.md:\n" + "\n".join(undefined)


def test_every_sub_item_has_its_equation():
    for tag in _defined_tags():
        assert tag.split(".")[0] in _defined_tags(), f"{tag} is defined but its equation {tag.split('.')[0]} is not"


def _public_functions(body: list[ast.stmt], prefix: str = "", in_class: bool = False):
    """(qualified name, def node, whether it is a method) of each public function of a module or class body:
    the name does not start with `_`, or it is a special method (`__init__`, `__call__`, ...), and it is not
    inside a private class. Module-level `if`/`try` blocks are entered; function bodies (closures) are not."""
    for node in body:
        if isinstance(node, ast.ClassDef):
            if not node.name.startswith("_"):
                yield from _public_functions(node.body, f"{prefix}{node.name}.", in_class=True)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            dunder = node.name.startswith("__") and node.name.endswith("__")
            if dunder or not node.name.startswith("_"):
                yield f"{prefix}{node.name}", node, in_class
        elif isinstance(node, (ast.If, ast.Try)):
            blocks = [node.body, node.orelse, *(h.body for h in getattr(node, "handlers", []))]
            for block in [*blocks, getattr(node, "finalbody", [])]:
                yield from _public_functions(block, prefix, in_class)


def _missing_hints(node: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> list[str]:
    args = node.args
    params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
    if is_method and not static and params and params[0].arg in ("self", "cls"):
        params = params[1:]  # the instance or class: its type is the class itself
    missing = [p.arg for p in params if p.annotation is None]
    missing += [f"{star}{p.arg}" for star, p in (("*", args.vararg), ("**", args.kwarg)) if p and not p.annotation]
    return missing + (["return"] if node.returns is None else [])


def test_public_functions_have_type_hints():
    """Every public function and method of neuclip_ds annotates each parameter (self/cls aside) and its return,
    read from the source (no import: modules that need deepspeed or a GPU are checked alike)."""
    offenders = []
    for src in _sources("neuclip_ds", suffixes={".py"}):
        tree = ast.parse(src.read_text(encoding="utf-8"), filename=str(src))
        for name, node, is_method in _public_functions(tree.body):
            if missing := _missing_hints(node, is_method):
                offenders.append(f"{src.relative_to(ROOT)}:{node.lineno}: {name} ({', '.join(missing)})")
    assert not offenders, "public functions without type hints:\n" + "\n".join(offenders)


def test_type_hint_check_finds_offenders():
    """The check above catches a missing parameter or return annotation, and exempts self and closures."""
    tree = ast.parse(
        "class A:\n"
        "    def ok(self, x: int) -> int:\n"
        "        def inner(y): return y\n"
        "        return x\n"
        "    def bad(self, x, *args: int) -> None: ...\n"
        "def f(x: int, **kw): ...\n"
        "def _private(x): ...\n"
    )
    found = {name: _missing_hints(node, is_method) for name, node, is_method in _public_functions(tree.body)}
    assert found == {"A.ok": [], "A.bad": ["x"], "f": ["**kw", "return"]}
