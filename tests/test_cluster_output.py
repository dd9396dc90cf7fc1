"""What a cluster user sees (issue 15, item 4): a configuration error once per node, not once per rank; a start-up
banner; plain progress lines instead of a redrawn bar when stderr is a log file; a rounded final line; the final
evaluation in wandb; TensorBoard event files; the training plot's learning-rate, evaluation and normalizer-error
panels. Runs are tiny (synthetic data or the small digits set) and cached per module."""

import glob
import json
import re
import struct
from pathlib import Path

import pytest

from neuclip_ds import metrics as M
from neuclip_ds.config import model_state_bytes
from neuclip_ds.host_malloc import APPLIED
from neuclip_ds.launch import launch, launch_ranks
from neuclip_ds.presets import PRESETS
from neuclip_ds.rundir import previous_run, remove_previous_run

SYNTHETIC = ["--synthetic-samples", "64", "--global-batch-size", "16", "--ds-config", "zero2", "--lr", "1e-3"]


# ------------------------------------------------------------------------------------------------ errors
def test_config_error_is_printed_once_by_two_ranks_and_both_exit_2(tmp_path):
    ranks = launch_ranks(
        [*SYNTHETIC, "--steps", "2", "--npn-prototypes", "0", "--output-dir", str(tmp_path / "run")],
        nproc=2,
        timeout=120,
    )
    assert [r.returncode for r in ranks] == [2, 2]
    combined = "".join(r.stdout + r.stderr for r in ranks)
    assert combined.count("neuclip-train: error: --npn-prototypes: must be > 0") == 1, combined[-2000:]
    ours = [line for line in combined.splitlines() if line.startswith("neuclip-train:")]
    assert len(ours) == 1, combined[-2000:]  # a library's warning may say "error"; only our lines are counted


# ------------------------------------------------------------------------------------------------ a synthetic run
@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """12 steps, 1 rank, output to pipes (not a terminal), --log-every 5, the normalizer error every 6 steps."""
    out = tmp_path_factory.mktemp("plain") / "run"
    normalizer = ["--norm-err-every", "6", "--norm-err-anchors", "16"]
    proc = launch([*SYNTHETIC, "--steps", "12", "--log-every", "5", *normalizer, "--output-dir", str(out)], timeout=300)
    return proc, out


def test_startup_banner_once_before_step_1(plain_run):
    proc, out = plain_run
    err = proc.stderr
    assert err.count("neuclip-train run\n") == 1 and err.count("  parameters") == 1, err[-3000:]
    banner = dict(re.findall(r"^  (\S+(?: \S+)?)  +(.+)$", err, re.MULTILINE))
    assert banner["ranks"] == "1"
    assert banner["global batch"] == "16"
    assert banner["micro-batch"] == "16 per rank"
    assert banner["accumulation"] == "1" and banner["ZeRO stage"] == "2" and banner["precision"] == "fp32"
    assert banner["host malloc"] == APPLIED  # a CPU run, no allocator chosen in the environment
    assert banner["epoch"] == "64 samples, 4 steps"
    assert banner["output dir"] == str(out)
    counts = re.fullmatch(r"vision ([\d,]+)  text ([\d,]+)  total ([\d,]+)", banner["parameters"])
    vision, text, total = (int(n.replace(",", "")) for n in counts.groups())
    assert vision > 0 and text > 0 and vision + text < total  # the temperature comes on top
    assert banner["memory/rank"].startswith("~") and "model states" in banner["memory/rank"]
    gflop = PRESETS["tiny"].flops_per_sample() / 1e9
    assert banner["FLOPs/sample"].startswith(f"{gflop:.4g} GFLOP fwd+bwd (vision "), banner["FLOPs/sample"]
    assert re.fullmatch(r"[\d.e+-]+ TFLOPS \(measured: float32 matmul on \d+ threads; .*\)", banner["peak/rank"])
    assert err.index("  parameters") < err.index("step 5/12")


def test_metrics_have_tflops_per_rank_and_mfu(plain_run):
    """Without --peak-tflops on CPU: mfu against the matmul peak measured at start-up (one peak for every step).
    Synthetic captions are 8 words + bos + eos: --text-padding longest runs 10 of the 32 text positions."""
    _, out = plain_run
    rows = M.read_metrics(out / "metrics.jsonl")
    flops = 16 * PRESETS["tiny"].flops_per_sample(10)
    for r in rows:
        assert r["tflops_per_rank"] == pytest.approx(flops / r["step_time_s"] / 1e12)
        assert 0 < r["mfu"] < 2
    peaks = {r["tflops_per_rank"] / r["mfu"] for r in rows}
    assert max(peaks) == pytest.approx(min(peaks))


