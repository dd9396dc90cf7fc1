"""Contrastive losses sharing one `gather_features` (equations E1, E6, E8, E9 of docs/method.md).

Layout (E8, open_clip's local_loss + gather_with_grad): each rank's loss is over its *local* anchors against the
*global* batch, normalized by the number of local anchors. Its value is then an estimate of the full-batch loss,
and DeepSpeed's gradient averaging over ranks gives exactly the single-process full-batch gradient. Memory is
O(b_local * B_global), never O(B_global^2).

Losses (one small class each, one interface `loss(feats, tau, **aux)`):
    ClipLoss      MBCL / InfoNCE (OpenCLIP's ClipLoss)                       aux: -
    SigLipLoss    pairwise sigmoid loss with a learnable bias                 aux: bias
    NeuCLIPLoss   E6 with alpha from the NPN                                   aux: alpha_img, alpha_txt
    FastCLIPLoss  E6 with alpha = log(eps + u), u tables updated per E9       aux: index, epoch
Everything that involves exp((s_ij - s_ii)/tau) is computed in the log domain (logsumexp / logaddexp), so tau as
small as 0.01 (exponents up to 200) does not overflow in fp32.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed

# torch marks torch.distributed.nn.functional.all_gather deprecated in favour of a private functional API; it is
# still the public autograd-aware all-gather (backward = reduce-scatter), so keep it and keep the log readable.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")

# ---------------------------------------------------------------------------------------------------------------
# input checks (ValueError naming the argument)
# ---------------------------------------------------------------------------------------------------------------
_NORM_TOL = 2e-2  # bf16 features are normalized to ~4e-3; anything further off was not normalized


def _check_pair(img: Tensor, txt: Tensor, *, values: bool = True, names=("img", "txt")) -> None:
    for name, x in zip(names, (img, txt)):
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(f"{name}: expected a [B, d] tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if img.shape != txt.shape:
        raise ValueError(f"{names[1]}: shape {tuple(txt.shape)} does not match {names[0]} shape {tuple(img.shape)}")
    if values:
        for name, x in zip(names, (img, txt)):
            norms = x.detach().float().norm(dim=-1)
            if not torch.isfinite(norms).all():
                raise ValueError(f"{name}: features contain NaN or inf")
            if (norms - 1).abs().max() > _NORM_TOL:
                raise ValueError(
                    f"{name}: features must be L2-normalized (row norms in [{norms.min():.4g}, {norms.max():.4g}])"
                )


def _check_tau(tau: Tensor, *, values: bool = True) -> None:
    if not isinstance(tau, Tensor) or tau.shape != (1,):
        raise ValueError(f"tau: expected a shape-[1] tensor, got {getattr(tau, 'shape', type(tau).__name__)}")
    if values and not bool(tau.detach() > 0):
        raise ValueError(f"tau: must be > 0, got {float(tau):.4g}")


def _check_alpha(name: str, alpha: Tensor, b: int) -> None:
    if not isinstance(alpha, Tensor) or alpha.shape != (b,):
        raise ValueError(f"{name}: expected shape [{b}], got {tuple(getattr(alpha, 'shape', ()))}")


def _check_constants(eps: float, rho: float) -> None:
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    if not rho >= 0:
        raise ValueError(f"rho: must be >= 0, got {rho}")


def _log(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


def log_eps_plus(log_g: Tensor, eps: float) -> Tensor:
    """log(eps + g) from log g, without leaving the log domain (E6 stable form); eps = 0 gives log g."""
    return torch.logaddexp(torch.full_like(log_g, _log(eps)), log_g)


# ---------------------------------------------------------------------------------------------------------------
# gathering (E8)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Features:
    """Local anchors and the global batch they are compared against.

    img/txt: [b, d] this rank's anchors; img_all/txt_all: [B, d] the global batch; img == img_all[offset:offset+b].
    """

    img: Tensor
    txt: Tensor
    img_all: Tensor
    txt_all: Tensor
    offset: int = 0

    @property
    def local_size(self) -> int:
        return self.img.shape[0]

    @property
    def global_size(self) -> int:
        return self.img_all.shape[0]

    def anchor_columns(self) -> Tensor:
        """Column of each local anchor's positive pair in the [b, B] score matrices."""
        return torch.arange(self.local_size, device=self.img.device) + self.offset


