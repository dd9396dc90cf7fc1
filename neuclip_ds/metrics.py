"""Run outputs on rank 0: metrics.jsonl (one JSON line per optimizer step), wandb (when asked, offline-capable),
a tqdm progress bar, and the training plots."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .rundir import RunFiles


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
    ) -> None:
        self.rank = rank
        self.path = RunFiles(Path(output_dir)).metrics
        self.file = None
        self.bar = None
        self.wandb = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.exists():
            self._truncate_after(initial_step)
        self.file = open(self.path, "a" if resume else "w", buffering=1)  # noqa: SIM115 (closed in close())
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)
        if "wandb" in report_to.split(","):
            if wandb_offline:
                os.environ["WANDB_MODE"] = "offline"
            import wandb

            self.wandb = wandb.init(
                project=wandb_project, config=config, dir=str(output_dir), name=Path(output_dir).name, resume="allow"
            )

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be recomputed)."""
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=record["step"])
        self.bar.update(1)
        if record.get("loss") is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", tau=f"{record['tau']:.4f}", npn=f"{record.get('npn_time_frac', 0):.1%}"
            )

    def note(self, text: str) -> None:
        """A message of rank 0's, on its own line above the progress bar (a plain print would be glued to it)."""
        if self.rank == 0:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_training(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Loss, tau, throughput and the NPN's share of the step against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    panels = [
        ("loss", "loss"),
        ("tau", "temperature tau"),
        ("samples_per_s", "samples / s"),
        ("npn_time_frac", "NPN share of step time"),
    ]
    if any(r.get("norm_err") is not None for r in rows):
        panels.append(("norm_err", "normalizer error (nats)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        if key == "norm_err":  # sparse: measured every --norm-err-every steps, one line per estimate
            for name in sorted({k for r in rows for k in r if k.startswith("norm_err_")}):
                pts = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
                ax.plot(*zip(*pts), marker="o", label=name.removeprefix("norm_err_"))
            ax.legend(fontsize=8)
        else:
            ax.plot(steps, [r.get(key) if r.get(key) is not None else float("nan") for r in rows])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