def test_metrics_have_peak_memory(plain_run):
    """On CPU peak_mem_gib is the process's peak resident set: torch and DeepSpeed alone hold well over 0.1 GiB, a
    peak so far never falls, and nothing in a tiny run comes near 64 GiB."""
    _, out = plain_run
    peaks = [r["peak_mem_gib"] for r in M.read_metrics(out / "metrics.jsonl")]
    assert len(peaks) == 12
    assert all(0.1 < p < 64 for p in peaks), peaks
    assert peaks == sorted(peaks)


def test_peak_memory_gib_on_cpu_is_the_peak_resident_set():
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert M.peak_memory_gib(torch.device("cpu")) == pytest.approx(rss, rel=0.05)


def test_plain_progress_lines_when_stderr_is_not_a_terminal(plain_run):
    proc, _ = plain_run
    assert "\r" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("step ")]
    # every 5 steps, the last, and the steps that measured the normalizer error (6, 12)
    assert [int(re.match(r"step (\d+)/12 ", ln).group(1)) for ln in lines] == [5, 6, 10, 12], lines
    line = r"step 10/12 \(83%\) loss -?\d+\.\d{4} tau [\d.]+ lr \d\.\de-\d\d \d+\.\d\d step/s eta \d+s"
    assert re.fullmatch(line, lines[2]), lines[2]
    assert [" norm_err " in ln for ln in lines] == [False, True, False, True]


def test_final_line_is_rounded(plain_run):
    proc, _ = plain_run
    (done,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("done:")]
    m = re.fullmatch(r"done: step 12 loss (-?\d+\.\d{4}) tau (\S+) norm_err \d+\.\d{4}", done)
    assert m, done
    assert len(m.group(2).lstrip("0.").replace(".", "")) <= 4  # 4 significant digits at most


def test_format_scalars_rounds_loss_and_tau():
    record = {"loss": 0.9305053353309631, "tau": 0.0703125}
    assert M.format_scalars(record) == "loss 0.9305 tau 0.07031"
    assert M.format_scalars({**record, "norm_err": 0.123456}) == "loss 0.9305 tau 0.07031 norm_err 0.1235"
    assert M.format_scalars({"loss": None, "tau": 0.07}) == "tau 0.07"


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_log_every_default_is_the_bar_on_a_terminal_and_lines_elsewhere():
    assert M.resolve_log_every(None, _Stream(tty=True)) is None
    assert M.resolve_log_every(None, _Stream(tty=False)) == M.DEFAULT_LOG_EVERY
    assert M.resolve_log_every(7, _Stream(tty=True)) == 7


def test_progress_line_of_an_evaluated_step_shows_its_headline_numbers():
    record = {"step": 100, "loss": 3.45123, "tau": 0.07123, "lr": 1.94e-3, "norm_err": 0.25}
    record.update({"eval/zeroshot/mean/top1": 0.5, "eval/zeroshot/digit/top1": 0.3})
    assert M.progress_line(record, 620, 1.84) == (
        "step 100/620 (16%) loss 3.4512 tau 0.07123 norm_err 0.2500 lr 1.9e-03 eval/zeroshot/mean/top1 0.5000 "
        "1.84 step/s eta 4m43s"  # 520 steps left / 1.84 step/s = 283 s
    )


def test_format_duration():
    assert [M.format_duration(s) for s in (0.4, 45, 271, 3720)] == ["0s", "45s", "4m31s", "1h02m"]


def test_model_state_bytes_follows_the_zero_stage():
    P, N = 1000, 4
    assert model_state_bytes(P, "fp32", 0, N) == 16 * P
    assert model_state_bytes(P, "fp32", 1, N) == 4 * P + 4 * P + 8 * P // N
    assert model_state_bytes(P, "bf16", 2, N) == 2 * P + (2 + 12) * P // N
    assert model_state_bytes(P, "bf16", 3, N) == 16 * P // N
    assert model_state_bytes(P, "pure_bf16", 3, 1) == 8 * P


# ------------------------------------------------------------------------------------------------ reporters
@pytest.fixture(scope="module")
def reported_run(small_digits, tmp_path_factory):
    """3 steps on the small digits set with an evaluation at the end, to jsonl, wandb (offline) and TensorBoard."""
    out = tmp_path_factory.mktemp("reported") / "run"
    args = [
        "--dataset-dir",
        str(small_digits),
        "--steps",
        "3",
        "--global-batch-size",
        "16",
        "--npn-prototypes",
        "16",
        "--report-to",
        "jsonl,wandb,tensorboard",
        "--wandb-offline",
        "--output-dir",
        str(out),
    ]
    launch(args, timeout=300, extra_env={"WANDB_SILENT": "true"})
    return out


