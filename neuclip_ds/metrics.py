"""Run outputs on rank 0: metrics.jsonl (one JSON line per optimizer step), wandb and TensorBoard (when asked),
progress on stderr (a tqdm bar on a terminal, plain lines in a log file), and the training plots."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import typing
import warnings
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import atomic_write
from .config import DEFAULT_LOG_EVERY
from .rundir import RunFiles

if typing.TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure


def resolve_log_every(log_every: int | None, stream: typing.TextIO | None = None) -> int | None:
    """Steps between plain progress lines, or None for the tqdm bar. --log-every when given; unset, the bar on a
    terminal and a line every DEFAULT_LOG_EVERY steps otherwise: in a log file the bar's carriage-return redraws
    pile up as one ever-growing line that neither `tail` nor a browser shows usefully."""
    if log_every is not None:
        return log_every
    stream = sys.stderr if stream is None else stream
    return None if stream.isatty() else DEFAULT_LOG_EVERY


def format_scalars(record: dict) -> str:
    """loss (4 decimals), tau (4 significant digits) and norm_err when measured: the words of the progress lines
    and of the final `done:` line alike."""
    parts = []
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4f}")
    if record.get("tau") is not None:
        parts.append(f"tau {record['tau']:.4g}")
    if record.get("norm_err") is not None:
        parts.append(f"norm_err {record['norm_err']:.4f}")
    return " ".join(parts)


def format_duration(seconds: float) -> str:
    """4m31s, 1h02m, 45s: an eta, as precise as it is worth."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def peak_memory_gib(device: torch.device) -> float:
    """The most memory this process has held so far, in GiB (2^30 bytes): on CUDA the tensors allocated on
    `device` (torch.cuda.max_memory_allocated: what the run's tensors needed, not the allocator's cache); elsewhere
    the process's peak resident set (ru_maxrss, KiB on Linux), which also counts the interpreter and libraries."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# an evaluation's numbers in a progress line (all of them are in metrics.jsonl)
HEADLINE_EVAL = ("eval/zeroshot/mean/top1", "eval/retrieval/image_to_text_R@1", "eval/retrieval/text_to_image_R@1")


def progress_line(record: dict, total_steps: int, steps_per_s: float) -> str:
    """`step 100/620 (16%) loss 3.4512 tau 0.0712 lr 1.9e-03 1.84 step/s eta 4m43s`, with the HEADLINE_EVAL numbers
    after the learning rate at a step that evaluated; steps_per_s over the steps since the previous line, so that
    the rate and eta follow the run's current pace."""
    step = record["step"]
    words = [f"step {step}/{total_steps} ({step / total_steps:.0%})", format_scalars(record)]
    if record.get("lr") is not None:
        words.append(f"lr {record['lr']:.1e}")
    words += [f"{key} {record[key]:.4f}" for key in HEADLINE_EVAL if record.get(key) is not None]
    if steps_per_s > 0:
        words.append(f"{steps_per_s:.2f} step/s eta {format_duration((total_steps - step) / steps_per_s)}")
    return " ".join(w for w in words if w)