def gather_features(img: Tensor, txt: Tensor) -> Features:
    """All-gather features *with gradient* (E8): the backward pass sums every rank's contribution into the local
    features, so each rank backpropagates the full gradient of its own samples. Every rank must hold the same b."""
    _check_pair(img, txt, values=False)
    world = distributed.world_size()
    if world == 1:
        return Features(img, txt, img, txt, 0)
    img_all = torch.cat(dist_fn.all_gather(img), dim=0)
    txt_all = torch.cat(dist_fn.all_gather(txt), dim=0)
    return Features(img, txt, img_all, txt_all, distributed.rank() * img.shape[0])


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate a tensor (equal shape on every rank) across ranks along dim 0, without gradient."""
    world = distributed.world_size()
    if world == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


# ---------------------------------------------------------------------------------------------------------------
# the shared pieces of E1 / E6
# ---------------------------------------------------------------------------------------------------------------
def batch_log_normalizers(feats: Features, tau: Tensor) -> tuple[Tensor, Tensor]:
    """log g_hat for the local anchors (E1 with the batch in place of the data set), shape [b] each:

    log g1_hat_i = LSE_{j != i}((s_ij - s_ii)/tau) - log(B - 1)    image anchor i, text negatives j
    log g2_hat_i = LSE_{j != i}((s_ji - s_ii)/tau) - log(B - 1)    text anchor i, image negatives j
    """
    B = feats.global_size
    if B < 2:
        raise ValueError("img: the global batch needs at least 2 pairs to have negatives")
    cols = feats.anchor_columns()
    rows = torch.arange(feats.local_size, device=cols.device)
    positive = torch.zeros(feats.local_size, B, dtype=torch.bool, device=cols.device)
    positive[rows, cols] = True  # j == i, left out of the sum
    out = []
    for anchors, others in ((feats.img, feats.txt_all), (feats.txt, feats.img_all)):
        pos = (anchors * others[cols]).sum(-1, keepdim=True)  # s_ii, [b, 1]
        # one addmm gives (s_ij - s_ii)/tau: autograd keeps only the [b, d] / [B, d] inputs, no [b, B] temporary
        # (the loss's peak memory stays a few [b, B] matrices; benchmarks/memory.py)
        z = torch.addmm(-pos / tau, anchors / tau, others.T).masked_fill(positive, float("-inf"))
        out.append(torch.logsumexp(z, dim=1) - math.log(B - 1))
    return out[0], out[1]


def conjugate_objective(
    log_g_img: Tensor, log_g_txt: Tensor, alpha_img: Tensor, alpha_txt: Tensor, tau: Tensor, eps: float, rho: float
) -> Tensor:
    """E6 over the given anchors: tau * mean_i[(eps+g1)e^-a1 + a1 - 1 + (eps+g2)e^-a2 + a2 - 1] + 2 rho tau.

    Each (eps+g)e^-a term is exp(logaddexp(log eps, log g) - a) (E6, stable form). tau multiplies the bracket, so
    the tau-gradient contains the bracket itself plus the d g/d tau part plus 2 rho (E6)."""
    t = tau.reshape(())
    total = 0.0
    for log_g, alpha in ((log_g_img, alpha_img), (log_g_txt, alpha_txt)):
        total = total + torch.exp(log_eps_plus(log_g, eps) - alpha) + alpha - 1
    return t * total.mean() + 2 * rho * t


# ---------------------------------------------------------------------------------------------------------------
# public single-batch functions (docs/api.md)
# ---------------------------------------------------------------------------------------------------------------
def rgcl_log_loss(img: Tensor, txt: Tensor, tau: Tensor, eps: float, rho: float) -> Tensor:
    """E1 on one batch with g_hat in place of g: tau/B sum_i[log(eps+g1_i) + log(eps+g2_i)] + 2 rho tau."""
    _check_pair(img, txt)
    _check_tau(tau)
    _check_constants(eps, rho)
    log_g_img, log_g_txt = batch_log_normalizers(Features(img, txt, img, txt, 0), tau)
    t = tau.reshape(())
    terms = log_eps_plus(log_g_img, eps) + log_eps_plus(log_g_txt, eps)
    return t * terms.mean() + 2 * rho * t


def neuclip_objective(
    img: Tensor, txt: Tensor, alpha_img: Tensor, alpha_txt: Tensor, tau: Tensor, eps: float, rho: float
) -> Tensor:
    """E6 on one batch (alpha given, e.g. the NPN's prediction); a scalar."""
    _check_pair(img, txt)
    _check_tau(tau)
    _check_constants(eps, rho)
    _check_alpha("alpha_img", alpha_img, img.shape[0])
    _check_alpha("alpha_txt", alpha_txt, img.shape[0])
    log_g_img, log_g_txt = batch_log_normalizers(Features(img, txt, img, txt, 0), tau)
    return conjugate_objective(log_g_img, log_g_txt, alpha_img, alpha_txt, tau, eps, rho)


# ---------------------------------------------------------------------------------------------------------------
# loss classes
# ---------------------------------------------------------------------------------------------------------------
class ContrastiveLoss(nn.Module):
    """Base: `loss(feats, tau, **aux) -> scalar` with feats from `gather_features`.

    Inputs are fully checked (shapes and values) on the first call; later calls check shapes only, so a GPU run
    does not synchronize every step."""

    name = "base"

    def __init__(self) -> None:
        super().__init__()
        self._values_checked = False

    def _check(self, feats: Features, tau: Tensor) -> None:
        values = not self._values_checked
        _check_pair(feats.img, feats.txt, values=values)
        _check_pair(feats.img_all, feats.txt_all, values=False, names=("img_all", "txt_all"))
        _check_tau(tau, values=values)
        self._values_checked = True


class ClipLoss(ContrastiveLoss):
    """MBCL / InfoNCE, as OpenCLIP's ClipLoss(local_loss=True, gather_with_grad=True) with logit_scale = 1/tau:
    mean of the image->text and text->image cross-entropies of the local anchors against the global batch (E9)."""

    name = "mbcl"

    def forward(self, feats: Features, tau: Tensor) -> Tensor:
        self._check(feats, tau)
        labels = feats.anchor_columns()
        logits_img = feats.img @ feats.txt_all.T / tau
        logits_txt = feats.txt @ feats.img_all.T / tau
        return (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels)) / 2


