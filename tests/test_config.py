"""Configuration: YAML + overrides, and every error found before any process group starts (one line, exit 2)."""

import json
import os

import pytest
import torch.distributed as dist

from neuclip_ds import config
from neuclip_ds.config import ConfigError, TrainConfig, parse_config
from neuclip_ds.launch import launch
from neuclip_ds.presets import PRESETS
from neuclip_ds.train import main

OK = ["--synthetic-samples", "64", "--steps", "2", "--global-batch-size", "16", "--ds-config", "ds_configs/zero2.json"]


def run_main(capsys, args, world_size=None, monkeypatch=None):
    if world_size is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert not dist.is_initialized()  # nothing started
    return code, err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--preset", "ViT-Z-99"], "--preset: unknown preset 'ViT-Z-99'"),
        (["--npn-prototypes", "0"], "--npn-prototypes: must be > 0"),
        (["--npn-prototypes", "-5"], "--npn-prototypes: must be > 0"),
        (["--train-data", "/nonexistent/{00000..00003}.tar", "--train-num-samples", "10"], "--train-data: no shard"),
        (["--loss", "infonce"], "--loss: must be one of neuclip, fastclip, mbcl, siglip, got 'infonce'"),
        (["--ds-config", "/nonexistent.json"], "--ds-config: file not found"),
        (["--tau-min", "0.5", "--init-tau", "0.07"], "--init-tau: must lie in"),
        (["--precision", "fp8"], "--precision: must be one of"),
        (["--lr-tau", "0"], "--lr-tau: must be > 0"),
        (["--lr-tau=-1e-3"], "--lr-tau: must be > 0"),
        (["--lr-tau", "nan"], "--lr-tau: must be a finite number"),
        (["--lr-tau", "inf"], "--lr-tau: must be a finite number"),
        (["--lr", "inf"], "--lr: must be a finite number"),
        (["--tau-min", "0.5", "--tau-max", "0.5", "--init-tau", "0.5"], "--tau-min: must be below --tau-max"),
        (["--tau-min", "0.6", "--tau-max", "0.5"], "--tau-min: must be below --tau-max"),
        (["--init-tau", "2.0"], "--init-tau: must lie in"),
        (["--tau-param", "exp"], "--tau-param: must be log or raw"),
        (["--lr-tau-schedule", "linear"], "--lr-tau-schedule: must be cosine or step_thresh"),
        (["--lr", "ten"], "--lr: expected a number, got 'ten'"),
        (["--seed", "1.5"], "--seed: expected an integer, got '1.5'"),
        (["--log-every", "0"], "--log-every: must be > 0, got 0"),
        (["--peak-tflops", "0"], "--peak-tflops: must be > 0, got 0"),
        (["--profile-steps", "3"], "--profile-steps: expected FIRST:LAST (step numbers, e.g. 5:8), got '3'"),
        (["--profile-steps", "0:2"], "--profile-steps: need 1 <= FIRST <= LAST, got '0:2'"),
        (["--profile-steps", "5:4"], "--profile-steps: need 1 <= FIRST <= LAST, got '5:4'"),
        (["--global-batch-size", "1"], "--global-batch-size: need at least 2 pairs for negatives"),
    ],
)
def test_config_errors_are_one_line_exit_2(capsys, args, needle):
    code, err = run_main(capsys, OK + args)
    assert code == 2
    assert len(err) == 1 and needle in err[0], err


def test_batch_not_divisible_by_ranks(capsys, monkeypatch):
    code, err = run_main(capsys, [*OK, "--global-batch-size", "15"], world_size=2, monkeypatch=monkeypatch)
    assert code == 2 and "--global-batch-size: 15 is not divisible by ranks x accumulation = 2 x 1" in err[0]


def test_unknown_zero_stage(capsys, tmp_path):
    bad = tmp_path / "z7.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    code, err = run_main(capsys, [*OK, "--ds-config", str(bad)])
    assert code == 2 and len(err) == 1 and "unknown ZeRO stage 7" in err[0]


def test_batch_not_divisible_by_ranks_times_accumulation(capsys, tmp_path, monkeypatch):
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"gradient_accumulation_steps": 3, "zero_optimization": {"stage": 2}}))
    code, err = run_main(capsys, [*OK, "--ds-config", str(acc)], world_size=2, monkeypatch=monkeypatch)
    assert code == 2 and "not divisible by ranks x accumulation = 2 x 3" in err[0]


