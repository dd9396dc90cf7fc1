"""The normalizer prediction network (NPN): E3, E4, E5 and the restart of E7.4.

The NPN predicts the per-sample log-normalizer alpha_i ~ log(eps + g_i) from the sample's embeddings and tau, so
the auxiliary variables of E2 need no O(n) storage (E3). It is small, replicated on every rank, and trained by its
own AdaGrad on the all-gathered global batch, in one of two ways (E8, `NPN.fit`): option (b), the default
(`--npn-parallel sharded`), each rank runs the inner steps on its own rows and the gradients are all-reduced once
per step; option (a) (`replicated`), every rank runs the identical inner loop on the whole batch without any
communication. Either way every replica applies the same update, so they stay bitwise identical (`checksum` lets
the engine verify it).

Restart (E7.4): every `restart_every` steps the prototypes are re-drawn from the current global batch with a seed
that is the same on every rank. The AdaGrad accumulators are KEPT by default (`reset_optimizer=False`): a fresh
AdaGrad moves every coordinate by ~lr in its first steps (0.4 in norm for d=64, lr=0.05 — more than the unit-norm
prototypes can take at tau=0.01), which scrambles the just-restarted prototypes. On the tiny preset (embedded
data, tau at 0.01, m=512, T_u=10, restart every 100 steps) a reset sends the NPN's batch error from ~0.3 to ~5
nats at the restart, and it stays above 2.5; with the accumulators kept it stays at 0.03-0.1 nats.
"""

from __future__ import annotations

import copy
import hashlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import log_eps_plus

NPN_VARIANTS = ("tailored", "mlp")


class CosineScores(torch.autograd.Function):
    """offset + anchors @ normalize(protos).T, [B, m], with a hand-written backward that never normalizes the
    prototypes (offset: [B, 1], a constant: E4's -s_ii / tau).

    Same values and gradients as `offset + anchors @ F.normalize(protos, dim=-1).T` (a test checks both against
    autograd of that formula), without autograd's elementwise passes over m x d for the normalization and its
    backward, and without any [B, m] elementwise work in the backward. With r_k = 1 / |W_k|, W^_k = r_k W_k and
    M = grad.T @ anchors ([m, d], one mm):
        dL/dW_k = r_k (M_k - (W^_k . M_k) W^_k)       (the radial part of M_k removed)
    The forward scales whichever side is smaller: the m columns of the [B, m] product when B < d, the prototypes
    when B >= d. That halves the NPN phase on CPU at m = 4096, d = 512, B = 32, where normalize's elementwise
    passes are most of the phase's time.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, anchors: Tensor, protos: Tensor, offset: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(protos, dim=-1)  # one fused reduction, no m x d temporary
        inv_norm = norm.clamp_min(1e-12).reciprocal()  # F.normalize's eps
        ctx.save_for_backward(anchors, protos, inv_norm, norm >= 1e-12)
        if anchors.shape[0] < protos.shape[1]:
            return (anchors @ protos.T).mul_(inv_norm).add_(offset)
        return torch.addmm(offset, anchors, (protos * inv_norm[:, None]).T)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        anchors, protos, inv_norm, norm_used = ctx.saved_tensors
        grad_anchors = grad_protos = None
        if ctx.needs_input_grad[0]:
            grad_anchors = (grad * inv_norm) @ protos
        if ctx.needs_input_grad[1]:
            m_rows = grad.T @ anchors  # M, [m, d]
            radial = (protos * m_rows).sum(-1) * inv_norm.square()  # (W^_k . M_k) / |W_k|
            radial = radial.where(norm_used, 0.0)  # a clamped norm is a constant: no radial term
            grad_protos = m_rows.addcmul_(protos, radial[:, None], value=-1.0).mul_(inv_norm[:, None])
        return grad_anchors, grad_protos, None  # the offset is a constant of the inner steps


class TailoredNPN(nn.Module):
    """E4: alpha1_i = log(eps + 1/m sum_k exp((cos(e1_i, W1_k) - s_ii)/tau)), likewise alpha2 with W2 and e2.

    W1 (`proto_txt`) are m "typical text negatives" for image anchors; W2 (`proto_img`) typical image negatives for
    text anchors. The form mirrors the true log-normalizer with m learned negatives in place of the n-1 real ones."""

    def __init__(self, dim: int, num_prototypes: int, eps: float, generator: torch.Generator) -> None:
        super().__init__()
        self.eps = eps
        self.proto_txt = nn.Parameter(F.normalize(torch.randn(num_prototypes, dim, generator=generator), dim=-1))
        self.proto_img = nn.Parameter(F.normalize(torch.randn(num_prototypes, dim, generator=generator), dim=-1))

    def forward(self, img: Tensor, txt: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
        return self.alpha(*self.prepare(img, txt, tau))

    @staticmethod
    def prepare(img: Tensor, txt: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What is constant while the encoders and tau are frozen (E5): e/tau and -s_ii/tau. `fit` computes it once
        for its T_u inner steps, so each step is one addmm + logsumexp per side (no [B, m] subtract or divide)."""
        neg_pos = -(img * txt).sum(-1, keepdim=True) / tau  # -s_ii / tau, [B, 1]
        return img / tau, txt / tau, neg_pos

    def alpha(self, img_over_tau: Tensor, txt_over_tau: Tensor, neg_pos: Tensor) -> tuple[Tensor, Tensor]:
        m = self.proto_txt.shape[0]
        out = []
        for anchors, protos in ((img_over_tau, self.proto_txt), (txt_over_tau, self.proto_img)):
            z = CosineScores.apply(anchors, protos, neg_pos)  # (cos(e_i, W_k) - s_ii) / tau
            log_mean = torch.logsumexp(z, dim=1) - math.log(m)  # log domain throughout (E4)
            out.append(log_eps_plus(log_mean, self.eps))
        return out[0], out[1]

    @torch.no_grad()
    def restart(self, img: Tensor, txt: Tensor, generator: torch.Generator) -> None:
        """W1 <- text embeddings, W2 <- image embeddings of random samples of the global batch (E7.4)."""
        B, m = img.shape[0], self.proto_txt.shape[0]
        if m <= B:
            idx = torch.randperm(B, generator=generator)[:m]
            jitter = 0.0
        else:
            # fewer samples than prototypes: draw with replacement and separate the copies, otherwise duplicated
            # prototypes get identical gradients forever and act as one
            idx = torch.randint(0, B, (m,), generator=generator)
            jitter = 1e-2
        idx = idx.to(img.device)
        for protos, source in ((self.proto_txt, txt), (self.proto_img, img)):
            noise = torch.randn(protos.shape, generator=generator).to(protos) * jitter
            protos.copy_(F.normalize(source[idx].to(protos) + noise, dim=-1))


