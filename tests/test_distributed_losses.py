"""E8: 2 gloo processes with the local-loss layout give the 1-process full-batch gradients, for every loss; the NPN
replicas stay bitwise identical; FastCLIP's sharded u tables equal the 1-process table."""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist_utils import run_ranks

from neuclip_ds.losses import (
    ClipLoss,
    FastCLIPLoss,
    NeuCLIPLoss,
    ShardedLogTable,
    SigLipLoss,
    all_gather_no_grad,
    batch_log_normalizers,
    gather_features,
)
from neuclip_ds.npn import NPN

B, D_IN, D, N_DATA = 8, 6, 5, 24
LOSS_NAMES = ("mbcl", "siglip", "neuclip", "fastclip")


def global_inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "x_img": torch.randn(2, B, D_IN, generator=g, dtype=torch.float64),  # two steps
        "x_txt": torch.randn(2, B, D_IN, generator=g, dtype=torch.float64),
        "w_img": torch.randn(D_IN, D, generator=g, dtype=torch.float64),
        "w_txt": torch.randn(D_IN, D, generator=g, dtype=torch.float64),
        "alpha": torch.randn(2, 2, B, generator=g, dtype=torch.float64),
        "index": torch.stack([torch.randperm(N_DATA, generator=g)[:B] for _ in range(2)]),
    }


def run_losses(rank, world_size):
    """One replicated linear 'encoder' per side; each rank takes its slice of the global batch; gradients are
    averaged over ranks as DeepSpeed/DDP do. Returns the averaged gradients of each loss at two steps."""
    inp = global_inputs()
    b = B // world_size
    sl = slice(rank * b, (rank + 1) * b)
    results = {}
    for name in LOSS_NAMES:
        w_img = inp["w_img"].clone().requires_grad_()
        w_txt = inp["w_txt"].clone().requires_grad_()
        tau = torch.tensor([0.15], dtype=torch.float64, requires_grad=True)
        bias = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
        loss_fn = {"mbcl": ClipLoss, "siglip": SigLipLoss, "neuclip": NeuCLIPLoss}.get(name)
        loss_fn = loss_fn() if loss_fn else FastCLIPLoss(N_DATA, eps=1e-6, gamma_min=0.5, gamma_decay_epochs=1)
        per_step = []
        for step, epoch in ((0, 0), (1, 2)):
            img = F.normalize(inp["x_img"][step, sl] @ w_img, dim=-1)
            txt = F.normalize(inp["x_txt"][step, sl] @ w_txt, dim=-1)
            feats = gather_features(img, txt)
            aux = {
                "mbcl": {},
                "siglip": {"bias": bias},
                "neuclip": {"alpha_img": inp["alpha"][step, 0, sl], "alpha_txt": inp["alpha"][step, 1, sl]},
                "fastclip": {"index": inp["index"][step, sl], "epoch": epoch},
            }[name]
            loss = loss_fn(feats, tau, **aux)
            params = [w_img, w_txt, tau, bias]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            if world_size > 1:
                for g_ in grads:
                    dist.all_reduce(g_)
                    g_ /= world_size
            loss_avg = loss.detach().clone()
            if world_size > 1:
                dist.all_reduce(loss_avg)
                loss_avg /= world_size
            per_step.append({"grads": grads, "loss": loss_avg})
        if name == "fastclip":
            tables = {}
            for side, table in (("img", loss_fn.u_img), ("txt", loss_fn.u_txt)):
                full = torch.full((N_DATA,), float("-inf"))
                full[torch.arange(rank, N_DATA, world_size)] = table.log_u
                if world_size > 1:
                    dist.all_reduce(full, op=dist.ReduceOp.MAX)
                tables[side] = full
            per_step.append(tables)
        results[name] = per_step
    return results


def table_steps():
    """Global batches (index, log g_hat, gamma) with rows seen again and rows first seen at gamma < 1."""
    g = torch.Generator().manual_seed(3)
    indices = ([0, 1, 2, 3, 4, 5, 6, 7], [4, 5, 6, 7, 8, 9, 10, 11], [1, 9, 13, 22, 5, 16, 23, 2])
    return [
        (torch.tensor(idx), 3 * torch.randn(B, generator=g), gamma) for idx, gamma in zip(indices, (0.6, 0.6, 0.25))
    ]


def run_table(rank, world_size):
    table = ShardedLogTable(N_DATA, rank=rank, world_size=world_size)
    outs = [table.update(index, log_g, gamma) for index, log_g, gamma in table_steps()]
    return {"outs": outs, "log_u": table.log_u.clone()}