class SigLipLoss(ContrastiveLoss):
    """Sigmoid loss (Zhai et al. 2023) with a learnable bias, logit scale 1/tau: -1/b sum_{i local, j global}
    log sigmoid(y_ij (s_ij/tau + bias)), y = +1 on the positive pair. Every (i, j) pair is counted on exactly one
    rank, so averaging over ranks gives the single-process value and gradient."""

    name = "siglip"

    def forward(self, feats: Features, tau: Tensor, bias: Tensor) -> Tensor:
        self._check(feats, tau)
        if not isinstance(bias, Tensor) or bias.numel() != 1:
            raise ValueError("bias: SigLipLoss needs the model's shape-[1] logit bias")
        logits = feats.img @ feats.txt_all.T / tau + bias
        labels = 2 * F.one_hot(feats.anchor_columns(), feats.global_size).to(logits.dtype) - 1
        return -F.logsigmoid(labels * logits).sum() / feats.local_size


class NeuCLIPLoss(ContrastiveLoss):
    """E6: the encoder/tau objective with the NPN's alpha (detached, one value per local anchor).

    grad_w = tau/B sum_i e^{-alpha_i} grad_w g_hat_i (FastCLIP's estimator with u = e^alpha); at alpha = log(eps+g_hat)
    the gradients equal those of `rgcl_log_loss` (tests/test_losses.py shows it)."""

    name = "neuclip"

    def __init__(self, eps: float = 1e-14, rho: float = 6.5) -> None:
        super().__init__()
        _check_constants(eps, rho)
        self.eps, self.rho = eps, rho

    def forward(self, feats: Features, tau: Tensor, alpha_img: Tensor, alpha_txt: Tensor) -> Tensor:
        self._check(feats, tau)
        _check_alpha("alpha_img", alpha_img, feats.local_size)
        _check_alpha("alpha_txt", alpha_txt, feats.local_size)
        log_g_img, log_g_txt = batch_log_normalizers(feats, tau)
        return conjugate_objective(
            log_g_img, log_g_txt, alpha_img.detach(), alpha_txt.detach(), tau, self.eps, self.rho
        )


