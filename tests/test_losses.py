"""E1/E6/E9 against independent float64 references (single process); FastCLIP against its reference's formulas."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from neuclip_ds.losses import (
    ClipLoss,
    FastCLIPLoss,
    Features,
    NeuCLIPLoss,
    ShardedLogTable,
    SigLipLoss,
    batch_log_normalizers,
    fastclip_gamma,
    gather_features,
    neuclip_objective,
    rgcl_log_loss,
)

EPS, RHO = 1e-6, 6.5


def make_pair(B=12, d=8, seed=0, noise=0.7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    raw_img = torch.randn(B, d, generator=g, dtype=dtype)
    raw_txt = raw_img + noise * torch.randn(B, d, generator=g, dtype=dtype)
    return raw_img.requires_grad_(), raw_txt.requires_grad_()


def direct_log_g(img, txt, tau):
    """Brute-force float64 log g_hat (E1 with the batch): explicit loops over j != i, exp then log."""
    B = img.shape[0]
    s = (img @ txt.T).double()
    t = float(tau)
    g1 = torch.zeros(B, dtype=torch.float64)
    g2 = torch.zeros(B, dtype=torch.float64)
    for i in range(B):
        for j in range(B):
            if j != i:
                g1[i] += math.exp((s[i, j] - s[i, i]) / t)
                g2[i] += math.exp((s[j, i] - s[i, i]) / t)
    return g1 / (B - 1), g2 / (B - 1)


def direct_e6(img, txt, a1, a2, tau, eps, rho):
    g1, g2 = direct_log_g(img, txt, tau)
    t = float(tau)
    a1, a2 = a1.double(), a2.double()
    terms = (eps + g1) * torch.exp(-a1) + a1 - 1 + (eps + g2) * torch.exp(-a2) + a2 - 1
    return t * terms.mean().item() + 2 * rho * t


@pytest.mark.parametrize("tau_value", [0.5, 0.07, 0.01])
def test_neuclip_gradients_at_optimal_alpha_equal_rgcl_log_loss(tau_value):
    raw_img, raw_txt = make_pair()
    tau = torch.tensor([tau_value], dtype=torch.float64, requires_grad=True)

    img, txt = F.normalize(raw_img, dim=-1), F.normalize(raw_txt, dim=-1)
    ref = rgcl_log_loss(img, txt, tau, EPS, RHO)
    ref_grads = torch.autograd.grad(ref, [raw_img, raw_txt, tau])

    # alpha* = log(eps + g_hat), a constant of the encoder step (E6)
    img, txt = F.normalize(raw_img, dim=-1), F.normalize(raw_txt, dim=-1)
    with torch.no_grad():
        lg1, lg2 = batch_log_normalizers(Features(img, txt, img, txt), tau)
        a1 = torch.logaddexp(torch.full_like(lg1, math.log(EPS)), lg1)
        a2 = torch.logaddexp(torch.full_like(lg2, math.log(EPS)), lg2)
    loss = NeuCLIPLoss(eps=EPS, rho=RHO)(gather_features(img, txt), tau, a1, a2)
    grads = torch.autograd.grad(loss, [raw_img, raw_txt, tau])
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12), (g - r).abs().max()
    # and the values coincide at alpha* (the conjugate of E2 is tight)
    assert torch.allclose(loss, ref, rtol=1e-10)


def test_neuclip_gradient_differs_away_from_optimal_alpha():
    """The check above must be able to fail: with alpha != alpha* the tau gradients disagree."""
    raw_img, raw_txt = make_pair()
    tau = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    img, txt = F.normalize(raw_img, dim=-1), F.normalize(raw_txt, dim=-1)
    ref = torch.autograd.grad(rgcl_log_loss(img, txt, tau, EPS, RHO), tau, retain_graph=True)[0]
    zeros = torch.zeros(img.shape[0], dtype=torch.float64)
    got = torch.autograd.grad(neuclip_objective(img, txt, zeros, zeros, tau, EPS, RHO), tau)[0]
    assert not torch.allclose(got, ref, rtol=1e-3)


@pytest.mark.parametrize("tau_value,noise", [(0.3, 0.7), (0.07, 0.7), (0.01, 0.7), (0.01, 1e-4)])
def test_neuclip_objective_value_equals_direct_float64(tau_value, noise):
    raw_img, raw_txt = make_pair(B=10, d=6, seed=3, noise=noise)
    img64 = F.normalize(raw_img.detach(), dim=-1)
    txt64 = F.normalize(raw_txt.detach(), dim=-1)
    g = torch.Generator().manual_seed(1)
    if tau_value >= 0.07:
        a1, a2 = torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    else:
        # at tau = 0.01 log g_hat reaches ~200: random alpha around it (the NPN tracks it) keeps the value finite
        lg1, lg2 = (x.log() for x in direct_log_g(img64, txt64, tau_value))
        a1 = lg1 + torch.randn(10, generator=g, dtype=torch.float64)
        a2 = lg2 + torch.randn(10, generator=g, dtype=torch.float64)
    expected = direct_e6(img64, txt64, a1, a2, tau_value, EPS, RHO)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        got = neuclip_objective(
            img64.to(dtype),
            txt64.to(dtype),
            a1.to(dtype),
            a2.to(dtype),
            torch.tensor([tau_value], dtype=dtype),
            EPS,
            RHO,
        )
        assert torch.isfinite(got)
        assert math.isclose(float(got), expected, rel_tol=rtol), (dtype, float(got), expected)


def test_log_domain_survives_where_exp_overflows_fp32():
    raw_img, raw_txt = make_pair(B=8, d=4, seed=5, noise=2.0)
    img = F.normalize(raw_img.detach(), dim=-1).float()
    txt = F.normalize(raw_txt.detach(), dim=-1).float()
    tau = torch.tensor([0.01])
    s = img @ txt.T
    assert torch.isinf(torch.exp((s - s.diag()[:, None]) / tau)).any()  # the naive way overflows here
    lg1, lg2 = batch_log_normalizers(Features(img, txt, img, txt), tau)
    assert torch.isfinite(lg1).all() and torch.isfinite(lg2).all()
    loss = rgcl_log_loss(img, txt, tau, EPS, RHO)
    assert torch.isfinite(loss)


def test_clip_loss_equals_plain_cross_entropy():
    raw_img, raw_txt = make_pair(B=9, d=5, seed=2)
    tau = torch.tensor([0.07], dtype=torch.float64, requires_grad=True)
    img, txt = F.normalize(raw_img, dim=-1), F.normalize(raw_txt, dim=-1)
    loss = ClipLoss()(gather_features(img, txt), tau)
    grads = torch.autograd.grad(loss, [raw_img, raw_txt, tau], retain_graph=True)

    # reference: explicit softmax cross-entropy written out (OpenCLIP: logit_scale * img @ txt.T, both directions)
    logit_scale = 1 / tau
    logits = logit_scale * img @ txt.T
    ce_i = -(logits.diag() - logits.logsumexp(dim=1)).mean()
    ce_t = -(logits.diag() - logits.logsumexp(dim=0)).mean()
    ref = (ce_i + ce_t) / 2
    ref_grads = torch.autograd.grad(ref, [raw_img, raw_txt, tau])
    assert torch.allclose(loss.detach(), ref.detach(), rtol=1e-12)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12)


def test_siglip_loss_equals_pairwise_reference():
    raw_img, raw_txt = make_pair(B=7, d=5, seed=4)
    img, txt = F.normalize(raw_img.detach(), dim=-1), F.normalize(raw_txt.detach(), dim=-1)
    tau, bias = torch.tensor([0.1], dtype=torch.float64), torch.tensor([-10.0], dtype=torch.float64)
    loss = SigLipLoss()(gather_features(img, txt), tau, bias)
    ref = 0.0
    for i in range(7):
        for j in range(7):
            y = 1.0 if i == j else -1.0
            z = float(img[i] @ txt[j]) / 0.1 - 10.0
            ref += math.log1p(math.exp(-y * z))
    assert math.isclose(float(loss), ref / 7, rel_tol=1e-10)


def reference_gamma(epoch, gamma_min, decay_epochs):
    """FastCLIP's reference schedule (`adjust_gamma`, gamma_schedule "cosine"), written out independently:
    1 at epoch 0, gamma_min from epoch decay_epochs on, in between the cosine indexed by the epoch itself
    ((1 + cos x)/2 = cos^2(x/2))."""
    if epoch == 0:
        return 1.0
    if epoch >= decay_epochs:
        return gamma_min
    return gamma_min + (1 - gamma_min) * math.cos(math.pi * epoch / (2 * decay_epochs)) ** 2


def test_fastclip_gamma_schedule_matches_reference():
    expected = {0: 1.0, 1: 0.980423, 2: 0.923607, 5: 0.6, 10: 0.2, 11: 0.2, 20: 0.2}  # gamma_min 0.2, 10 epochs
    for epoch, value in expected.items():
        got = fastclip_gamma(epoch, 0.2, 10)
        assert got == pytest.approx(reference_gamma(epoch, 0.2, 10), rel=1e-12, abs=1e-15), epoch
        assert got == pytest.approx(value, abs=5e-7), epoch
    assert fastclip_gamma(0, 0.2, 10) == 1.0 and fastclip_gamma(10, 0.2, 10) == 0.2  # exact at both ends
    assert round(fastclip_gamma(1, 0.2, 10), 3) == 0.980  # not 1.0: no extra epoch at 1
    values = [fastclip_gamma(e, 0.2, 10) for e in range(11)]
    assert all(a > b for a, b in itertools.pairwise(values))
    # one decay epoch: 1 in epoch 0, gamma_min from epoch 1 on; other gamma_min / decay lengths
    assert [fastclip_gamma(e, 0.5, 1) for e in range(3)] == [1.0, 0.5, 0.5]
    for e in range(8):
        assert fastclip_gamma(e, 0.3, 4) == pytest.approx(reference_gamma(e, 0.3, 4), rel=1e-12), e


@pytest.mark.parametrize("epoch,decay,arg", [(-1, 10, "epoch"), (0, 0, "decay_epochs")])
def test_fastclip_gamma_rejects_bad_arguments(epoch, decay, arg):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        fastclip_gamma(epoch, 0.2, decay)
    if arg == "decay_epochs":
        with pytest.raises(ValueError, match=r"^gamma_decay_epochs:"):
            FastCLIPLoss(num_samples=4, gamma_decay_epochs=decay)


def test_fastclip_first_visit_takes_g_hat_then_moving_average():
    table = ShardedLogTable(10)
    log_g1 = torch.tensor([0.5, -2.0, 3.25, 120.0])  # log g_hat up to ~exp(120) at small tau
    out = table.update(torch.tensor([1, 4, 7, 9]), log_g1, gamma=0.3)
    assert torch.equal(out, log_g1)  # u = g_hat exactly, not 0.3 g_hat
    assert torch.equal(table.log_u[[1, 4, 7, 9]], log_g1)
    assert torch.isneginf(table.log_u[[0, 2, 3, 5, 6, 8]]).all()

    # second visit of 4 and 9: (1-gamma) u + gamma g_hat; 2 and 5 are new: g_hat itself
    log_g2 = torch.tensor([1.0, 118.0, -1.5, 0.25])
    gamma = 0.3
    out = table.update(torch.tensor([4, 9, 2, 5]), log_g2, gamma=gamma)
    u_old = torch.tensor([-2.0, 120.0], dtype=torch.float64)
    g_new = log_g2[:2].double()
    want = torch.log((1 - gamma) * torch.exp(u_old - 120) + gamma * torch.exp(g_new - 120)) + 120
    torch.testing.assert_close(out[:2].double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[2:], log_g2[2:])
    assert torch.equal(table.log_u[[4, 9, 2, 5]], out)
    # gamma = 1 (epoch 0) on a visited row: u = g_hat as well
    out = table.update(torch.tensor([4]), torch.tensor([7.0]), gamma=1.0)
    assert torch.equal(out, torch.tensor([7.0]))


def test_fastclip_u_update_and_loss_match_reference():
    n, B, gmin, decay = 20, 6, 0.3, 2
    loss_fn = FastCLIPLoss(num_samples=n, eps=EPS, rho=RHO, gamma_min=gmin, gamma_decay_epochs=decay)
    u1 = torch.zeros(n, dtype=torch.float64)
    u2 = torch.zeros(n, dtype=torch.float64)
    seen = torch.zeros(n, dtype=torch.bool)
    tau = torch.tensor([0.2], dtype=torch.float64)
    schedule = [
        (0, [0, 1, 2, 3, 4, 5]),
        (1, [3, 4, 5, 6, 7, 8]),  # 3-5 again, 6-8 first seen at gamma = 0.65
        (2, [6, 7, 8, 9, 10, 0]),  # gamma_min from epoch 2 on
        (5, [0, 9, 11, 12, 4, 10]),
    ]
    first_at_gamma_below_1 = 0
    for step, (epoch, idx) in enumerate(schedule):
        raw_img, raw_txt = make_pair(B=B, d=5, seed=step)
        img, txt = F.normalize(raw_img.detach(), dim=-1), F.normalize(raw_txt.detach(), dim=-1)
        index = torch.tensor(idx)
        loss = loss_fn(gather_features(img, txt), tau, index, epoch)

        # the reference's rule: u = (1-gamma) u + gamma g_hat, then rows with u == 0 before (never visited) = g_hat
        gamma = reference_gamma(epoch, gmin, decay)
        g1, g2 = direct_log_g(img, txt, 0.2)
        first = ~seen[index]
        first_at_gamma_below_1 += int(first.sum()) if gamma < 1 else 0
        u1[index] = torch.where(first, g1, (1 - gamma) * u1[index] + gamma * g1)
        u2[index] = torch.where(first, g2, (1 - gamma) * u2[index] + gamma * g2)
        seen[index] = True
        expected = direct_e6(img, txt, torch.log(EPS + u1[index]), torch.log(EPS + u2[index]), 0.2, EPS, RHO)
        assert math.isclose(float(loss), expected, rel_tol=1e-6)  # tables are fp32
    assert first_at_gamma_below_1 == 7  # rows 6-8 at epoch 1, 9, 10 at epoch 2, 11, 12 at epoch 5
    assert torch.allclose(loss_fn.u_img.log_u[seen].exp(), u1[seen].float(), rtol=1e-5)
    assert torch.allclose(loss_fn.u_txt.log_u[seen].exp(), u2[seen].float(), rtol=1e-5)
    assert torch.isneginf(loss_fn.u_img.log_u[~seen]).all()
    assert torch.isneginf(loss_fn.u_txt.log_u[~seen]).all()


def test_fastclip_rejects_out_of_range_index():
    img = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    with pytest.raises(ValueError, match="index"):
        FastCLIPLoss(num_samples=5)(gather_features(img, img), torch.tensor([0.1]), torch.tensor([0, 1, 2, 7]), 0)


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda i, t, a, tau: rgcl_log_loss(i, t[:3], tau, EPS, RHO), "txt"),
        (lambda i, t, a, tau: rgcl_log_loss(i * 3, t, tau, EPS, RHO), "img"),
        (lambda i, t, a, tau: rgcl_log_loss(i, t, torch.tensor([0.0]), EPS, RHO), "tau"),
        (lambda i, t, a, tau: rgcl_log_loss(i, t, torch.tensor(0.1), EPS, RHO), "tau"),
        (lambda i, t, a, tau: rgcl_log_loss(i, t, tau, -1.0, RHO), "eps"),
        (lambda i, t, a, tau: neuclip_objective(i, t, a[:2], a, tau, EPS, RHO), "alpha_img"),
        (lambda i, t, a, tau: neuclip_objective(i, t, a, a[:2], tau, EPS, RHO), "alpha_txt"),
        (lambda i, t, a, tau: ClipLoss()(Features(i, t, i, t), -tau), "tau"),
        (lambda i, t, a, tau: NeuCLIPLoss()(Features(i, 2 * t, i, t), tau, a, a), "txt"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, arg):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        call(img, txt, torch.zeros(5), torch.tensor([0.1]))