class MLPNPN(nn.Module):
    """The generic-MLP variant of the paper's ablation: [e1, e2, log tau] -> hidden -> (alpha1, alpha2)."""

    def __init__(self, dim: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * dim + 1, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 2)
        )
        self._init(generator)

    @torch.no_grad()
    def _init(self, generator: torch.Generator) -> None:
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
                layer.bias.zero_()

    def forward(self, img: Tensor, txt: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
        return self.alpha(*self.prepare(img, txt, tau))

    @staticmethod
    def prepare(img: Tensor, txt: Tensor, tau: Tensor) -> tuple[Tensor]:
        log_tau = torch.log(tau).reshape(1, 1).expand(img.shape[0], 1)
        return (torch.cat([img, txt, log_tau.to(img)], dim=-1),)

    def alpha(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(inputs)
        return out[:, 0], out[:, 1]

    @torch.no_grad()
    def restart(self, img: Tensor, txt: Tensor, generator: torch.Generator) -> None:
        """No-op: E7.4 re-draws prototypes from the batch and the MLP has none. (Re-initializing the MLP instead
        throws alpha far off right after the restart, and the loss of the tiny run goes non-finite.)"""


def npn_objective(
    alpha_img: Tensor, alpha_txt: Tensor, log_target_img: Tensor, log_target_txt: Tensor, tau: Tensor
) -> Tensor:
    """E5: tau/B sum_i[(eps+g1_i) e^-alpha1_i + alpha1_i + (eps+g2_i) e^-alpha2_i + alpha2_i].

    log_target_* = log(eps + g_hat) (constants); its alpha-gradient tau/B (1 - (eps+g)e^-alpha) vanishes exactly at
    alpha = log(eps + g_hat)."""
    total = torch.exp(log_target_img - alpha_img) + alpha_img + torch.exp(log_target_txt - alpha_txt) + alpha_txt
    return tau.reshape(()) * total.mean()


class NPN:
    """The NPN with its own AdaGrad: `predict`, `fit` (T_u inner steps, E5), `restart` (E7.4), state I/O."""

    def __init__(
        self,
        dim: int,
        *,
        num_prototypes: int = 4096,
        eps: float = 1e-14,
        lr: float = 0.05,
        variant: str = "tailored",
        mlp_hidden: int = 256,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if dim <= 0:
            raise ValueError(f"dim: must be > 0, got {dim}")
        if num_prototypes <= 0:
            raise ValueError(f"num_prototypes: must be > 0, got {num_prototypes}")
        if not lr > 0:
            raise ValueError(f"lr: must be > 0, got {lr}")
        if not eps >= 0:
            raise ValueError(f"eps: must be >= 0, got {eps}")
        if variant not in NPN_VARIANTS:
            raise ValueError(f"variant: must be one of {NPN_VARIANTS}, got {variant!r}")
        self.dim, self.eps, self.lr, self.variant = dim, eps, lr, variant
        generator = torch.Generator().manual_seed(seed)  # identical initial replicas on every rank
        if variant == "tailored":
            self.net: nn.Module = TailoredNPN(dim, num_prototypes, eps, generator)
        else:
            self.net = MLPNPN(dim, mlp_hidden, generator)
        self.net.to(device)
        self.optimizer = self._new_optimizer()

    def _fused_flags(self) -> dict:
        # CPU: torch's fused AdaGrad (one vectorized kernel per tensor; 1.4 ms vs 7 ms per step for 2 x [4096, 512]
        # on 2 cores, T_u of them per training step); torch has it for CPU only, so elsewhere the plain loop.
        # Every replica runs the same kernel on the same gradient either way, so they stay bitwise identical.
        return {"fused": True, "foreach": None} if self.device.type == "cpu" else {"fused": None, "foreach": False}

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adagrad(self.net.parameters(), lr=self.lr, **self._fused_flags())

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _inputs(self, img: Tensor, txt: Tensor, tau: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if img.dim() != 2 or img.shape != txt.shape or img.shape[1] != self.dim:
            raise ValueError(
                f"img: expected [B, {self.dim}] image and text features of equal shape, got "
                f"{tuple(img.shape)} and {tuple(txt.shape)}"
            )
        if tau.numel() != 1 or not bool(tau.detach().reshape(()) > 0):
            raise ValueError("tau: expected one positive temperature")
        dtype = next(self.net.parameters()).dtype
        return (
            img.detach().to(self.device, dtype),
            txt.detach().to(self.device, dtype),
            tau.detach().reshape(1).to(self.device, dtype),
        )

    @torch.no_grad()
    def predict(self, img: Tensor, txt: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
        """alpha for each pair (detached), shape [B] each: the constants of the encoder step (E6)."""
        return self.net(*self._inputs(img, txt, tau))

    def fit(
        self,
        img: Tensor,
        txt: Tensor,
        log_target_img: Tensor,
        log_target_txt: Tensor,
        tau: Tensor,
        steps: int,
        *,
        rows: slice | None = None,
    ) -> float:
        """T_u AdaGrad steps on E5 with the encoders and tau frozen (E7.2); returns the last objective value (over
        the whole batch).

        Every rank passes the same global batch. `rows=None` (E8 option (a)): every rank runs the whole batch and the
        replicas stay identical without communication. `rows` = this rank's block of it (E8 option (b)): each rank
        computes E5 on its rows, weighted by rows/B so that the ranks' terms add up to the full-batch objective, and
        the gradients are summed with one all-reduce per inner step; every rank then applies the same AdaGrad step
        to the same summed gradient, so the replicas stay identical with O(b_local) work per rank."""
        if steps < 0:
            raise ValueError(f"steps: must be >= 0, got {steps}")
        img, txt, tau = self._inputs(img, txt, tau)
        targets = [t.detach().to(self.device, img.dtype) for t in (log_target_img, log_target_txt)]
        if targets[0].shape != (img.shape[0],) or targets[1].shape != (img.shape[0],):
            raise ValueError(f"log_target_img: expected shape [{img.shape[0]}]")
        batch = img.shape[0]
        if rows is not None:
            img, txt, targets = img[rows], txt[rows], [t[rows] for t in targets]
        weight = img.shape[0] / batch  # 1 for the whole batch
        value = float("nan")
        self.net.train()
        constants = self.net.prepare(img, txt, tau)  # frozen encoders and tau: the same for every inner step
        params = list(self.net.parameters())
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = weight * npn_objective(*self.net.alpha(*constants), *targets, tau)
            loss.backward()
            if rows is not None:
                flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1)])
                dist.all_reduce(flat)  # one collective per inner step
                offset = 0
                for p in params:
                    p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
                value = flat[-1]
            else:
                value = loss.detach()
            self.optimizer.step()
        return float(value)

    def restart(self, img: Tensor, txt: Tensor, seed: int, *, reset_optimizer: bool = False) -> None:
        """Re-draw the prototypes from the global batch (same `seed` and batch on every rank -> same result);
        `reset_optimizer` also clears AdaGrad's accumulators (off by default, see the module docstring)."""
        img, txt, _ = self._inputs(img, txt, torch.ones(1))
        self.net.restart(img, txt, torch.Generator().manual_seed(int(seed)))
        if reset_optimizer:
            self.optimizer = self._new_optimizer()

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "variant": self.variant}

    def load_state_dict(self, state: dict) -> None:
        if state.get("variant") != self.variant:
            raise ValueError(
                f"state: NPN checkpoint is variant {state.get('variant')!r}, this run uses {self.variant!r}"
            )
        self.net.load_state_dict(state["net"])
        # deepcopy: torch's Optimizer.load_state_dict keeps same-device tensors by reference
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        for group in self.optimizer.param_groups:  # the saved groups carry the saving device's kernel choice
            group.update(self._fused_flags())

    @torch.no_grad()
    def checksum(self) -> str:
        """sha256 of every parameter and AdaGrad buffer: equal strings <=> bitwise identical replicas."""
        h = hashlib.sha256()
        for p in self.net.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
            state = self.optimizer.state.get(p, {})
            for key in sorted(state):
                v = state[key]
                if isinstance(v, Tensor):
                    h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