def tfrecords(path: str):
    """The records of a TFRecord file (TensorBoard's event files): u64 length, u32 masked CRC of it, the data,
    u32 masked CRC of the data. The CRCs are not checked: a torn record fails to parse instead."""
    data = Path(path).read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        yield data[pos + 12 : pos + 12 + length]
        pos += 12 + length + 4


def tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in glob.glob(str(logdir / "events.out.tfevents.*")):
        for raw in tfrecords(path):
            event = Event.FromString(raw)
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def wandb_history(run_dir) -> list[dict]:
    """The history rows of an offline wandb run: its .wandb file is a LevelDB-style log (a 7-byte header, then
    32 KiB blocks of records, each a 7-byte header (CRC, length, type: full, first, middle, last) and a
    protobuf `Record`, split across blocks when it does not fit)."""
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the rest of the block is padding
            pos += left
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or last of a split record
            record = Record.FromString(parts)
            parts = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_tensorboard_event_file_holds_every_step_and_the_final_evaluation(reported_run):
    scalars = tensorboard_scalars(reported_run / "tensorboard")
    rows = M.read_metrics(reported_run / "metrics.jsonl")
    assert sorted(scalars["loss"]) == [1, 2, 3]
    for row in rows:
        assert scalars["loss"][row["step"]] == pytest.approx(row["loss"], rel=1e-6)
        assert scalars["lr"][row["step"]] == pytest.approx(row["lr"], rel=1e-6)
    results = json.loads((reported_run / "eval_results.json").read_text())
    key = "retrieval/image_to_text_R@1"  # a TensorBoard tag has no @: tensorboardX writes it as _
    assert scalars["eval/retrieval/image_to_text_R_1"] == {3: pytest.approx(results[key], rel=1e-6)}
    assert scalars["eval/zeroshot/mean/top1"] == {3: pytest.approx(results["zeroshot/mean/top1"], rel=1e-6)}


def test_final_evaluation_reaches_wandb(reported_run):
    rows = wandb_history(reported_run)
    assert [r["loss"] for r in rows] == pytest.approx(
        [r["loss"] for r in M.read_metrics(reported_run / "metrics.jsonl")]
    )
    results = json.loads((reported_run / "eval_results.json").read_text())
    last = rows[-1]
    assert last["_step"] == 3
    for key in ("retrieval/image_to_text_R@1", "retrieval/text_to_image_R@1"):
        assert last[f"eval/{key}"] == pytest.approx(results[key])


def test_overwrite_removes_the_tensorboard_directory(tmp_path):
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"")
    assert previous_run(tmp_path) == ["tensorboard/"]
    assert remove_previous_run(tmp_path) == ["tensorboard/"] and not (tmp_path / "tensorboard").exists()


# ------------------------------------------------------------------------------------------------ the plot
def test_training_plot_has_lr_evaluation_and_normalizer_error_panels(tmp_path):
    rows = []
    for step in range(1, 11):
        row = {"step": step, "loss": 5.0 / step, "tau": 0.07, "lr": 1e-3 * step, "samples_per_s": 100.0}
        row["npn_time_frac"] = 0.1
        if step % 5 == 0:  # measured and evaluated at steps 5 and 10
            row.update(norm_err=0.5, norm_err_neuclip=0.5, norm_err_mbcl=1.5)
            row.update({"eval/zeroshot/digit/top1": 0.1 * step, "eval/zeroshot/digit/top5": 0.5})
            row.update({"eval/retrieval/image_to_text_R@1": 0.02 * step, "eval/retrieval/text_to_image_R@1": 0.2})
        rows.append(row)
    final = (10, {"zeroshot/digit/top1": 0.9, "retrieval/image_to_text_R@1": 0.3, "num_samples": 32})
    fig = M.training_figure(rows, final_eval=final)
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == [
        "loss",
        "temperature tau",
        "learning rate",
        "samples / s",
        "NPN share of step time",
        "normalizer error (nats)",
        "evaluation",
    ]
    assert list(axes["learning rate"].lines[0].get_ydata()) == pytest.approx([r["lr"] for r in rows])
    assert sorted(line.get_label() for line in axes["normalizer error (nats)"].lines) == ["mbcl", "neuclip"]
    evals = {line.get_label(): line for line in axes["evaluation"].lines}
    assert sorted(evals) == ["retrieval/image_to_text_R@1", "retrieval/text_to_image_R@1", "zeroshot/digit/top1"]
    digit = evals["zeroshot/digit/top1"]
    assert list(digit.get_xdata()) == [5, 10, 10] and list(digit.get_ydata()) == pytest.approx([0.5, 1.0, 0.9])
    import matplotlib.pyplot as plt

    plt.close(fig)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = M.plot_training(path, tmp_path / "plots" / "training.png", final)
    assert png.stat().st_size > 0