def run_npn(rank, world_size, sharded=False):
    """E8 (a): gather features and log g_hat, identical inner loop on every rank, restart with a shared seed.
    sharded (E8 (b)): each rank's inner steps on its own rows of the global batch, gradients all-reduced."""
    inp = global_inputs()
    b = B // world_size
    sl = slice(rank * b, (rank + 1) * b)
    npn = NPN(D, num_prototypes=6, eps=1e-6, lr=0.05, seed=0)
    tau = torch.tensor([0.15])
    checksums = []
    for step in range(2):
        img = F.normalize(inp["x_img"][step, sl].float() @ inp["w_img"].float(), dim=-1)
        txt = F.normalize(inp["x_txt"][step, sl].float() @ inp["w_txt"].float(), dim=-1)
        feats = gather_features(img, txt)
        lg1, lg2 = batch_log_normalizers(feats, tau)
        before = npn.net.proto_txt.detach().clone()
        value = npn.fit(
            feats.img_all,
            feats.txt_all,
            all_gather_no_grad(lg1),
            all_gather_no_grad(lg2),
            tau,
            steps=5,
            rows=sl if sharded else None,
        )
        checksums.append(npn.checksum())
        fitted = npn.net.proto_txt.detach().clone()
        npn.restart(feats.img_all, feats.txt_all, seed=step)
        checksums.append(npn.checksum())
    return {
        "checksums": checksums,
        "proto": npn.net.proto_txt.detach().clone(),
        "last_value": value,
        "fitted": fitted,
        "moved": float((fitted - before).abs().max()),
    }


def test_two_rank_gradients_equal_one_rank_full_batch_for_every_loss():
    one = run_losses(0, 1)
    two = run_ranks(run_losses, world_size=2)
    for name in LOSS_NAMES:
        for step in range(2):
            ref = one[name][step]
            for r in range(2):
                got = two[r][name][step]
                assert math.isclose(float(got["loss"]), float(ref["loss"]), rel_tol=1e-10), name
                for g, gr in zip(got["grads"], ref["grads"]):
                    assert torch.allclose(g, gr, rtol=1e-9, atol=1e-12), (name, step, (g - gr).abs().max())
        assert ref["grads"][0].abs().max() > 0  # the comparison is not vacuous
    for side in ("img", "txt"):  # sharded u tables == the single-process table
        ref = one["fastclip"][2][side]
        for r in range(2):
            got = two[r]["fastclip"][2][side]
            assert torch.equal(torch.isinf(got), torch.isinf(ref))
            assert torch.allclose(got[~torch.isinf(ref)], ref[~torch.isinf(ref)], rtol=1e-6)


def test_two_rank_u_table_first_visit_and_update_match_dense_reference():
    """FastCLIP's rule on the sharded table: a row's first visit sets u = g_hat (whatever gamma), later visits
    u = (1-gamma) u + gamma g_hat; every rank returns all B new values, each rank stores only its rows."""
    u = torch.zeros(N_DATA, dtype=torch.float64)
    seen = torch.zeros(N_DATA, dtype=torch.bool)
    want_outs, first_masks = [], []
    for index, log_g, gamma in table_steps():
        g = log_g.double().exp()
        first = ~seen[index]
        u[index] = torch.where(first, g, (1 - gamma) * u[index] + gamma * g)
        seen[index] = True
        want_outs.append(u[index].log())
        first_masks.append(first)
    assert [int(f.sum()) for f in first_masks] == [8, 4, 4]  # first visits (all at gamma < 1) and second ones
    want_table = torch.where(seen, u.log(), torch.tensor(float("-inf"), dtype=torch.float64))
    for world_size, results in ((1, [run_table(0, 1)]), (2, run_ranks(run_table, world_size=2))):
        for rank, res in enumerate(results):
            for (_, log_g, _), out, want, first in zip(table_steps(), res["outs"], want_outs, first_masks):
                assert torch.equal(out[first], log_g[first])  # u = g_hat exactly on a first visit
                torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
            mine = want_table[rank::world_size]
            assert torch.equal(torch.isneginf(res["log_u"]), torch.isneginf(mine))
            torch.testing.assert_close(
                res["log_u"][seen[rank::world_size]].double(), mine[seen[rank::world_size]], rtol=1e-6, atol=1e-6
            )


def test_npn_replicas_stay_bitwise_identical():
    two = run_ranks(run_npn, world_size=2)
    assert two[0]["checksums"] == two[1]["checksums"]
    assert len(set(two[0]["checksums"])) == 4  # the checksum moves with every fit and restart
    one = run_npn(0, 1)
    assert torch.allclose(one["proto"], two[0]["proto"], atol=1e-5)


def test_sharded_npn_inner_loop_equals_the_full_batch_one():
    """E8 (b): each rank's E5 on its rows, weighted b/B, gradients summed -> the single-process full-batch NPN."""
    two = run_ranks(run_npn, world_size=2, args=(True,))
    assert two[0]["checksums"] == two[1]["checksums"]  # replicas identical without running the whole batch
    one = run_npn(0, 1)
    assert torch.allclose(one["fitted"], two[0]["fitted"], atol=1e-6)
    assert one["moved"] > 1e-3  # the inner steps did move the prototypes
    assert math.isclose(two[0]["last_value"], one["last_value"], rel_tol=1e-5)  # reported E5 = full-batch value