class MetricsLogger:
    def __init__(
        self,
        output_dir: str | Path,
        *,
        rank: int,
        total_steps: int,
        report_to: str = "jsonl",
        config: dict | None = None,
        wandb_project: str = "neuclip_ds",
        wandb_offline: bool = False,
        initial_step: int = 0,
        resume: bool = False,
        log_every: int | None = None,
        run_id: str | None = None,
    ) -> None:
        """`run_id`: the run's id (kept across resumes), the wandb run's id, so that a resumed run continues its
        wandb run instead of starting another one."""
        self.rank = rank
        files = RunFiles(Path(output_dir))
        self.path = files.metrics
        self.total_steps = total_steps
        self.file = None
        self.bar = None
        self.wandb = None
        self.tensorboard = None
        self.log_every = resolve_log_every(log_every)
        self._last_line = (initial_step, time.perf_counter())  # step and time of the previous progress line
        self._last_norm_err = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.exists():
            self._truncate_after(initial_step)
        reporters = report_to.split(",")
        try:  # a reporter that fails to start leaves nothing open
            if "wandb" in reporters:
                if wandb_offline:
                    os.environ["WANDB_MODE"] = "offline"
                import wandb

                self.wandb = wandb.init(
                    project=wandb_project,
                    config=config,
                    dir=str(output_dir),
                    name=Path(output_dir).name,
                    id=run_id,
                    resume="allow",
                )
            if "tensorboard" in reporters:
                from tensorboardX import SummaryWriter

                # on resume, events past the checkpoint's step are dropped as metrics.jsonl's lines are (recomputed)
                self.tensorboard = SummaryWriter(
                    logdir=str(files.tensorboard), purge_step=initial_step + 1 if resume else None
                )
            self.file = open(self.path, "a" if resume else "w", buffering=1)  # noqa: SIM115 (closed in close())
            if self.log_every is None:
                self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)
        except BaseException:
            self.close()
            raise

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be recomputed) and any torn line (a kill
        mid-write): appending after a line with no newline would glue the next record to it. Atomically, so that a
        kill here leaves the old file, not an empty one."""
        kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= step]
        atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def _report(self, scalars: dict, step: int) -> None:
        """Numbers to wandb and TensorBoard (those asked for)."""
        numbers = {k: v for k, v in scalars.items() if isinstance(v, (int, float))}
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.tensorboard is not None:
            for key, value in numbers.items():
                if key != "step":  # the x axis of every scalar already
                    self.tensorboard.add_scalar(key, value, global_step=step)

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self._report(clean, record["step"])
        if clean.get("norm_err") is not None:
            self._last_norm_err = clean["norm_err"]
        if self.bar is not None:
            self._update_bar(clean)
        else:
            self._maybe_print_line(clean)

    def _update_bar(self, record: dict) -> None:
        self.bar.update(1)
        if record.get("loss") is not None:
            postfix = {"loss": f"{record['loss']:.4f}", "tau": f"{record['tau']:.4g}"}
            if self._last_norm_err is not None:  # measured every --norm-err-every steps: the latest stays shown
                postfix["norm_err"] = f"{self._last_norm_err:.4f}"
            postfix["npn"] = f"{record.get('npn_time_frac', 0):.1%}"
            self.bar.set_postfix(postfix)

    def _maybe_print_line(self, record: dict) -> None:
        """A line every --log-every steps and at the last step; also at a step that measured the normalizer error
        or evaluated, whose numbers would otherwise reach the log only if the step fell on the interval."""
        step = record["step"]
        measured = record.get("norm_err") is not None or any(k.startswith("eval/") for k in record)
        if not (step % self.log_every == 0 or step == self.total_steps or measured):
            return
        last_step, last_time = self._last_line
        now = time.perf_counter()
        rate = (step - last_step) / (now - last_time) if now > last_time else 0.0
        self._last_line = (step, now)
        print(progress_line(record, self.total_steps, rate), file=sys.stderr, flush=True)

    def log_evaluation(self, results: dict, step: int) -> None:
        """The final evaluation (eval_results.json) to wandb and TensorBoard, under the eval/... names of the
        periodic ones, at the run's last step."""
        if self.rank == 0:
            self._report({f"eval/{k}": v for k, v in results.items() if k != "num_samples"}, step)

    def note(self, text: str) -> None:
        """A message of rank 0's, on its own line (above the progress bar, where a plain print would be glued
        to it)."""
        if self.rank == 0:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.file = self.bar = self.wandb = self.tensorboard = None


