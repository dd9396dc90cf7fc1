"""Normalizer-error diagnostic (docs/method.md, "Normalizer error"): the streamed exact E1 normalizers match a
brute-force float64 loop, exclude j == i by dataset index, agree across 1 and 2 gloo processes; the three estimates
(MBCL, FastCLIP tables, NPN) and the error summary."""

import math

import pytest
import torch
import torch.nn.functional as F
from _dist_utils import run_ranks

from neuclip_ds.diagnostics import (
    NormErrProbe,
    exact_log_normalizers,
    fastclip_estimate,
    mbcl_estimate,
    normalizer_errors,
    npn_estimate,
)
from neuclip_ds.losses import Features, ShardedLogTable, batch_log_normalizers
from neuclip_ds.npn import NPN

EPS = 1e-6
N, D = 40, 8


def dataset(seed=0, n=N, d=D):
    """Features in stream order plus a shuffled, non-contiguous dataset index per row (index != position)."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(n, d, generator=g), dim=-1)
    index = torch.randperm(n, generator=g) * 3 + 5
    return img, txt, index


def chunk_bounds(n, seed):
    """Random chunk sizes 1..9 covering [0, n)."""
    g = torch.Generator().manual_seed(seed)
    bounds, start = [], 0
    while start < n:
        stop = min(n, start + int(torch.randint(1, 10, (1,), generator=g)))
        bounds.append((start, stop))
        start = stop
    return bounds


def chunks(img, txt, index, bounds):
    return [(img[a:b], txt[a:b], index[a:b]) for a, b in bounds]


def middle_anchor_rows(bounds, count):
    """Rows strictly inside chunks (neither first nor last of their chunk) where possible."""
    rows = [r for a, b in bounds for r in range(a + 1, b - 1)]
    assert len(rows) >= count
    step = len(rows) // count
    return rows[::step][:count]


def brute_force(img, txt, index, anchor_rows, tau, eps):
    """E1 with explicit loops in float64 Python arithmetic; j == i excluded by dataset index."""
    img, txt = img.double().tolist(), txt.double().tolist()
    index = index.tolist()
    dot = lambda u, v: math.fsum(a * b for a, b in zip(u, v))  # noqa: E731
    n = len(index)
    out1, out2 = [], []
    for i in anchor_rows:
        s_ii = dot(img[i], txt[i])
        g1 = g2 = 0.0
        for j in range(n):
            if index[j] == index[i]:
                continue
            g1 += math.exp((dot(img[i], txt[j]) - s_ii) / tau)  # s_ij: image anchor, text negative
            g2 += math.exp((dot(img[j], txt[i]) - s_ii) / tau)  # s_ji: text anchor, image negative
        out1.append(math.log(eps + g1 / (n - 1)))
        out2.append(math.log(eps + g2 / (n - 1)))
    return torch.tensor(out1, dtype=torch.float64), torch.tensor(out2, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_exact_matches_brute_force(tau, seed):
    img, txt, index = dataset(seed)
    bounds = chunk_bounds(N, seed + 10)
    rows = middle_anchor_rows(bounds, 6)
    exact1, exact2 = exact_log_normalizers(
        img[rows],
        txt[rows],
        index[rows],
        chunks(img, txt, index, bounds),
        torch.tensor([tau], dtype=torch.float64),
        EPS,
    )
    ref1, ref2 = brute_force(img, txt, index, rows, tau, EPS)
    assert exact1.dtype == torch.float64 and exact1.shape == (6,) and exact2.shape == (6,)
    torch.testing.assert_close(exact1, ref1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(exact2, ref2, rtol=1e-12, atol=1e-12)
    # the chunking does not matter: one chunk with everything gives the same numbers
    one1, one2 = exact_log_normalizers(img[rows], txt[rows], index[rows], [(img, txt, index)], tau, EPS)
    torch.testing.assert_close(one1, exact1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one2, exact2, rtol=1e-12, atol=1e-12)


def test_self_pair_excluded_by_index_not_position_or_features():
    img, txt, index = dataset(3)
    # a different sample (other index) with exactly the anchor's features: it must stay a negative
    anchor_row, twin_row = 17, 30
    img[twin_row], txt[twin_row] = img[anchor_row], txt[anchor_row]
    bounds = chunk_bounds(N, 4)
    tau = 0.05
    exact1, exact2 = exact_log_normalizers(
        img[[anchor_row]], txt[[anchor_row]], index[[anchor_row]], chunks(img, txt, index, bounds), tau, EPS
    )
    ref1, ref2 = brute_force(img, txt, index, [anchor_row], tau, EPS)
    torch.testing.assert_close(exact1, ref1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(exact2, ref2, rtol=1e-12, atol=1e-12)
    # had the twin been dropped too (exclusion by features), g would lack its exp(0) term: in g-space the exact
    # sum exceeds the sum over the other 38 samples by exactly 1
    others = [j for j in range(N) if j not in (anchor_row, twin_row)]
    s_ii = float((img[anchor_row].double() * txt[anchor_row].double()).sum())
    sum_wrong = sum(math.exp((float(img[anchor_row].double() @ txt[j].double()) - s_ii) / tau) for j in others)
    sum_exact = (math.exp(float(exact1)) - EPS) * (N - 1)
    assert sum_exact - sum_wrong == pytest.approx(1.0, abs=1e-8)
    # the anchor's own row is recognised by its index alone: give that row a fresh index and it becomes a
    # negative (the anchor is then held out): n = 40 negatives, the sum gains exactly exp(0) = 1
    relabeled = index.clone()
    relabeled[anchor_row] = 10_000
    held1, _ = exact_log_normalizers(
        img[[anchor_row]], txt[[anchor_row]], index[[anchor_row]], chunks(img, txt, relabeled, bounds), tau, EPS
    )
    sum_held = (math.exp(float(held1)) - EPS) * N
    assert sum_held - sum_exact == pytest.approx(1.0, abs=1e-8)


def test_held_out_anchor_divides_by_n_and_duplicates_rejected():
    img, txt, index = dataset(5)
    tau = 0.5
    # anchor = row 0, stream = rows 1.. (anchor held out): all n' = N-1 streamed samples are negatives, mean over n'
    held1, _ = exact_log_normalizers(img[:1], txt[:1], index[:1], [(img[1:], txt[1:], index[1:])], tau, 0.0)
    s = img[0].double() @ txt[1:].double().T
    ref = torch.logsumexp((s - img[0].double() @ txt[0].double()) / tau, 0) - math.log(N - 1)
    torch.testing.assert_close(held1, ref.reshape(1), rtol=1e-12, atol=1e-12)
    # an index listed twice in the stream is an error
    with pytest.raises(ValueError, match="more than once"):
        exact_log_normalizers(img[:1], txt[:1], index[:1], [(img, txt, index), (img[:1], txt[:1], index[:1])], tau, EPS)


def _dist_worker(rank, world_size, tau, eps):
    img, txt, index = dataset(7)
    bounds = chunk_bounds(N, 8)
    rows = middle_anchor_rows(bounds, 6)
    mine = chunks(img, txt, index, bounds)[rank::world_size]  # each rank streams its own share
    exact = exact_log_normalizers(
        img[rows], txt[rows], index[rows], mine, torch.tensor([tau], dtype=torch.float64), eps
    )

    # sharded FastCLIP tables: owner = index % W, row = index // W; fill log u = f(index)
    n_idx = int(index.max()) + 1
    tables = []
    for offset in (0.0, 1.0):
        t = ShardedLogTable(n_idx, rank=rank, world_size=world_size)
        owned = torch.arange(rank, n_idx, world_size)
        t.log_u.copy_(owned.float() * 0.01 - 3 + offset)
        tables.append(t)
    fast = fastclip_estimate(tables[0], tables[1], index[rows], eps)
    return {"exact": exact, "fast": fast, "n_chunks": len(mine)}


def test_two_process_gloo_equals_one_process():
    tau, eps = 0.05, EPS
    results = run_ranks(_dist_worker, world_size=2, args=(tau, eps))
    img, txt, index = dataset(7)
    bounds = chunk_bounds(N, 8)
    rows = middle_anchor_rows(bounds, 6)
    single = exact_log_normalizers(img[rows], txt[rows], index[rows], chunks(img, txt, index, bounds), tau, eps)
    assert all(r["n_chunks"] > 0 for r in results)
    for r in results:
        for got, want in zip(r["exact"], single):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # every rank gets the same FastCLIP values, equal to log(eps + u) with log u = f(index)
    log_u = index[rows].float() * 0.01 - 3
    for r in results:
        for got, offset in zip(r["fast"], (0.0, 1.0)):
            want = torch.log(eps + torch.exp(log_u + offset))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_normalizer_errors_on_hand_made_numbers():
    exact_img = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    exact_txt = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    estimates = {
        "neuclip": (exact_img.clone(), exact_txt.clone()),  # perfect
        "fastclip": (torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 0.0, 4.0])),  # |1|+0+0+0+1+3 = 5
        "mbcl": (torch.tensor([-0.5, 1.5, 2.5]), torch.tensor([0.5, 1.5, 0.5])),  # 6 * 0.5 = 3
    }
    errs = normalizer_errors(exact_img, exact_txt, estimates)
    assert set(errs) == {"neuclip", "fastclip", "mbcl"}
    assert errs["neuclip"] == 0.0
    assert errs["fastclip"] == pytest.approx(5 / 6)
    assert errs["mbcl"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        normalizer_errors(exact_img, exact_txt, {"bad": (torch.zeros(2), torch.zeros(3))})


def test_fastclip_estimate_single_process():
    n = 20
    t_img, t_txt = ShardedLogTable(n), ShardedLogTable(n)
    t_img.log_u.copy_(torch.linspace(-5, 5, n))
    t_txt.log_u.copy_(torch.linspace(2, -2, n))
    t_txt.log_u[7] = float("-inf")  # never visited: u = 0 -> log(eps)
    anchors = torch.tensor([3, 7, 0, 19, 11])
    a1, a2 = fastclip_estimate(t_img, t_txt, anchors, EPS)
    torch.testing.assert_close(a1, torch.log(EPS + torch.exp(t_img.log_u[anchors])))
    want2 = torch.log(EPS + torch.exp(t_txt.log_u[anchors]))
    torch.testing.assert_close(a2, want2)
    assert a2[1] == pytest.approx(math.log(EPS))


def test_mbcl_estimate_batch_and_self():
    img, txt, index = dataset(9)
    tau = 0.05
    a_img, a_txt = img[:6], txt[:6]
    # anchors as their own batch = batch_log_normalizers of that batch
    m1, m2 = mbcl_estimate(a_img, a_txt, tau=tau, eps=0.0)
    r1, r2 = batch_log_normalizers(
        Features(a_img.double(), a_txt.double(), a_img.double(), a_txt.double()),
        torch.tensor([tau], dtype=torch.float64),
    )
    torch.testing.assert_close(m1, r1)
    torch.testing.assert_close(m2, r2)
    # a batch of other samples: every batch sample is a negative, mean over B
    b_img, b_txt = img[10:26], txt[10:26]
    e1, e2 = mbcl_estimate(a_img, a_txt, b_img, b_txt, tau, EPS)
    pos = (a_img.double() * a_txt.double()).sum(-1, keepdim=True)
    g1 = torch.exp((a_img.double() @ b_txt.double().T - pos) / tau).mean(1)
    g2 = torch.exp((a_txt.double() @ b_img.double().T - pos) / tau).mean(1)
    torch.testing.assert_close(e1, torch.log(EPS + g1))
    torch.testing.assert_close(e2, torch.log(EPS + g2))
    # a batch containing the anchors, with indices: the self pairs are excluded (j != i), the same as the
    # exact normalizer when the batch is the whole data set
    x1, x2 = mbcl_estimate(a_img, a_txt, img, txt, tau, EPS, anchor_index=index[:6], batch_index=index)
    y1, y2 = exact_log_normalizers(a_img, a_txt, index[:6], [(img, txt, index)], tau, EPS)
    torch.testing.assert_close(x1, y1)
    torch.testing.assert_close(x2, y2)


def test_probe_mbcl_estimate_excludes_an_anchor_that_is_in_the_training_batch():
    """The probe's MBCL error for a last training batch that holds probe anchors: their own pair is not a negative
    (it would add exp(0) to g_hat, ~5 nats off at tau = 0.05 for an anchor with dissimilar negatives)."""
    img, _, index = dataset(seed=3, n=40)
    txt = F.normalize(img + 0.1 * torch.randn(img.shape, generator=torch.Generator().manual_seed(1)), dim=-1)
    tau = torch.tensor([0.05])  # aligned pairs: each negative term ~exp(-20), the self pair's exp(0) dominates
    anchors = {"index": index[:8], "rows": torch.arange(8)}
    probe = NormErrProbe(anchors, lambda: iter([{"index": index, "rows": torch.arange(40)}]), eps=EPS)

    def encode(b):  # stands in for the encoders: features by row
        return img[b["rows"]], txt[b["rows"]]

    batch_rows = torch.tensor([3, 20, 21, 22, 23, 24, 25, 5])  # anchors 3 and 5 are in the batch
    batch = (img[batch_rows], txt[batch_rows], index[batch_rows])
    errors = probe.measure(encode, device=torch.device("cpu"), tau=tau, batch=batch)
    exact = exact_log_normalizers(img[:8], txt[:8], index[:8], [(img, txt, index)], tau, EPS)
    # the estimate by hand: j over the batch without j == i, mean over the remaining ones
    pos = (img[:8].double() * txt[:8].double()).sum(-1, keepdim=True)
    keep = (index[:8, None] != index[batch_rows][None, :]).double()
    by_hand = []
    for anchors_side, others in ((img[:8], txt[batch_rows]), (txt[:8], img[batch_rows])):
        terms = torch.exp((anchors_side.double() @ others.double().T - pos) / 0.05) * keep
        by_hand.append(torch.log(EPS + terms.sum(1) / keep.sum(1)))
    expected = normalizer_errors(*exact, {"mbcl": tuple(by_hand)})["mbcl"]
    assert errors["mbcl"] == pytest.approx(expected, rel=1e-6)
    counted = normalizer_errors(*exact, {"mbcl": mbcl_estimate(img[:8], txt[:8], *batch[:2], tau, EPS)})["mbcl"]
    assert counted > expected + 1.0  # counting the self pair is far worse: the defect this guards


def test_npn_estimate_shapes_and_all_three_errors():
    img, txt, index = dataset(11)
    tau = torch.tensor([0.1])
    lg1, lg2 = batch_log_normalizers(Features(img, txt, img, txt), tau)
    targets = [torch.logaddexp(torch.full_like(x, math.log(EPS)), x) for x in (lg1, lg2)]
    npn = NPN(D, num_prototypes=32, eps=EPS, lr=0.05, seed=0)
    npn.fit(img, txt, *targets, tau, steps=20)
    rows = [2, 9, 15, 22, 31, 38]
    a1, a2 = npn_estimate(npn, img[rows], txt[rows], tau)
    assert a1.shape == (6,) and a2.shape == (6,)
    assert torch.isfinite(a1).all() and torch.isfinite(a2).all()
    b1, b2 = npn_estimate(npn, img[rows], txt[rows], 0.1)  # a float tau works too
    torch.testing.assert_close(b1, a1)
    torch.testing.assert_close(b2, a2)

    exact = exact_log_normalizers(img[rows], txt[rows], index[rows], [(img, txt, index)], tau, EPS)
    errs = normalizer_errors(
        *exact, {"neuclip": (a1, a2), "mbcl": mbcl_estimate(img[rows], txt[rows], tau=tau, eps=EPS)}
    )
    assert all(math.isfinite(v) and v >= 0 for v in errs.values())
