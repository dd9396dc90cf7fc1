"""The command line, frozen: `neuclip-train --help` and the resolved config of each configs/*.yaml are compared
with the copies checked in under tests/frozen/, so that no flag, default, help text or resolved value (ZeRO stage,
accumulation, clipping, the data a --dataset-dir fills in) changes by accident. After an intended change,
regenerate them and review the diff with the change:

    NEUCLIP_REGEN_FROZEN=1 python -m pytest tests/test_frozen_cli.py && git diff tests/frozen/

argparse's layout differs between Python versions: the copies are those of the project's venv (Python 3.11)."""

import dataclasses
import difflib
import json
import os
from pathlib import Path

import pytest

from neuclip_ds.config import SHIPPED_DS_CONFIGS, build_parser, parse_config

ROOT = Path(__file__).resolve().parent.parent
FROZEN = ROOT / "tests" / "frozen"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
REGEN = os.environ.get("NEUCLIP_REGEN_FROZEN") == "1"


@pytest.fixture(autouse=True)
def fixed_environment(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs' paths are relative to the repository
    monkeypatch.setenv("COLUMNS", "120")  # argparse wraps --help at the terminal's width
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)  # would replace --ds-config


def resolved_config(path: Path) -> str:
    """The options and the DeepSpeed settings the run would use, as JSON; paths relative to the repository."""
    cfg = parse_config(["--config", str(path.relative_to(ROOT))]).resolve()
    text = json.dumps({"options": cfg.to_dict(), "deepspeed": dataclasses.asdict(cfg.ds)}, indent=2) + "\n"
    if cfg.dataset_dir is not None:  # --dataset-dir fills in absolute paths: back to the one given
        text = text.replace(str(Path(cfg.dataset_dir).resolve()), cfg.dataset_dir)
    return text.replace(str(SHIPPED_DS_CONFIGS), "<neuclip_ds>/ds_configs")  # wherever the package is installed


def check_frozen(name: str, current: str) -> None:
    path = FROZEN / name
    if REGEN:
        path.write_text(current)
        return
    regen = "NEUCLIP_REGEN_FROZEN=1 python -m pytest tests/test_frozen_cli.py, then commit tests/frozen/"
    assert path.is_file(), f"tests/frozen/{name} is missing: if this is new, create it with {regen}"
    frozen = path.read_text()
    if current != frozen:
        diff = "".join(
            difflib.unified_diff(frozen.splitlines(True), current.splitlines(True), f"tests/frozen/{name}", "now")
        )
        pytest.fail(f"the command line changed:\n{diff}\nIf the change is intended: {regen}", pytrace=False)


def test_help_is_frozen():
    check_frozen("help.txt", build_parser().format_help())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_resolved_config_is_frozen(path, default_digits):
    check_frozen(f"{path.stem}.json", resolved_config(path))


def test_every_frozen_config_has_its_yaml():
    stale = {p.stem for p in FROZEN.glob("*.json")} - {p.stem for p in CONFIGS}
    assert not stale, f"tests/frozen/ holds {sorted(stale)} without a configs/*.yaml: remove them"