def parse_metrics(text: str, *, source: str = "metrics.jsonl") -> list[dict]:
    """The records of metrics.jsonl's text, skipping lines that are not a JSON object: a last line cut short by a
    kill (or a full disk) mid-write is expected and skipped silently; one elsewhere is warned about (once)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    rows, torn = [], []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            torn.append(number)
    if torn and torn != [len(lines)]:
        warnings.warn(
            f"{source}: skipped {len(torn)} line(s) that are not JSON records (line {torn[0]} first)", stacklevel=2
        )
    return rows


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (`parse_metrics`: torn lines skipped)."""
    return parse_metrics(Path(path).read_text(), source=str(path))


# the eval panel's lines: the headline numbers of evaluate.py (each zero-shot attribute's top-1, their mean, R@1
# both ways); the rest stay in metrics.jsonl and eval_results.json
def _is_headline_eval(key: str) -> bool:
    return (key.startswith("eval/zeroshot/") and key.endswith("/top1")) or key.endswith("_R@1")


def training_figure(rows: list[dict], final_eval: tuple[int, dict] | None = None) -> Figure:
    """Against the step: loss, tau, learning rate, throughput, MFU (or TFLOPS per rank without a peak; when
    logged) and the NPN's share of the step; the normalizer error
    (`norm_err_*` columns) and the evaluations (eval/... columns of the periodic ones, plus `final_eval` = (step,
    evaluate()'s results)) when present. Sparse series are drawn as points joined by lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    evals = [(r["step"], {k: v for k, v in r.items() if k.startswith("eval/")}) for r in rows]
    if final_eval is not None:
        evals.append((final_eval[0], {f"eval/{k}": v for k, v in final_eval[1].items()}))
    evals = [(step, values) for step, values in evals if values]
    panels = [
        ("loss", "loss"),
        ("tau", "temperature tau"),
        ("lr", "learning rate"),
        ("samples_per_s", "samples / s"),
        ("npn_time_frac", "NPN share of step time"),
    ]
    # model FLOPs utilization when the peak was known (flops.py), else the achieved TFLOPS when logged
    if any(r.get("mfu") is not None for r in rows):
        panels.insert(4, ("mfu", "MFU (model FLOPs / peak)"))
    elif any(r.get("tflops_per_rank") is not None for r in rows):
        panels.insert(4, ("tflops_per_rank", "TFLOPS per rank"))
    sparse = {}  # panel key -> (label, [(step, value or None)]) of each line drawn there
    norm_err_keys = sorted({k for r in rows for k in r if k.startswith("norm_err_") and r[k] is not None})
    if norm_err_keys:
        panels.append(("norm_err", "normalizer error (nats)"))
        sparse["norm_err"] = [
            (k.removeprefix("norm_err_"), [(r["step"], r.get(k)) for r in rows]) for k in norm_err_keys
        ]
    eval_keys = sorted({k for _, values in evals for k in values if _is_headline_eval(k)})
    if eval_keys:
        panels.append(("eval", "evaluation"))
        sparse["eval"] = [(k.removeprefix("eval/"), [(s, v.get(k)) for s, v in evals]) for k in eval_keys]
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(panels) :]:  # an incomplete last row: no empty frames
        ax.remove()
    for ax, (key, title) in zip(axes, panels):
        if key in sparse:  # measured at some steps only
            for label, points in sparse[key]:
                pts = [(step, v) for step, v in points if v is not None]
                if pts:  # a non-finite value is None in metrics.jsonl
                    ax.plot(*zip(*pts), marker="o", label=label)
            ax.legend(fontsize=7)
            if len(steps) > 1:  # the dense panels' step range (and margins): a lone final evaluation sits at the end
                pad = 0.05 * (steps[-1] - steps[0])
                ax.set_xlim(steps[0] - pad, steps[-1] + pad)
        else:
            ax.plot(steps, [r.get(key) if r.get(key) is not None else float("nan") for r in rows])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_training(metrics_path: str | Path, out_png: str | Path, final_eval: tuple[int, dict] | None = None) -> Path:
    """`training_figure` of a run's metrics.jsonl, saved as out_png."""
    fig = training_figure(read_metrics(metrics_path), final_eval)
    import matplotlib.pyplot as plt  # after training_figure chose the Agg backend

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
