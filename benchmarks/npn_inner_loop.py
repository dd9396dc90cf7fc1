"""The NPN's inner loop (T_u AdaGrad steps of E5 on a batch) with two implementations of E4's similarity, side by
side in one process: autograd through `F.normalize(prototypes)` (the implementation before `CosineScores`) and the
hand-written backward of `neuclip_ds.npn.CosineScores` that the NPN uses. Both run the same fused AdaGrad.

    python benchmarks/npn_inner_loop.py           # B x d in (32, 512), (256, 64), (256, 512); m = 4096, T_u = 10
    python benchmarks/npn_inner_loop.py --quick

Prints the median wall time of one `NPN.fit(..., steps=T_u)` per implementation (interleaved repeats) and the ratio.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from neuclip_ds.losses import log_eps_plus
from neuclip_ds.npn import NPN, TailoredNPN


def alpha_through_normalize(self, img_over_tau, txt_over_tau, neg_pos):
    """E4 as before CosineScores: normalize the [m, d] prototypes, one addmm per side, autograd for the rest."""
    m, out = self.proto_txt.shape[0], []
    for anchors, protos in ((img_over_tau, self.proto_txt), (txt_over_tau, self.proto_img)):
        z = torch.addmm(neg_pos, anchors, F.normalize(protos, dim=-1).T)
        out.append(log_eps_plus(torch.logsumexp(z, dim=1) - math.log(m), self.eps))
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, fewer repeats")
    parser.add_argument("--prototypes", type=int, default=4096)
    parser.add_argument("--inner-steps", type=int, default=10)
    args = parser.parse_args(argv)
    shapes, repeats = ([(32, 512)], 4) if args.quick else ([(32, 512), (256, 64), (256, 512)], 8)
    impls = {"autograd through normalize": alpha_through_normalize, "CosineScores": TailoredNPN.alpha}
    print(
        f"m = {args.prototypes}, T_u = {args.inner_steps}, {torch.get_num_threads()} threads, median of "
        f"{repeats - 1} interleaved repeats (first dropped)\n"
    )
    print("| B | d | " + " | ".join(f"{k} (ms)" for k in impls) + " | speed-up |\n|---|---|---|---|---|")
    try:
        for B, d in shapes:
            g = torch.Generator().manual_seed(0)
            img = F.normalize(torch.randn(B, d, generator=g), dim=-1)
            txt = F.normalize(img + torch.randn(B, d, generator=g), dim=-1)
            tau, targets = torch.tensor([0.07]), (torch.randn(B, generator=g), torch.randn(B, generator=g))
            times: dict[str, list[float]] = {k: [] for k in impls}
            for r in range(repeats):
                for name, alpha in impls.items():
                    TailoredNPN.alpha = alpha
                    npn = NPN(d, num_prototypes=args.prototypes)
                    t = time.perf_counter()
                    npn.fit(img, txt, *targets, tau, args.inner_steps)
                    if r:
                        times[name].append(time.perf_counter() - t)
            before, after = (statistics.median(v) * 1e3 for v in times.values())
            print(f"| {B} | {d} | {before:.1f} | {after:.1f} | {before / after:.2f}x |")
    finally:
        TailoredNPN.alpha = impls["CosineScores"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
