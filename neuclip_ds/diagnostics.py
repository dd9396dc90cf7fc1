"""Normalizer-error diagnostic (docs/method.md, "Normalizer error").

For a fixed subset S of anchors and the current encoders, compute the exact per-anchor log-normalizers of E1 over
the WHOLE data set,

    g1_i = 1/(n-1) sum_{j != i} exp((s_ij - s_ii)/tau)      image anchor i, text negatives j     (E1)
    g2_i = 1/(n-1) sum_{j != i} exp((s_ji - s_ii)/tau)      text anchor i, image negatives j     (E1)

with s_ij = e1_i . e2_j, and compare each method's estimate alpha_hat of log(eps + g_i) with it:

    error(method) = mean over anchors i in S and both sides of |alpha_hat_i - log(eps + g_i)|

The estimates: NeuCLIP -> the NPN's output (`npn_estimate`); FastCLIP -> log(eps + u_i) from the u tables
(`fastclip_estimate`); MBCL -> log(eps + g_hat_i) of one mini-batch (`mbcl_estimate`).

Everything is in the log domain (logsumexp / logaddexp), as in `losses.py`, so tau = 0.01 (exponents up to 200)
does not overflow; the exact normalizers are accumulated in float64 and returned in float64.

Distributed use: every rank must call `exact_log_normalizers` / `fastclip_estimate` (they all-reduce) with the SAME
anchors (same features, same dataset indices, same order); each rank streams only its own share of the data set.
Under NCCL, pass CUDA tensors (the all-reduces run on the anchors' / `anchor_index`'s device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from . import distributed
from .losses import FastCLIPLoss, ShardedLogTable, log_eps_plus

if TYPE_CHECKING:
    from .npn import NPN

__all__ = ["exact_log_normalizers", "fastclip_estimate", "mbcl_estimate", "normalizer_errors", "npn_estimate"]


def _tau_value(tau: Tensor | float) -> float:
    t = float(tau.detach().reshape(())) if isinstance(tau, Tensor) else float(tau)
    if not t > 0:
        raise ValueError(f"tau: must be > 0, got {t:.4g}")
    return t


def _check_anchors(anchor_img: Tensor, anchor_txt: Tensor) -> None:
    if anchor_img.dim() != 2 or anchor_img.shape != anchor_txt.shape:
        raise ValueError(
            f"anchor_img: expected [S, d] image and text anchor features of equal shape, got "
            f"{tuple(anchor_img.shape)} and {tuple(anchor_txt.shape)}"
        )


def _check_eps(eps: float) -> None:
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")


def _block_log_sums(
    anchor_img: Tensor,
    anchor_txt: Tensor,
    pos: Tensor,
    other_img: Tensor,
    other_txt: Tensor,
    tau: float,
    exclude: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """LSE_j over one block of negatives j of the E1 exponents, shape [S] each:

        side 1: (s_ij - s_ii)/tau = (e1_i . e2_j - s_ii)/tau      (anchor image vs the block's texts)
        side 2: (s_ji - s_ii)/tau = (e2_i . e1_j - s_ii)/tau      (anchor text vs the block's images)

    `exclude` [S, c] (bool) marks the pairs j == i, which E1 leaves out of the sum."""
    out = []
    for anchors, others in ((anchor_img, other_txt), (anchor_txt, other_img)):
        z = (anchors @ others.T - pos[:, None]) / tau  # [S, c]
        if exclude is not None:
            z = z.masked_fill(exclude, float("-inf"))
        out.append(torch.logsumexp(z, dim=1))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------------
# the exact normalizers (E1 over the whole data set)
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def exact_log_normalizers(
    anchor_img: Tensor,
    anchor_txt: Tensor,
    anchor_index: Tensor,
    chunks: Iterable[tuple[Tensor, Tensor, Tensor]],
    tau: Tensor | float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Exact log(eps + g1_i), log(eps + g2_i) of E1 over the whole data set for the anchors S, float64, [S] each.

    anchor_img, anchor_txt: [S, d] normalized features of the anchors; anchor_index: [S] their dataset indices.
    chunks: iterable of (img [c, d], txt [c, d], index [c]) chunks. Together (over all ranks, when
    torch.distributed is initialized) they must cover the data set, each sample exactly once; n is the number of
    samples seen. The pair j == i is excluded by comparing DATASET INDICES (not positions or features), so an
    anchor's own row is skipped wherever it occurs in the stream and a different sample with identical features is
    still a negative.

    Normalization (E1): an anchor found in the stream has n - 1 negatives -> divide by n - 1. An anchor whose index
    is absent from the stream (a held-out anchor) is compared with all n samples -> divide by n. An anchor's index
    seen twice raises ValueError; a repeated index of a non-anchor sample is not detected (it counts twice in n
    and in the sums).

    Streaming: a running logsumexp per anchor and side is updated chunk by chunk, so memory is O(S * c), never
    O(S * n). Distributed: each rank streams its own chunks; the per-rank running logsumexps L_r and counts are
    combined with all-reduces, M = MAX_r L_r, LSE = M + log SUM_r exp(L_r - M), n = SUM_r n_r, so every rank returns
    the same result. All ranks must pass the same anchors (checked via their indices).
    """
    _check_anchors(anchor_img, anchor_txt)
    _check_eps(eps)
    t = _tau_value(tau)
    S = anchor_img.shape[0]
    if not isinstance(anchor_index, Tensor) or anchor_index.shape != (S,):
        raise ValueError(f"anchor_index: expected a [{S}] tensor of dataset indices")
    if anchor_index.unique().numel() != S:
        raise ValueError("anchor_index: anchors must be distinct samples")
    device = anchor_img.device
    a_img = anchor_img.detach().to(device, torch.float64)
    a_txt = anchor_txt.detach().to(device, torch.float64)
    a_idx = anchor_index.to(device)
    pos = (a_img * a_txt).sum(-1)  # s_ii

    lse1 = torch.full((S,), float("-inf"), dtype=torch.float64, device=device)  # running LSE_j, side 1
    lse2 = torch.full_like(lse1, float("-inf"))  # running LSE_j, side 2
    found = torch.zeros(S, dtype=torch.float64, device=device)  # times each anchor's index was seen
    n_local = 0
    for img, txt, index in chunks:
        if img.dim() != 2 or img.shape != txt.shape or img.shape[1] != a_img.shape[1] or index.shape != (img.shape[0],):
            raise ValueError(
                f"chunks: expected (img [c, {a_img.shape[1]}], txt [c, {a_img.shape[1]}], "
                f"index [c]) chunks, got shapes {tuple(img.shape)}, {tuple(txt.shape)}, "
                f"{tuple(index.shape)}"
            )
        if img.shape[0] == 0:
            continue
        same = a_idx[:, None] == index.to(device)[None, :]  # [S, c]: j == i by dataset index
        c1, c2 = _block_log_sums(
            a_img, a_txt, pos, img.detach().to(device, torch.float64), txt.detach().to(device, torch.float64), t, same
        )
        lse1, lse2 = torch.logaddexp(lse1, c1), torch.logaddexp(lse2, c2)
        found += same.sum(dim=1)
        n_local += img.shape[0]

    counts = torch.cat([found, torch.tensor([float(n_local)], dtype=torch.float64, device=device)])
    if distributed.is_distributed():
        # MAX all-reduce: the running LSEs (the shift M) and +-index (every rank must hold the same anchors)
        idx = a_idx.to(torch.float64)
        mx = torch.cat([lse1, lse2, idx, -idx])
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        if not torch.equal(mx[2 * S : 3 * S], idx) or not torch.equal(-mx[3 * S :], idx):
            raise ValueError("anchor_index: every rank must pass the same anchors in the same order")
        m = mx[: 2 * S]
        shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf: nothing to rescale
        # SUM all-reduce: the rescaled sums exp(L_r - M) and the counts (exact in float64 up to 2^53)
        sm = torch.cat([torch.exp(torch.cat([lse1, lse2]) - shift), counts])
        dist.all_reduce(sm, op=dist.ReduceOp.SUM)
        lse = shift + torch.log(sm[: 2 * S])
        lse1, lse2 = lse[:S], lse[S:]
        counts = sm[2 * S :]
    found, n = counts[:S], int(counts[S].item())

    if bool((found > 1).any()):
        raise ValueError(
            "chunks: an anchor's dataset index occurs more than once; the chunks must list each sample exactly once"
        )
    negatives = n - found  # n - 1 (E1), or n for held-out
    if bool((negatives < 1).any()):
        raise ValueError(f"chunks: need at least one negative per anchor, saw n = {n} samples")
    log_neg = torch.log(negatives)
    return log_eps_plus(lse1 - log_neg, eps), log_eps_plus(lse2 - log_neg, eps)


# ---------------------------------------------------------------------------------------------------------------
# the error
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def normalizer_errors(
    exact_img: Tensor, exact_txt: Tensor, estimates: Mapping[str, tuple[Tensor, Tensor]]
) -> dict[str, float]:
    """{method: mean over anchors i and both sides of |alpha_hat_i - log(eps + g_i)|} (in nats).

    exact_img/exact_txt: [S] from `exact_log_normalizers`; estimates: {name: (alpha_img [S], alpha_txt [S])}, e.g.
    "neuclip", "fastclip", "mbcl". Computed in float64. A non-finite estimate (e.g. a FastCLIP table row never
    visited with eps = 0, i.e. -inf) gives a non-finite error rather than being hidden."""
    S = exact_img.shape[0]
    if exact_img.dim() != 1 or exact_txt.shape != exact_img.shape:
        raise ValueError(
            f"exact_img: expected [S] exact log-normalizers of equal shape, got "
            f"{tuple(exact_img.shape)} and {tuple(exact_txt.shape)}"
        )
    ref = (exact_img.detach().to(torch.float64), exact_txt.detach().to(torch.float64))
    out = {}
    for name, pair in estimates.items():
        if len(pair) != 2 or any(a.shape != (S,) for a in pair):
            raise ValueError(f"estimates[{name!r}]: expected (alpha_img [{S}], alpha_txt [{S}])")
        total = sum((a.detach().to(r.device, torch.float64) - r).abs().sum() for a, r in zip(pair, ref))
        out[name] = float(total) / (2 * S)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the three estimates
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def mbcl_estimate(
    anchor_img: Tensor,
    anchor_txt: Tensor,
    batch_img: Tensor | None = None,
    batch_txt: Tensor | None = None,
    tau: Tensor | float = 0.01,
    eps: float = 1e-14,
    *,
    anchor_index: Tensor | None = None,
    batch_index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """MBCL's estimate log(eps + g_hat_i) (E1 with one mini-batch in place of the data set), float64, [S] each.

    With a batch (batch_img/batch_txt [B, d]): g_hat_i is the mean over the batch's samples of the E1 terms
    exp((s_ij - s_ii)/tau) (text negatives for side 1, image negatives for side 2). The batch is meant to hold OTHER
    samples than the anchors, so every batch sample counts as a negative (B of them). If it may contain anchors,
    pass `anchor_index` and `batch_index`: pairs with equal dataset index are then excluded (j != i) and each
    anchor's mean is over its remaining negatives.

    Without a batch (batch_img = batch_txt = None): the anchors are their own batch, i.e. g_hat_i is the mean over
    the other S - 1 anchors, exactly what MBCL computes for a batch of size S (`batch_log_normalizers`). Note that
    log(eps + g_hat) is biased (E1) and the bias depends on the batch size, so for a comparison representative of
    training pass a batch of the training batch size.
    """
    _check_anchors(anchor_img, anchor_txt)
    _check_eps(eps)
    t = _tau_value(tau)
    device = anchor_img.device
    a_img = anchor_img.detach().to(torch.float64)
    a_txt = anchor_txt.detach().to(torch.float64)
    S = a_img.shape[0]
    if (batch_img is None) != (batch_txt is None):
        raise ValueError("batch_img: pass both batch_img and batch_txt, or neither")
    if batch_img is None:
        if S < 2:
            raise ValueError("anchor_img: the anchors as their own batch need at least 2 of them")
        b_img, b_txt = a_img, a_txt
        exclude = torch.eye(S, dtype=torch.bool, device=device)  # j != i: the anchor itself
    else:
        _check_anchors(batch_img, batch_txt)
        if batch_img.shape[1] != a_img.shape[1]:
            raise ValueError(f"batch_img: feature dim {batch_img.shape[1]} != anchors' {a_img.shape[1]}")
        b_img = batch_img.detach().to(device, torch.float64)
        b_txt = batch_txt.detach().to(device, torch.float64)
        exclude = None
        if (anchor_index is None) != (batch_index is None):
            raise ValueError("anchor_index: pass both anchor_index and batch_index, or neither")
        if anchor_index is not None:
            exclude = anchor_index.to(device)[:, None] == batch_index.to(device)[None, :]
    pos = (a_img * a_txt).sum(-1)  # s_ii
    negatives = torch.full((S,), float(b_img.shape[0]), dtype=torch.float64, device=device)
    if exclude is not None:
        negatives = negatives - exclude.sum(dim=1)
    if bool((negatives < 1).any()):
        raise ValueError("batch_img: every anchor needs at least one negative in the batch")
    lse1, lse2 = _block_log_sums(a_img, a_txt, pos, b_img, b_txt, t, exclude)
    log_neg = torch.log(negatives)
    return log_eps_plus(lse1 - log_neg, eps), log_eps_plus(lse2 - log_neg, eps)


@torch.no_grad()
def fastclip_estimate(
    table_img: ShardedLogTable, table_txt: ShardedLogTable, anchor_index: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """FastCLIP's estimate log(eps + u_i) for the anchors (E9 tables), [S] each, identical on every rank.

    Each rank owns the rows index % world_size == rank (row index // world_size); it fills its anchors into a
    -inf vector and an all-reduce(MAX) fills in the rest, as `ShardedLogTable.update` does. Must be called on every
    rank when the tables are sharded (world_size > 1). A row never updated holds u = 0 -> log(eps). The vector
    lives on `anchor_index`'s device (use a CUDA tensor under NCCL); dtype is the table's."""
    _check_eps(eps)
    if (
        table_img.num_samples != table_txt.num_samples
        or table_img.world_size != table_txt.world_size
        or table_img.rank != table_txt.rank
    ):
        raise ValueError("table_txt: the image and text tables must have the same size and layout")
    if anchor_index.dim() != 1:
        raise ValueError(f"anchor_index: expected a [S] tensor, got shape {tuple(anchor_index.shape)}")
    n = table_img.num_samples
    if anchor_index.numel() and (int(anchor_index.min()) < 0 or int(anchor_index.max()) >= n):
        raise ValueError(f"anchor_index: dataset indices must lie in [0, {n})")
    world = table_img.world_size
    if world > 1 and distributed.world_size() != world:
        raise ValueError(
            f"table_img: sharded over {world} ranks but torch.distributed is not initialized with that world size"
        )
    mine = (anchor_index % world) == table_img.rank
    out = []
    for table in (table_img, table_txt):
        log_u = torch.full(anchor_index.shape, float("-inf"), dtype=table.log_u.dtype, device=anchor_index.device)
        log_u[mine] = table.lookup_local(anchor_index[mine]).to(log_u)
        if world > 1:
            dist.all_reduce(log_u, op=dist.ReduceOp.MAX)
        out.append(log_eps_plus(log_u, eps))
    return out[0], out[1]


def npn_estimate(npn: NPN, anchor_img: Tensor, anchor_txt: Tensor, tau: Tensor | float) -> tuple[Tensor, Tensor]:
    """NeuCLIP's estimate: the NPN's alpha (E3/E4), i.e. `npn.predict`, [S] each (detached). The NPN adds its own
    eps (the one it was built with)."""
    if not isinstance(tau, Tensor):
        tau = torch.tensor([float(tau)])
    return npn.predict(anchor_img, anchor_txt, tau)


# ---------------------------------------------------------------------------------------------------------------
# the probe the trainer runs every --norm-err-every steps
# ---------------------------------------------------------------------------------------------------------------
def lockstep(chunks: Iterable[dict], device: torch.device) -> Iterable[dict | None]:
    """Yield this rank's chunks, then None while other ranks still have some: every rank takes the same number
    of turns, so collective forwards (ZeRO-3 gathers parameters inside forward) never hang."""
    it = iter(chunks)
    while True:
        chunk = next(it, None)
        if not distributed.any_rank(chunk is not None, device):
            return
        yield chunk


class NormErrProbe:
    """Normalizer error of the run's estimator (and of a mini-batch estimate) against the exact log-normalizer of
    a fixed anchor subset over the whole training set, with the current encoders (docs/method.md, "Normalizer error").

    `anchors`: a batch dict (pixel_values, input_ids, attention_mask, index) of S fixed training samples, the
    same on every rank; `dataset_chunks()`: a fresh iterable of this rank's share of the training set (batch
    dicts with `index`), every sample on exactly one rank."""

    def __init__(self, anchors: dict, dataset_chunks: Callable[[], Iterable[dict]], *, eps: float) -> None:
        self.anchors, self.dataset_chunks, self.eps = anchors, dataset_chunks, eps

    @torch.no_grad()
    def measure(
        self,
        encode: Callable[[dict], tuple[Tensor, Tensor]],
        *,
        device: torch.device,
        tau: Tensor,
        npn: NPN | None = None,
        fastclip_loss: FastCLIPLoss | None = None,
        batch: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> dict[str, float]:
        """`encode(batch_dict) -> (img, txt)`; `batch`: the last global training batch (img, txt, dataset index)
        for the MBCL estimate. A probe anchor that is also in that batch has its own pair excluded by dataset
        index (j != i), exactly as in the exact value (E1): MBCL's own normalizer never counts the positive."""
        anchor_img, anchor_txt = encode(self.anchors)
        anchor_index = self.anchors["index"].to(device)
        dummy = {k: v[:1] for k, v in self.anchors.items() if isinstance(v, Tensor)}

        def features():
            for chunk in lockstep(self.dataset_chunks(), device):
                if chunk is None:  # this rank is done but others are not: a throw-away forward keeps step
                    encode(dummy)
                    continue
                img, txt = encode(chunk)
                yield img, txt, chunk["index"].to(device)

        exact = exact_log_normalizers(anchor_img, anchor_txt, anchor_index, features(), tau, self.eps)
        estimates = {}
        if batch is not None:
            batch_img, batch_txt, batch_index = batch
            estimates["mbcl"] = mbcl_estimate(
                anchor_img,
                anchor_txt,
                batch_img,
                batch_txt,
                tau,
                self.eps,
                anchor_index=anchor_index,
                batch_index=batch_index.to(device),
            )
        if npn is not None:
            estimates["neuclip"] = npn_estimate(npn, anchor_img, anchor_txt, tau)
        if fastclip_loss is not None:
            estimates["fastclip"] = fastclip_estimate(fastclip_loss.u_img, fastclip_loss.u_txt, anchor_index, self.eps)
        return normalizer_errors(*exact, estimates)
