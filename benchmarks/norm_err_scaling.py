"""Does the normalizer error stay flat when the data grows or the batch halves? (issue 7, the paper's claim)

    python benchmarks/norm_err_scaling.py           # n/B from 10 to 150 at B = 64, and B = 64 vs 32 at n = 3200
    python benchmarks/norm_err_scaling.py --quick   # two data sizes, fewer steps (seconds)

The encoders are replaced by a controlled drift of the embeddings (the method notes' sanity setting, E5: d = 32,
tau = 0.1, m = 512, T_u = 10, AdaGrad lr 0.05), so that data size and batch size are the only things that change
between runs and the exact full-data log-normalizer is cheap. Per step a global batch is drawn (epoch
permutations), its g_hat (E1) computed, and the estimators updated exactly as the trainer does, with the library's
own classes: the NPN (`NPN.fit`, T_u inner steps, restart every T_r steps, E7; and a second NPN restarted only
at step 0, trained on the same batches), FastCLIP's u tables
(`FastCLIPLoss.update_alpha`, gamma schedule of E9), and MBCL's log g_hat of the batch itself. Every
`--measure-every` steps in the second half of the run, `diagnostics.exact_log_normalizers` gives log(eps + g_i)
over all n samples for S fixed anchors, and `diagnostics.normalizer_errors` the mean |alpha_hat - log(eps + g)|.

The drift: sample i has a class centre c_k(i) and a fixed offset z_i; e1_i = normalize(c + a z_i), e2_i =
normalize(c + a z_i + b_t w_i); the centres take a random walk and the image-text noise b_t shrinks over the run
(training pulls pairs together), so every g_i moves over time and a table row refreshed once per epoch goes stale.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from neuclip_ds.diagnostics import exact_log_normalizers, fastclip_estimate, mbcl_estimate, normalizer_errors
from neuclip_ds.losses import FastCLIPLoss, Features, batch_log_normalizers, log_eps_plus
from neuclip_ds.npn import NPN

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-14
LABELS = {
    "neuclip": "NeuCLIP (NPN)",
    "neuclip_no_restart": "NeuCLIP (NPN, no restart)",
    "fastclip": "FastCLIP (u table)",
    "mbcl": "MBCL (batch)",
}


@dataclass
class Setting:
    dim: int = 32
    tau: float = 0.1
    prototypes: int = 512
    inner_steps: int = 10
    npn_lr: float = 0.05
    restart_every: int = 100
    classes: int = 16
    offset_scale: float = 0.6  # a
    noise_start: float = 0.8  # b_0
    noise_end: float = 0.3  # b_T
    centre_walk: float = 0.01  # random-walk step of the centres per optimizer step
    anchors: int = 256


class DriftingEmbeddings:
    """n pairs whose similarities change every step (a stand-in for encoders that train)."""

    def __init__(self, n: int, s: Setting, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.s, self.n, self.g = s, n, g
        self.label = torch.arange(n) % s.classes
        self.centres = torch.randn(s.classes, s.dim, generator=g)
        self.z = torch.randn(n, s.dim, generator=g)
        self.w = torch.randn(n, s.dim, generator=g)
        self.noise = s.noise_start

    def step(self, progress: float) -> None:
        self.centres += self.s.centre_walk * torch.randn(self.centres.shape, generator=self.g)
        self.noise = self.s.noise_start + (self.s.noise_end - self.s.noise_start) * progress

    def pairs(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.centres[self.label[index]] + self.s.offset_scale * self.z[index]
        return F.normalize(base, dim=-1), F.normalize(base + self.noise * self.w[index], dim=-1)


def run(n: int, batch: int, steps: int, measure_every: int, s: Setting, seed: int = 0) -> dict[str, float]:
    data = DriftingEmbeddings(n, s, seed)
    tau = torch.tensor([s.tau])
    npn = NPN(s.dim, num_prototypes=s.prototypes, eps=EPS, lr=s.npn_lr, seed=seed)
    npn_once = NPN(s.dim, num_prototypes=s.prototypes, eps=EPS, lr=s.npn_lr, seed=seed)  # restarted at step 0 only
    fastclip = FastCLIPLoss(n, eps=EPS)
    anchors = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[: s.anchors]
    everything = torch.arange(n)
    non_anchors = everything[~torch.isin(everything, anchors)]
    draw = torch.Generator().manual_seed(seed + 2)
    steps_per_epoch = n // batch
    errors: dict[str, list[float]] = {"neuclip": [], "neuclip_no_restart": [], "fastclip": [], "mbcl": []}
    perm = None
    for step in range(steps):
        epoch, pos = divmod(step, steps_per_epoch)
        if pos == 0:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        index = perm[pos * batch : (pos + 1) * batch]
        img, txt = data.pairs(index)
        log_g = batch_log_normalizers(Features(img, txt, img, txt, 0), tau)  # E1 on the batch
        targets = [log_eps_plus(x, EPS) for x in log_g]
        if step % s.restart_every == 0:  # E7.4
            npn.restart(img, txt, seed=seed * 1_000_003 + step)
        if step == 0:
            npn_once.restart(img, txt, seed=seed * 1_000_003)
        for net in (npn, npn_once):
            net.fit(img, txt, *targets, tau, s.inner_steps)  # E7.2, E5
        fastclip.update_alpha(index, *log_g, epoch)  # E9
        data.step(step / steps)
        if step >= steps // 2 and step % measure_every == 0:
            a_img, a_txt = data.pairs(anchors)
            all_img, all_txt = data.pairs(everything)
            exact = exact_log_normalizers(a_img, a_txt, anchors, [(all_img, all_txt, everything)], tau, EPS)
            # MBCL: the anchors' log(eps + g_hat) against a training-size batch of other samples
            others = non_anchors[torch.randperm(len(non_anchors), generator=draw)[: batch - 1]]
            o_img, o_txt = data.pairs(others)
            estimates = {
                "neuclip": npn.predict(a_img, a_txt, tau),
                "neuclip_no_restart": npn_once.predict(a_img, a_txt, tau),
                "fastclip": fastclip_estimate(fastclip.u_img, fastclip.u_txt, anchors, EPS),
                "mbcl": mbcl_estimate(a_img, a_txt, o_img, o_txt, tau, EPS),
            }
            for name, err in normalizer_errors(*exact, estimates).items():
                errors[name].append(err)
    return {name: statistics.mean(v) for name, v in errors.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    s = Setting()
    if args.quick:
        grid, steps, seeds = [(640, 64), (3200, 64)], 300, [0]
    else:
        grid = [(640, 64), (1600, 64), (3200, 64), (6400, 64), (9600, 64), (3200, 32)]
        steps, seeds = args.steps, args.seeds
    rows = []
    for n, batch in grid:
        per_seed = [run(n, batch, steps, 25, s, seed) for seed in seeds]
        mean = {k: statistics.mean(r[k] for r in per_seed) for k in per_seed[0]}
        std = {k: statistics.stdev(r[k] for r in per_seed) if len(per_seed) > 1 else 0.0 for k in per_seed[0]}
        rows.append((n, batch, mean, std))
        print(f"[norm_err_scaling] n={n} B={batch} " + " ".join(f"{k}={v:.3f}" for k, v in mean.items()), flush=True)
    lines = [
        (
            "command: python benchmarks/norm_err_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
        ).rstrip(),
        f"drifting embeddings, d={s.dim}, tau={s.tau}, m={s.prototypes}, T_u={s.inner_steps}, NPN lr "
        f"{s.npn_lr}, T_r={s.restart_every}, {steps} steps, error averaged over the second half, "
        f"{len(seeds)} seed(s) (mean ± std), S={s.anchors} anchors",
        "",
        f"| n | B | n/B | NeuCLIP (NPN, restart every {s.restart_every}) | NeuCLIP (no restart) | "
        "FastCLIP (u table) | MBCL (batch) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, batch, mean, std in rows:
        cells = " | ".join(f"{mean[k]:.3f} ± {std[k]:.3f}" for k in LABELS)
        lines.append(f"| {n} | {batch} | {n // batch} | {cells} |")
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "norm_err_scaling.md").write_text(text + "\n")
        plot(rows, out / "norm_err_scaling.png")
        print(f"\nwritten: {out / 'norm_err_scaling.md'}, {out / 'norm_err_scaling.png'}")
    return 0


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for name, label in LABELS.items():
        pts = sorted((n / b, m[name], sd[name]) for n, b, m, sd in rows if b == rows[0][1])
        ax.errorbar(
            [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=label, capsize=3
        )
    ax.set_xlabel(f"n / B (B = {rows[0][1]})")
    ax.set_ylabel("mean |alpha - log(eps+g)| (nats)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
