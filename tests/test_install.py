"""neuclip_ds as a pip-installed tool: the wheel holds what a run needs (the DeepSpeed JSONs included), and
`neuclip-train` from a fresh venv runs from a directory outside the repository with its defaults."""

import json
import shutil
import site
import sys
import zipfile
from pathlib import Path

import pytest

from neuclip_ds.launch import cpu_env, run_command

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "requirements.txt", "README.md", "neuclip_ds")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (a build in the checkout would leave build/ and egg-info there)."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), "."]
    run_command(build, cwd=src)
    (whl,) = dist.glob("neuclip_ds-*.whl")
    return whl


def test_wheel_ships_the_deepspeed_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("neuclip_ds/ds_configs/")}
    assert {p.name for p in (ROOT / "neuclip_ds" / "ds_configs").glob("*.json")} == shipped
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_installed_tool_runs_outside_the_repository(wheel, tmp_path):
    # A fresh venv; its dependencies are this venv's packages (a path entry: this venv's own .pth files, among
    # them the editable install of the checkout, are not read), so neuclip_ds can only come from the wheel.
    venv = tmp_path / "venv"
    run_command([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    (purelib,) = venv.glob("lib/python*/site-packages")
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps"]
    run_command([*install, str(wheel)])

    work = tmp_path / "elsewhere"
    work.mkdir()
    run_env = {k: v for k, v in cpu_env().items() if k != "PYTHONPATH"}
    where = run_command(
        [venv / "bin" / "python", "-c", "import neuclip_ds; print(neuclip_ds.__file__)"], cwd=work, env=run_env
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    train = [str(venv / "bin" / "neuclip-train"), "--synthetic-samples", "64", "--steps", "2"]
    run_command([*train, "--global-batch-size", "16", "--output-dir", "out"], cwd=work, env=run_env, timeout=600)
    config = (work / "out" / "config.yaml").read_text()
    assert "ds_config: zero2" in config  # the default names the shipped JSON, found from outside the repository
    rows = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert (work / "out" / "summary.json").is_file()


def test_every_third_party_import_of_the_package_is_a_requirement():
    """A module the package imports only through another requirement (psutil via DeepSpeed) is still listed:
    pyproject.toml takes its dependencies from requirements.txt."""
    import ast
    import re
    from importlib.metadata import packages_distributions

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    required = {
        canonical(re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0])
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    imported = set()
    for path in (ROOT / "neuclip_ds").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"neuclip_ds", "__future__"}
    dists = packages_distributions()
    missing = {m for m in third_party if not {canonical(d) for d in dists.get(m, [m])} & required}
    assert not missing, f"imported by neuclip_ds but not in requirements.txt: {sorted(missing)}"
