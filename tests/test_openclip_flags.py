"""OpenCLIP's flag names and values mean what they mean in open_clip_train; the command line overrides the YAML
file, also across the pairs of options that say one thing two ways (--steps over a YAML's epochs)."""

import json

import pytest
import yaml

from neuclip_ds.config import ConfigError, build_parser, parse_config
from neuclip_ds.launch import launch

BASE = ["--synthetic-samples", "64", "--steps", "2"]


def resolved(args: list[str], world_size: int = 1):
    return parse_config([*BASE, *args]).validate(world_size=world_size)


def test_flag_aliases_set_our_options():
    aliases = ["--model", "tiny", "--grad-clip-norm", "0.5", "--dataset-resampled", "--accum-freq", "2"]
    cfg = resolved([*aliases, "--wandb-project-name", "clip-runs", "--ds-config", "ds_configs/zero2.json"])
    # --grad-clip-norm on the command line beats the DeepSpeed JSON's gradient_clipping (1.0 in zero2.json)
    assert cfg.preset == "tiny" and cfg.grad_clip == 0.5 and cfg.ds.gradient_clipping == 0.5
    assert cfg.data_resampled is True and cfg.ds.gradient_accumulation_steps == 2
    assert cfg.wandb_project == "clip-runs"


def test_batch_size_is_per_rank_and_micro_batch():
    cfg = resolved(["--batch-size", "4", "--accum-freq", "2"], world_size=2)
    assert cfg.global_batch_size == 4 * 2 * 2 and cfg.batch_size is None  # resolved to the one batch option
    assert resolved([]).global_batch_size == 64  # neither given
    with pytest.raises(ConfigError, match="--global-batch-size/--batch-size: give one of them"):
        resolved(["--batch-size", "4", "--global-batch-size", "16"])
    with pytest.raises(ConfigError, match="--batch-size: must be > 0"):
        resolved(["--batch-size", "0"])


@pytest.mark.parametrize(
    "given,ours", [("amp", "fp16"), ("amp_bf16", "bf16"), ("amp_bfloat16", "bf16"), ("fp32", "fp32")]
)
def test_openclip_precision_names(given, ours):
    assert resolved(["--precision", given]).precision == ours


def test_pure_bf16_needs_a_zero_optimizer(tmp_path):
    stage0 = tmp_path / "z0.json"
    stage0.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    assert resolved(["--precision", "pure_bf16", "--ds-config", "zero2"]).precision == "pure_bf16"
    with pytest.raises(ConfigError, match="--precision: pure_bf16 needs ZeRO stage 1, 2 or 3"):
        resolved(["--precision", "pure_bf16", "--ds-config", str(stage0)])


def test_resume_latest_is_auto():
    assert parse_config([*BASE, "--resume", "latest"]).resume == "auto"


def test_bare_eps_says_which_one_was_meant(tmp_path):
    with pytest.raises(ConfigError, match=r"--eps: ambiguous: .* --normalizer-eps, AdamW's is --adam-eps"):
        parse_config([*BASE, "--eps", "1e-8"])
    path = tmp_path / "run.yaml"
    path.write_text("eps: 1.0e-8\n")
    with pytest.raises(ConfigError, match=r"'eps' in .* is ambiguous"):
        parse_config(["--config", str(path)])
    assert resolved(["--normalizer-eps", "1e-10"]).normalizer_eps == 1e-10


@pytest.mark.parametrize(
    "in_yaml,on_command_line,expect",
    [
        ({"epochs": 3}, ["--steps", "5"], {"steps": 5, "epochs": None}),
        ({"steps": 5}, ["--epochs", "3"], {"steps": None, "epochs": 3}),
        ({"global_batch_size": 32}, ["--batch-size", "8"], {"global_batch_size": 8}),
        ({"save_every": 4}, ["--save-frequency", "1"], {"save_every": 0, "save_frequency": 1}),
        ({"eval_every": 4}, ["--zeroshot-frequency", "1"], {"eval_every": 0, "zeroshot_frequency": 1}),
        ({"model": "tiny", "grad_clip_norm": 2.0}, ["--grad-clip", "3"], {"preset": "tiny", "grad_clip": 3.0}),
        ({"grad_clip": 2.0}, ["--grad-clip-norm", "3"], {"grad_clip": 3.0}),
        ({"wandb_project": "a"}, ["--wandb-project-name", "b"], {"wandb_project": "b"}),
    ],
)
def test_command_line_overrides_the_yaml(tmp_path, in_yaml, on_command_line, expect):
    path = tmp_path / "run.yaml"
    length = {} if {"steps", "epochs"} & set(in_yaml) else {"steps": 2}
    path.write_text(yaml.safe_dump({"synthetic_samples": 64, **length, **in_yaml}))
    cfg = parse_config(["--config", str(path), *on_command_line]).validate(world_size=1)
    assert {k: getattr(cfg, k) for k in expect} == expect


def test_both_of_a_pair_on_the_command_line_is_an_error():
    with pytest.raises(ConfigError, match="--steps/--epochs: give one of them, not both"):
        resolved(["--epochs", "1"])
    with pytest.raises(ConfigError, match="--save-every/--save-frequency"):
        resolved(["--save-every", "2", "--save-frequency", "1"])


@pytest.mark.parametrize("value,ok", [("wandb,jsonl", True), ("jsonl", True), ("none", True), ("jsonl,none", False),
                                      ("mlflow", False), ("jsonl,tensorboard", True)])  # fmt: skip
def test_report_to_takes_comma_lists(value, ok):
    if ok:
        assert resolved(["--report-to", value]).report_to == value
    else:
        with pytest.raises(ConfigError, match="--report-to: a comma list of"):
            resolved(["--report-to", value])


def test_tokenizer_defaults_to_the_pretrained_directory(tmp_path):
    hf = tmp_path / "clip"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolved(["--pretrained-hf", str(hf)]).tokenizer is None  # no tokenizer there
    (hf / "tokenizer.json").write_text("{}")
    assert resolved(["--pretrained-hf", str(hf)]).tokenizer == str(hf)
    other = tmp_path / "tok"
    other.mkdir()
    assert resolved(["--pretrained-hf", str(hf), "--tokenizer", str(other)]).tokenizer == str(other)


def test_help_shows_each_default_once():
    for action in build_parser()._actions:
        text = action.help or ""
        assert text.count("default") <= 1 and "(default None)" not in text, (action.option_strings, text)


def test_save_frequency_counts_epochs(tmp_path):
    # 64 samples at a global batch of 16: 4 steps an epoch, so epochs 1 and 2 end at steps 4 and 8
    out = tmp_path / "run"
    args = [*BASE[:2], "--epochs", "3", "--global-batch-size", "16", "--save-frequency", "1", "--keep-last", "5"]
    launch([*args, "--output-dir", str(out)])
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert saved == ["step00000004", "step00000008", "step00000012"]
