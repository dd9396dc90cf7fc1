"""Compare NeuCLIP, FastCLIP, MBCL and SigLIP on the embedded data set in the small-batch regime, and NeuCLIP ablations.

    python benchmarks/compare_losses.py            # 4 losses x 5 seeds + 5 NeuCLIP ablations x 1 seed (~2 h)
    python benchmarks/compare_losses.py --quick    # 4 losses x 1 seed, 1 epoch, no ablations (a few minutes)

The regime NeuCLIP is about (E1-E3): a global batch small against the data set. Every run is the `make train`
default (configs/tiny-neuclip.yaml: tiny preset, ZeRO-2 on 2 CPU ranks) with a global batch of 64 on the 8,000
training samples (n/B = 125) and m = 64 prototypes (m <= B), 10 epochs = 1,250 steps, and one thing changed. The
same seed gives every loss the same initialization and data order, so differences can be paired over seeds. Each
run logs the normalizer error (the exact log-normalizer of 256 fixed training anchors over all 8,000 training
samples against the method's own estimate, and against the batch estimate) and the evaluation once per epoch.
Run directories go to --runs (default runs/compare, not in git); the markdown tables (mean ± std over seeds, and
NeuCLIP − baseline paired over seeds) and the plot (loss, normalizer error, zero-shot, retrieval vs step) to --out
(default benchmarks/results). Runs that already finished are reused (delete the runs directory to start over).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from _common import ROOT, mean_std

from neuclip_ds.data.embedded import dataset_paths
from neuclip_ds.launch import cpu_env, launch, metrics, run_command, summary

LOSSES = ("neuclip", "fastclip", "mbcl", "siglip")
# the small-batch regime (module docstring): n/B = 8000 / 64 = 125 on the embedded set, m = B
GLOBAL_BATCH, PROTOTYPES = 64, 64
# NeuCLIP ablations around that setting (m = 64, T_u = 5, T_r = 100), one seed each: E7.4's restarts (none, and
# every 250 steps), E7's alternating updates (vs simultaneous), E4's m (16 < B), the generic-MLP NPN
ABLATIONS = {
    "neuclip-no-restart": ["--npn-restart-every", "1000000"],
    "neuclip-restart250": ["--npn-restart-every", "250"],
    "neuclip-simultaneous": ["--npn-update", "simultaneous"],
    "neuclip-m16": ["--npn-prototypes", "16"],
    "neuclip-mlp": ["--npn-variant", "mlp"],
}
METRICS = {
    "zero-shot mean top-1": "zeroshot/mean/top1",
    "zero-shot digit top-1": "zeroshot/digit/top1",
    "image->text R@1": "retrieval/image_to_text_R@1",
    "text->image R@1": "retrieval/text_to_image_R@1",
}


def run(name: str, seed: int, extra: list[str], out: Path, *, epochs: int, every: int) -> Path:
    run_dir = out / f"{name}_seed{seed}"
    if (run_dir / "summary.json").is_file():
        return run_dir
    loss = name.split("-")[0]
    paths = ["--config", str(ROOT / "configs" / "tiny-neuclip.yaml"), "--dataset-dir", str(ROOT / "data" / "digits")]
    run = (
        f"--global-batch-size {GLOBAL_BATCH} --npn-prototypes {PROTOTYPES} --loss {loss} --seed {seed}"
        f" --epochs {epochs} --norm-err-every {every} --norm-err-anchors 256 --eval-every {every}"
    ).split()
    cmd = [str(ROOT / "launchers" / "single_node.sh"), "2", *paths, *run, "--output-dir", str(run_dir), *extra]
    if run_dir.exists():  # a run of this benchmark that did not finish: start it over
        cmd.append("--overwrite")
    print(f"[compare] {name} seed {seed}", flush=True)
    proc = run_command(cmd, cwd=ROOT, env=cpu_env(threads=None), timeout=None, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return run_dir


def load(run_dir: Path) -> tuple[list[dict], dict]:
    return metrics(run_dir), summary(run_dir)


def late_norm_err(rows: list[dict], key: str = "norm_err") -> float | None:
    """The normalizer error averaged over the measurements of the second half of training (a single measurement
    moves with the NPN's restart phase and the batch that preceded it)."""
    last = rows[-1]["step"]
    values = [r[key] for r in rows if r.get(key) is not None and r["step"] > last / 2]
    return statistics.mean(values) if values else None


def norm_err_ratio(rows: list[dict]) -> float | None:
    """The run's own estimate's error over the batch estimate's, on the same model (2nd half of training); None
    when the run measured either not at all."""
    own, batch = late_norm_err(rows), late_norm_err(rows, "norm_err_mbcl")
    return own / batch if own is not None and batch else None


def table(groups: dict[str, list[Path]]) -> str:
    # each run measures its own model, whose normalizers may be sharper or flatter than another run's: the ratio
    # to the batch estimate of the same model is the comparable figure
    head = [
        "run",
        "seeds",
        "final loss",
        "final τ",
        "norm_err, own estimate (2nd half)",
        "norm_err, batch estimate (2nd half)",
        "own ÷ batch",
        *METRICS,
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, dirs in groups.items():
        finals = [load(d) for d in dirs]
        cells = [
            name,
            str(len(dirs)),
            mean_std([s["final"]["loss"] for _, s in finals]),
            mean_std([s["final"]["tau"] for _, s in finals], digits=3),
            mean_std([v for r, _ in finals if (v := late_norm_err(r)) is not None]),
            mean_std([v for r, _ in finals if (v := late_norm_err(r, "norm_err_mbcl")) is not None]),
            mean_std([v for r, _ in finals if (v := norm_err_ratio(r)) is not None]),
        ]
        cells += [mean_std([100 * s["eval"][key] for _, s in finals]) for key in METRICS.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(groups: dict[str, list[Path]], seeds: list[int]) -> str:
    """NeuCLIP minus each baseline, per seed (same seed = same initialization and data order), mean ± std over
    seeds, and whether the mean difference is beyond seed noise: a two-sided paired t-test at 5 % (|t| above the
    t quantile for n - 1 degrees of freedom)."""
    from scipy import stats

    if len(seeds) < 2:
        return "(paired comparison needs at least 2 seeds)"
    keys = {"norm_err own ÷ batch (2nd half)": None, **METRICS}
    lines = ["| NeuCLIP − baseline | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    mine = {s: load(d) for s, d in zip(seeds, groups["neuclip"])}
    for name in LOSSES[1:]:
        theirs = {s: load(d) for s, d in zip(seeds, groups[name])}
        cells = [name]
        for _label, key in keys.items():
            if key is None:
                if any(norm_err_ratio(theirs[s][0]) is None for s in seeds):
                    cells.append("n/a")
                    continue
                diffs = [norm_err_ratio(mine[s][0]) - norm_err_ratio(theirs[s][0]) for s in seeds]
            else:
                diffs = [100 * (mine[s][1]["eval"][key] - theirs[s][1]["eval"][key]) for s in seeds]
            mean, std = statistics.mean(diffs), statistics.stdev(diffs)
            t = mean / (std / len(diffs) ** 0.5) if std > 0 else float("inf") * (1 if mean else 0)
            beyond = abs(t) > stats.t.ppf(0.975, len(diffs) - 1)
            cells.append(f"{mean:+.2f} ± {std:.2f}{' **(beyond noise)**' if beyond else ''}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(groups: dict[str, list[Path]], seed: int) -> str:
    """Each ablation minus NeuCLIP of the same seed (same initialization and data order), beside NeuCLIP's std
    over seeds: a difference well inside that std is not evidence either way."""
    keys = {"norm_err own ÷ batch (2nd half)": None, **METRICS}
    base_rows, base = load(groups["neuclip"][0])
    runs = {name: dirs[0] for name, dirs in groups.items() if name.startswith("neuclip-")}
    lines = [f"| ablation − NeuCLIP (seed {seed}) | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, d in runs.items():
        rows, run_summary = load(d)
        cells = [name]
        for key in keys.values():
            if key is None:
                cells.append(f"{norm_err_ratio(rows) - norm_err_ratio(base_rows):+.3f}")
            else:
                cells.append(f"{100 * (run_summary['eval'][key] - base['eval'][key]):+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    finals = [load(d) for d in groups["neuclip"]]
    if len(finals) > 1:
        spread = [f"{statistics.stdev([norm_err_ratio(r) for r, _ in finals]):.3f}"]
        spread += [f"{statistics.stdev([100 * s['eval'][key] for _, s in finals]):.2f}" for key in METRICS.values()]
        lines.append(f"| NeuCLIP's std over {len(finals)} seeds | " + " | ".join(spread) + " |")
    return "\n".join(lines)


def plots(groups: dict[str, list[Path]], out: Path, filename: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss", "training loss of the 4 losses (each its own scale)"),
        ("norm_err", "normalizer error (nats)"),
        ("eval/zeroshot/mean/top1", "zero-shot mean top-1"),
        ("eval/retrieval/image_to_text_R@1", "image->text R@1"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    colors = plt.get_cmap("tab20").colors
    for ax, (key, title) in zip(axes, panels):
        if key == "norm_err":
            ax.set_yscale("log")  # FastCLIP's unvisited rows (first epoch) and a diverged NPN dwarf the rest
        for color, (name, dirs) in zip(colors, groups.items()):
            if key == "loss" and name not in LOSSES:  # ablations' losses spike to ~1e4 (m = 16, MLP): see the table
                continue
            series: dict[int, list[float]] = {}
            for d in dirs:
                rows, run_summary = load(d)
                for r in rows:
                    value = r.get(key)
                    if value is None and key.startswith("eval/") and r is rows[-1]:
                        value = run_summary["eval"][key.removeprefix("eval/")]
                    if value is not None:
                        series.setdefault(r["step"], []).append(value)
            if series:
                steps = sorted(series)
                ax.plot(
                    steps,
                    [statistics.mean(series[s]) for s in steps],
                    label=name,
                    color=color,
                    marker="o" if key != "loss" else None,
                    markersize=3,
                )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path = out / filename
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, no ablations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "compare"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    seeds, epochs = ([0], 1) if args.quick else (args.seeds, args.epochs)
    out, runs = Path(args.out), Path(args.runs) / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    launch(
        ["--out", str(ROOT / "data" / "digits")],
        module="neuclip_ds.data.embedded",
        env=cpu_env(threads=None),
        timeout=None,
    )
    data = dataset_paths(ROOT / "data" / "digits")
    steps_per_epoch = data["num_train"] // GLOBAL_BATCH
    every = steps_per_epoch  # normalizer error and evaluation once per epoch
    groups: dict[str, list[Path]] = {}
    for name in LOSSES:
        groups[name] = [run(name, s, [], runs, epochs=epochs, every=every) for s in seeds]
    failed = []
    if not args.quick:
        for name, extra in ABLATIONS.items():
            try:  # an ablation may diverge (e.g. the generic-MLP NPN): report it, keep the comparison
                groups[name] = [run(name, seeds[0], extra, runs, epochs=epochs, every=every)]
            except SystemExit as e:
                last = [ln for ln in str(e).splitlines() if "aborted" in ln or "error" in ln][-1:]
                failed.append(f"- {name} (seed {seeds[0]}) did not finish: {last[0] if last else 'see its log'}")
    header = (
        f"command: python benchmarks/compare_losses.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip()
        + f"\nconfigs/tiny-neuclip.yaml with global batch {GLOBAL_BATCH} (n/B = {steps_per_epoch}), m = "
        f"{PROTOTYPES}, {epochs} epoch(s) x {steps_per_epoch} steps, seeds {', '.join(map(str, seeds))}; "
        f"metrics in % of the {data['num_val']:,} val samples, normalizer error in nats (256 training anchors)\n\n"
    )
    md = header + table(groups) + ("\n\nAblations that did not finish:\n" + "\n".join(failed) if failed else "")
    md += "\n\nPaired over seeds " + ", ".join(map(str, seeds)) + ":\n\n" + paired_table(groups, seeds)
    if any(name.startswith("neuclip-") for name in groups):
        md += "\n\nAblations, paired with NeuCLIP of the same seed:\n\n" + ablation_table(groups, seeds[0])
    png = plots(groups, out, "compare_quick.png" if args.quick else "compare.png")
    md_path = out / ("compare_quick.md" if args.quick else "compare.md")
    md_path.write_text(f"{md}\n\nPlot: {png.name}\n")
    print(md)
    print(f"\nwritten: {md_path}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