def fastclip_gamma(epoch: int, gamma_min: float, decay_epochs: int) -> float:
    """E9: FastCLIP's "cosine" gamma schedule, as its reference trainer computes it (`FastCLIPLoss.adjust_gamma` in
    src/fast_clip/loss.py of Optimization-AI/fast_clip, called with the 0-based epoch):

        gamma(0) = 1                                                              first epoch: u = g_hat
        gamma(e) = gamma_min + (1 - gamma_min) (1 + cos(pi e / decay_epochs)) / 2   for 1 <= e < decay_epochs
        gamma(e) = gamma_min                                                      for e >= decay_epochs

    The cosine is indexed by the epoch e itself, so epoch 1 is already one step down it (0.980 for gamma_min 0.2 over
    10 epochs) and gamma_min is reached at e = decay_epochs. The reference asserts gamma_decay_epochs > 0."""
    if decay_epochs < 1:
        raise ValueError(f"decay_epochs: must be >= 1, got {decay_epochs}")
    if epoch < 0:
        raise ValueError(f"epoch: must be >= 0, got {epoch}")
    if epoch == 0:
        return 1.0
    if epoch >= decay_epochs:
        return gamma_min
    return 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs)) * (1.0 - gamma_min) + gamma_min


class ShardedLogTable:
    """A per-sample table of log u (E9), sharded by index owner: rank r holds the samples with index % W == r.

    Memory: 4 bytes per sample per table on the owner only, i.e. 4 MB per million samples divided by the world size
    (FastCLIP's reference code keeps both tables replicated on every rank: 8 GB per rank at 1B samples). Values live
    on CPU by default (`device`); each step moves O(B) numbers, never the table. Stored in the log domain so that
    u = g_hat ~ exp(200) at tau = 0.01 does not overflow."""

    def __init__(
        self, num_samples: int, *, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples: must be > 0, got {num_samples}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        rows = (num_samples - rank + world_size - 1) // world_size
        self.log_u = torch.full((rows,), float("-inf"), device=device)  # u = 0 before the first visit

    def update(self, index: Tensor, log_g: Tensor, gamma: float) -> Tensor:
        """u <- (1-gamma) u + gamma g_hat for the global batch (identical `index`, `log_g` [B] on every rank); returns
        the new log u of all B entries on every rank (owners fill their rows, an all-reduce(MAX) over -inf fills in
        the rest). A sample repeated inside one batch keeps its last update.

        A row never visited (u = 0, log u = -inf) takes g_hat itself, not gamma g_hat, whatever gamma is: FastCLIP's
        reference (`FastCLIPLoss.local`) sets u = g_hat on the rows whose old u is < 1e-35, inf or nan. Every visit
        leaves a finite log u, so -inf marks exactly the rows not visited yet, and no extra mask is stored; +inf /
        nan rows take g_hat as well. The reference's 1e-35 threshold guards its linear fp32 table against underflow;
        the log-domain table holds a tiny positive u exactly, so such a row is averaged, not reset."""
        if index.min() < 0 or index.max() >= self.num_samples:
            raise ValueError(
                f"index: dataset indices must lie in [0, {self.num_samples}), got "
                f"[{int(index.min())}, {int(index.max())}]"
            )
        mine = (index % self.world_size) == self.rank
        rows = (index[mine] // self.world_size).to(self.log_u.device)
        old = self.log_u[rows]
        g = log_g[mine].to(old)
        new = torch.where(torch.isfinite(old), torch.logaddexp(old + _log(1.0 - gamma), g + _log(gamma)), g)
        self.log_u[rows] = new
        out = torch.full_like(log_g, float("-inf"))
        out[mine] = new.to(out)
        if self.world_size > 1:
            dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def snapshot_rows(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, their log u): what `update(index, ...)` may overwrite on this rank, for `restore_rows`. Indices
        outside the table are left out (update refuses them before writing anything)."""
        index = index.to(self.log_u.device)
        mine = ((index % self.world_size) == self.rank) & (index >= 0) & (index < self.num_samples)
        rows = index[mine] // self.world_size
        return rows, self.log_u[rows].clone()

    def restore_rows(self, rows: Tensor, values: Tensor) -> None:
        """Undo an `update` from its `snapshot_rows` (a row repeated in the batch was saved with the same value)."""
        self.log_u[rows] = values

    def lookup_local(self, index: Tensor) -> Tensor:
        """log u of indices this rank owns (for checkpoints and diagnostics)."""
        if ((index % self.world_size) != self.rank).any():
            raise ValueError("index: lookup_local called with indices owned by another rank")
        return self.log_u[(index // self.world_size).to(self.log_u.device)]

    def state_dict(self) -> dict:
        return {"log_u": self.log_u, "rank": self.rank, "world_size": self.world_size, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if (state["num_samples"], state["world_size"], state["rank"]) != (self.num_samples, self.world_size, self.rank):
            raise ValueError("state: u-table shard was written for another data size or world layout")
        self.log_u.copy_(state["log_u"])

    def load_from_shards(self, shards: list[dict]) -> None:
        """Re-shard tables written by another world size: old rank r held the indices with index % W_old == r."""
        old_world = len(shards)
        if any(s["num_samples"] != self.num_samples or s["world_size"] != old_world for s in shards):
            raise ValueError("state: u-table shards do not form one table of this data size")
        mine = torch.arange(self.rank, self.num_samples, self.world_size)
        for r, shard in enumerate(shards):
            owned = (mine % old_world) == r
            self.log_u[owned.nonzero().squeeze(1)] = shard["log_u"][mine[owned] // old_world].to(self.log_u)


class FastCLIPLoss(NeuCLIPLoss):
    """FastCLIP-v3 (RGCL-g, E9): E6 with e^{-alpha} = 1/(eps + u), u tables indexed by the dataset index, updated as
    FastCLIP's reference trainer does: u <- (1-gamma) u + gamma g_hat, a row's first visit sets u = g_hat
    (`ShardedLogTable.update`), gamma from the 0-based epoch by FastCLIP's cosine schedule (`fastclip_gamma`).

    `forward(feats, tau, index, epoch)` updates the tables with this batch's g_hat and returns the loss. With
    gradient accumulation the engine calls `update_alpha` once per optimizer step on the whole global batch and
    then the inherited E6 loss per micro-batch (`loss_with_alpha`)."""

    name = "fastclip"

    def __init__(
        self,
        num_samples: int,
        eps: float = 1e-14,
        rho: float = 6.5,
        gamma_min: float = 0.2,
        gamma_decay_epochs: int = 10,
        table_device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(eps=eps, rho=rho)
        if not 0 < gamma_min <= 1:
            raise ValueError(f"gamma_min: must be in (0, 1], got {gamma_min}")
        if gamma_decay_epochs < 1:
            raise ValueError(f"gamma_decay_epochs: must be >= 1, got {gamma_decay_epochs}")
        self.gamma_min, self.gamma_decay_epochs = gamma_min, gamma_decay_epochs
        rank, world = distributed.rank(), distributed.world_size()
        self.u_img = ShardedLogTable(num_samples, rank=rank, world_size=world, device=table_device)
        self.u_txt = ShardedLogTable(num_samples, rank=rank, world_size=world, device=table_device)

    def gamma(self, epoch: int) -> float:
        return fastclip_gamma(epoch, self.gamma_min, self.gamma_decay_epochs)

    @torch.no_grad()
    def update_alpha(
        self, index_all: Tensor, log_g_img_all: Tensor, log_g_txt_all: Tensor, epoch: int
    ) -> tuple[Tensor, Tensor]:
        """E9 update on the global batch with gamma = `fastclip_gamma(epoch, ...)` (epoch 0-based; rows seen for the
        first time take g_hat); returns alpha = log(eps + u_new) for all B samples."""
        gamma = self.gamma(epoch)
        alphas = []
        for table, log_g in ((self.u_img, log_g_img_all), (self.u_txt, log_g_txt_all)):
            log_u = table.update(index_all, log_g.detach().float(), gamma)
            alphas.append(log_eps_plus(log_u, self.eps).to(log_g.dtype))
        return alphas[0], alphas[1]

    def loss_with_alpha(self, feats: Features, tau: Tensor, alpha_img: Tensor, alpha_txt: Tensor) -> Tensor:
        return super().forward(feats, tau, alpha_img, alpha_txt)

    def forward(self, feats: Features, tau: Tensor, index: Tensor, epoch: int) -> Tensor:
        self._check(feats, tau)
        if not isinstance(index, Tensor) or index.shape != (feats.local_size,):
            raise ValueError(f"index: expected a [{feats.local_size}] tensor of dataset indices")
        log_g_img, log_g_txt = batch_log_normalizers(feats, tau)
        index_all = all_gather_no_grad(index.to(feats.img.device))
        alpha_img, alpha_txt = self.update_alpha(
            index_all, all_gather_no_grad(log_g_img), all_gather_no_grad(log_g_txt), epoch
        )
        sl = slice(feats.offset, feats.offset + feats.local_size)
        return conjugate_objective(log_g_img, log_g_txt, alpha_img[sl], alpha_txt[sl], tau, self.eps, self.rho)


LOSSES = {cls.name: cls for cls in (ClipLoss, SigLipLoss, NeuCLIPLoss, FastCLIPLoss)}