def test_micro_batch_is_the_global_batch_over_ranks_and_accumulation(tmp_path):
    from neuclip_ds.engine import build_ds_config

    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"gradient_accumulation_steps": 3, "zero_optimization": {"stage": 2}}))
    args = [*OK, "--ds-config", str(acc), "--global-batch-size", "48", "--output-dir", str(tmp_path / "run")]
    cfg = parse_config(args).validate(world_size=2)
    assert cfg.micro_batch(2) == 8 == build_ds_config(cfg, 2)["train_micro_batch_size_per_gpu"]


def test_missing_data(capsys):
    code, err = run_main(capsys, ["--steps", "2"])
    assert code == 2 and "--train-data: no training data" in err[0]


def test_yaml_with_command_line_overrides(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("preset: tiny\nnpn-prototypes: 128\nlr: 0.01\nloss: fastclip\n")
    cfg = parse_config(["--config", str(cfg_file), "--lr", "0.002", "--steps", "3"])
    assert (cfg.npn_prototypes, cfg.lr, cfg.loss, cfg.steps) == (128, 0.002, "fastclip", 3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("npn_protoypes: 3\n")
    with pytest.raises(ValueError, match="unknown option 'npn_protoypes'"):
        parse_config(["--config", str(bad)])
    assert TrainConfig().npn_prototypes == 4096


def test_cli_exit_code_and_grouped_help():
    proc = launch(["--npn-prototypes", "0", *OK[:2]], check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    help_text = launch(["--help"], check=False).stdout
    for group in ("model:", "loss:", "NPN (NeuCLIP):", "data:", "optimization:", "system:"):
        assert group in help_text


# ------------------------------------------------------------------------------------------------ value types
def yaml_config(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text,message",
    [
        ("lr: ten", "--lr: expected a number, got 'ten'"),
        ("seed: [1, 2]", "--seed: expected an integer, got [1, 2]"),
        ("steps: 2.5", "--steps: expected an integer, got 2.5"),
        ("npn_prototypes: true", "--npn-prototypes: expected an integer, got True"),
        ("grad_checkpointing: maybe", "--grad-checkpointing: expected true or false, got 'maybe'"),
        ("train_data: [a.tar, b.tar]", "--train-data: expected a string, got ['a.tar', 'b.tar']"),
        ("lr:", "--lr: expected a number, got None"),
        (
            "zero_init: on",
            "--zero-init: expected a string, got True (YAML reads on/off/yes/no as true/false: quote it)",
        ),
    ],
)
def test_yaml_value_of_the_wrong_type_names_the_option(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", yaml_config(tmp_path, text + "\n")])
    assert str(err.value) == message


def test_yaml_numbers_written_as_strings(tmp_path):
    # YAML reads 1e-3 (no dot) as a string; quoted numbers and integral floats are numbers too
    cfg = parse_config(
        [
            "--config",
            yaml_config(tmp_path, "lr: 1e-3\nnpn_lr: '0.1'\nsteps: 1e3\nseed: 7.0\nlr_tau: ~\noutput_dir: 2024\n"),
        ]
    )
    assert (cfg.lr, cfg.npn_lr, cfg.steps, cfg.seed, cfg.lr_tau, cfg.output_dir) == (1e-3, 0.1, 1000, 7, None, "2024")
    assert [type(v) for v in (cfg.lr, cfg.npn_lr, cfg.steps, cfg.seed)] == [float, float, int, int]


# ------------------------------------------------------------------------------------------------ output directory
def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(
        ConfigError,
        match=r"--output-dir: cannot create .*notes.txt/run: .*notes.txt is not a "
        r"directory",
    ):
        parse_config([*OK, "--output-dir", str(tmp_path / "notes.txt" / "run")]).validate()


def test_output_dir_without_write_permission_is_refused(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # what a read-only directory does (root would pass chmod 0o500)
        if os.path.dirname(os.fspath(path)) == str(locked):
            raise PermissionError(13, "Permission denied", path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(ConfigError, match=f"--output-dir: cannot create {locked}/a/b in {locked}: Permission denied"):
        parse_config([*OK, "--output-dir", str(locked / "a" / "b")]).validate()
    with pytest.raises(ConfigError, match=f"--output-dir: cannot write to {locked}: Permission denied"):
        parse_config([*OK, "--output-dir", str(locked)]).validate()


def test_output_dir_check_leaves_nothing_behind(tmp_path):
    (tmp_path / "existing").mkdir()
    for out in (tmp_path / "existing", tmp_path / "new" / "run"):
        parse_config([*OK, "--output-dir", str(out)]).validate()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["existing"]


# ------------------------------------------------------------------------------------------------ DeepSpeed JSON
def ds_json(tmp_path, zero: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    return str(path)


def test_unknown_zero_optimization_key_with_suggestion(tmp_path):
    path = ds_json(tmp_path, {"stage": 2, "overlap_com": True})
    with pytest.raises(ConfigError) as err:
        parse_config([*OK, "--ds-config", path]).validate()
    assert str(err.value) == (
        f"--ds-config: unknown key 'overlap_com' in zero_optimization of {path} (did you mean 'overlap_comm'?)"
    )
    with pytest.raises(ConfigError, match=r"unknown key 'frobnicate' in zero_optimization of .*ds.json$"):
        parse_config([*OK, "--ds-config", ds_json(tmp_path, {"stage": 2, "frobnicate": 1})]).validate()


def test_zero_optimization_aliases_and_deprecated_names_pass(tmp_path):
    # the names DeepSpeed itself takes: stage3_* aliases, deprecated cpu_offload
    zero = {
        "stage": 3,
        "stage3_prefetch_bucket_size": 1000,
        "prefetch_bucket_size": 1000,
        "cpu_offload": False,
        "overlap_comm": True,
    }
    parse_config([*OK, "--ds-config", ds_json(tmp_path, zero)]).validate()


# ------------------------------------------------------------------------------------------------ shards
@pytest.fixture
def shard_dir(tmp_path):
    for i in range(4):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    return tmp_path


def with_data(spec: str, *extra: str) -> TrainConfig:
    rest = "--train-num-samples 10 --tokenizer data/digits/tokenizer --steps 2 --global-batch-size 16".split()
    return parse_config(["--train-data", spec, *rest, *extra])


def test_shard_glob_is_accepted_and_an_empty_one_refused(shard_dir, default_digits):
    with_data(f"{shard_dir}/*.tar").validate(world_size=2)
    with pytest.raises(ConfigError, match=r"--train-data: no shard matches '.*/\*\.zip'"):
        with_data(f"{shard_dir}/*.zip").validate()


def test_val_data_needs_a_tokenizer_even_with_synthetic_training_data(shard_dir, default_digits):
    """Evaluation tokenizes the class prompts and captions: without a tokenizer it would fail after training."""
    val = ["--val-data", f"{shard_dir}/{{00000..00003}}.tar"]
    with pytest.raises(
        ConfigError, match=r"^--tokenizer: required with --val-data \(a local HF tokenizer directory\)$"
    ):
        parse_config([*OK, *val]).validate()
    parse_config([*OK, *val, "--tokenizer", "data/digits/tokenizer"]).validate()


@pytest.mark.parametrize(
    "change,message",
    [
        ({"name": "someone-elses", "version": "1"}, r"is not a neuclip-digits v\S+ manifest \('someone-elses' v1\)"),
        ({"splits": {"train": {"shards": "train/x.tar"}}}, r"splits\.train needs shards and num_samples >= 1"),
        ({"tokenizer": "../../elsewhere"}, r"tokenizer '\.\./\.\./elsewhere' leads outside"),
        ({"tokenizer": "/etc"}, r"tokenizer '/etc' leads outside"),
        ({"classnames": None}, r"classnames must be a relative path, got None"),
    ],
)
def test_a_foreign_or_malformed_dataset_json_is_one_line(tmp_path, default_digits, change, message):
    manifest = json.loads((default_digits / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps(dict(manifest, **change)))
    with pytest.raises(ConfigError, match=r"^--dataset-dir: .*" + message) as err:
        parse_config([*OK, "--dataset-dir", str(tmp_path)]).validate()
    assert "\n" not in str(err.value)


def test_shards_that_are_not_readable_files_are_refused(tmp_path):
    for name in ("00000.tar", "00001.tar"):
        (tmp_path / name).mkdir()
    with pytest.raises(
        ConfigError,
        match=r"--train-data: none of the 3 shard\(s\) of .* is a readable file \(2 of "
        r"them exist",
    ):
        with_data(f"{tmp_path}/{{00000..00002}}.tar").validate()


def test_fewer_shards_than_ranks_times_workers(shard_dir, default_digits):
    spec = f"{shard_dir}/{{00000..00003}}.tar"
    with pytest.raises(ConfigError) as err:
        with_data(spec, "--workers", "3").validate(world_size=2)
    assert str(err.value) == (
        "--train-data: 4 readable shard(s) for 2 rank(s) x 3 worker(s): give at least 6 "
        "shards, fewer --workers, or --data-resampled"
    )
    with_data(spec, "--workers", "3", "--data-resampled").validate(world_size=2)
    with_data(spec, "--workers", "2").validate(world_size=2)


# ------------------------------------------------------------------------------------------------ sizes that cannot fit
GiB = 2**30


@pytest.fixture
def host(monkeypatch):
    """1 GiB of host memory available, no CUDA."""
    monkeypatch.setattr(config, "uses_cuda", lambda: False)
    monkeypatch.setattr(config, "_host_bytes_available", lambda: GiB)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)


def test_npn_that_cannot_fit_is_refused(host):
    # tiny preset: d = 64; 5 copies (params, grads, AdaGrad sums, the step's snapshot of params and sums) of 2 m d
    with pytest.raises(ConfigError) as err:
        parse_config([*OK, "--npn-prototypes", "1000000"]).validate()
    assert str(err.value) == (
        "--npn-prototypes: 1000000 prototypes need ~2.4 GiB per rank, more than the 1.0 GiB of host memory available"
    )
    parse_config([*OK, "--npn-prototypes", "100000"]).validate()  # 0.24 GiB
    parse_config([*OK, "--npn-prototypes", "1000000", "--npn-variant", "mlp"]).validate()  # no prototypes


def test_npn_on_gpu_is_compared_with_gpu_memory(host, monkeypatch):
    monkeypatch.setattr(config, "uses_cuda", lambda: True)
    monkeypatch.setattr(config, "_gpu_bytes", lambda: 2 * GiB)
    with pytest.raises(
        ConfigError,
        match=r"--npn-prototypes: 100000 prototypes need ~2.9 GiB per rank, more than "
        r"the 2.0 GiB of GPU memory$",
    ):
        parse_config([*OK, "--preset", "ViT-L-14", "--npn-prototypes", "100000"]).validate()  # d = 768
    parse_config([*OK, "--npn-prototypes", "500000"]).validate()  # 1.2 GiB: on the GPU, not the 1 GiB host


def test_fastclip_tables_that_cannot_fit_are_refused(host, monkeypatch):
    args = [*OK, "--loss", "fastclip", "--dataset-size"]
    # 2 tables, 4 bytes, 1/8 of 2 x 10^9 samples per rank (the step's snapshot holds the batch's rows only)
    parse_config([*args, "10000000"]).validate(world_size=8)
    with pytest.raises(ConfigError) as err:
        parse_config([*args, "2000000000"]).validate(world_size=8)
    assert str(err.value) == (
        "--dataset-size: FastCLIP's u tables for 2000000000 samples need ~1.9 GiB per rank, "
        "more than the 1.0 GiB of host memory available"
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks of one host share its memory
    with pytest.raises(ConfigError, match=r"need ~0.1 GiB per rank x 8 ranks on this host, more than the 1.0 GiB"):
        parse_config([*args, "160000000"]).validate(world_size=8)


def test_reasonable_sizes_pass_with_this_machines_memory():
    for preset in ("tiny", "ViT-B-32", "ViT-H-14"):
        parse_config([*OK, "--preset", preset]).validate()  # default m = 4096
    parse_config([*OK, "--loss", "fastclip", "--dataset-size", "10000000"]).validate()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--config", "BAD_YAML"], "--lr: expected a number, got 'ten'"),
        (["--npn-prototypes", "1000000000"], "--npn-prototypes: 1000000000 prototypes need ~2384.2 GiB per rank"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_from_the_command_line(tmp_path, args, needle):
    args = [yaml_config(tmp_path, "lr: ten\n") if a == "BAD_YAML" else a for a in args]
    proc = launch([*OK, "--output-dir", str(tmp_path / "run"), *args], check=False, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"neuclip-train: error: {needle}"), proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ choices
CHOICE_OPTIONS = sorted(name for name, kind in config._KINDS.items() if kind.choices)


@pytest.mark.parametrize("name", CHOICE_OPTIONS)
def test_every_choice_option_is_checked_from_its_literal(name):
    choices = config._KINDS[name].choices
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError) as err:
        parse_config([*OK, flag, "bogus"]).validate()
    assert str(err.value).startswith(f"{flag}: must be ") and str(err.value).endswith(", got 'bogus'")
    assert all(choice in str(err.value) for choice in choices)
    assert "{" + ",".join(choices) + "}" in config.build_parser().format_help()  # the metavar shows them


# ------------------------------------------------------------------------------------------------ resolution
def test_validate_leaves_the_config_as_given_and_returns_it_resolved(tmp_path, default_digits):
    given = parse_config(["--dataset-dir", "data/digits", "--steps", "2", "--output-dir", str(tmp_path / "run")])
    before = given.to_dict()
    resolved = given.validate(world_size=1)
    assert given.to_dict() == before and given.ds is None and given.train_data is None
    assert resolved.train_data.endswith(".tar") and resolved.tokenizer and resolved.train_num_samples > 0
    assert (resolved.ds.zero_stage, resolved.ds.gradient_accumulation_steps) == (2, 1)
    assert resolved.dataset_size == resolved.train_num_samples  # a --dataset-dir fills the size in as well


def test_grad_clip_overrides_the_json_and_the_resolved_value_is_what_deepspeed_gets(tmp_path):
    from neuclip_ds.engine import build_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 2.0, "zero_optimization": {"stage": 1}}))
    for extra, clipping in (([], 2.0), (["--grad-clip", "0.5"], 0.5), (["--grad-clip", "0"], 0.0)):
        cfg = parse_config([*OK, "--ds-config", str(path), *extra]).validate()
        assert cfg.ds.gradient_clipping == clipping
        assert build_ds_config(cfg, 1)["gradient_clipping"] == clipping
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert parse_config([*OK, "--ds-config", str(path)]).resolve().ds.gradient_clipping == 0.0  # DeepSpeed's: off


@pytest.mark.parametrize(
    "args,json_clipping,message",
    [
        (["--grad-clip", "-1"], 1.0, "--grad-clip: must be >= 0, got -1.0"),
        ([], "1.0", "--ds-config: gradient_clipping must be a number >= 0, got '1.0'"),
        ([], -2, "--ds-config: gradient_clipping must be a number >= 0, got -2"),
    ],
)
def test_bad_clipping_is_refused(tmp_path, args, json_clipping, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": json_clipping, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError) as err:
        parse_config([*OK, "--ds-config", str(path), *args]).validate()
    assert str(err.value) == message


def test_build_ds_config_leaves_the_resolved_json_untouched():
    from neuclip_ds.engine import build_ds_config

    cfg = parse_config(OK).validate()
    before = json.dumps(cfg.ds.settings)
    build_ds_config(cfg, 1)["zero_optimization"]["stage"] = 3  # as benchmarks/memory.py edits its copy
    assert json.dumps(cfg.ds.settings) == before


def test_config_yaml_holds_the_options_only():
    cfg = parse_config(OK).validate()
    assert "ds" not in cfg.to_dict() and set(cfg.to_dict()) == set(config._KINDS)


def _documented_train_commands() -> list[tuple[str, list[str]]]:
    """(where, neuclip-train argv) of every training command in a bash block of the README and docs/: direct
    `neuclip-train` calls and the launchers' (`single_node.sh N ...`, `sbatch slurm.sbatch ...`), continuations
    joined."""
    import re
    import shlex

    from neuclip_ds.launch import REPO_ROOT

    found = []
    for doc in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                for i, word in enumerate(words):
                    if word.endswith("neuclip-train") or word.endswith("slurm.sbatch"):
                        found.append((f"{doc.name}: {line.strip()}", words[i + 1 :]))
                    elif word.endswith("single_node.sh"):
                        found.append((f"{doc.name}: {line.strip()}", words[i + 2 :]))
    return found


def test_documented_training_commands_parse(monkeypatch):
    """A command a user copies from the README or docs/ names only options that exist, with valid values, and
    the configs it names load."""
    from neuclip_ds.launch import REPO_ROOT

    monkeypatch.chdir(REPO_ROOT)
    commands = _documented_train_commands()
    assert len(commands) >= 3, commands  # the README's own-data and N-GPU examples at least
    for where, argv in commands:
        try:
            cfg = parse_config(argv)
        except (ConfigError, SystemExit) as e:
            raise AssertionError(f"{where}\n  -> {e}") from e
        assert cfg.preset in PRESETS, where
