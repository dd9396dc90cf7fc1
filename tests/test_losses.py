"""E1/E6/E9 against independent float64 references (single process)."""

import math

import pytest
import torch
import torch.nn.functional as F

from neuclip_ds.losses import (ClipLoss, FastCLIPLoss, Features, NeuCLIPLoss, SigLipLoss, batch_log_normalizers,
                               fastclip_gamma, gather_features, neuclip_objective, rgcl_log_loss)

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
        got = neuclip_objective(img64.to(dtype), txt64.to(dtype), a1.to(dtype), a2.to(dtype),
                                torch.tensor([tau_value], dtype=dtype), EPS, RHO)
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


def test_fastclip_gamma_schedule_matches_e9():
    assert fastclip_gamma(0, 0.2, 4) == 1.0            # first epoch: gamma = 1
    assert fastclip_gamma(1, 0.2, 4) == pytest.approx(1.0)
    assert fastclip_gamma(3, 0.2, 4) == pytest.approx(0.2 + 0.8 * 0.5)  # half way along the cosine
    assert fastclip_gamma(5, 0.2, 4) == pytest.approx(0.2)
    assert fastclip_gamma(50, 0.2, 4) == pytest.approx(0.2)
    values = [fastclip_gamma(e, 0.2, 4) for e in range(1, 6)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_fastclip_u_update_and_loss_match_e9():
    n, B = 20, 6
    loss_fn = FastCLIPLoss(num_samples=n, eps=EPS, rho=RHO, gamma_min=0.3, gamma_decay_epochs=2)
    u1 = torch.zeros(n, dtype=torch.float64)
    u2 = torch.zeros(n, dtype=torch.float64)
    tau = torch.tensor([0.2], dtype=torch.float64)
    for step, (epoch, seed) in enumerate([(0, 0), (2, 1), (5, 2)]):
        raw_img, raw_txt = make_pair(B=B, d=5, seed=seed)
        img, txt = F.normalize(raw_img.detach(), dim=-1), F.normalize(raw_txt.detach(), dim=-1)
        index = torch.tensor([(3 * k + step) % n for k in range(B)])
        loss = loss_fn(gather_features(img, txt), tau, index, epoch)

        gamma = fastclip_gamma(epoch, 0.3, 2)
        g1, g2 = direct_log_g(img, txt, 0.2)
        u1[index] = (1 - gamma) * u1[index] + gamma * g1
        u2[index] = (1 - gamma) * u2[index] + gamma * g2
        expected = direct_e6(img, txt, torch.log(EPS + u1[index]), torch.log(EPS + u2[index]), 0.2, EPS, RHO)
        assert math.isclose(float(loss), expected, rel_tol=1e-6)  # tables are fp32
    assert gamma < 1
    seen = u1 > 0
    assert torch.allclose(loss_fn.u_img.log_u[seen].exp(), u1[seen].float(), rtol=1e-5)
    assert torch.allclose(loss_fn.u_txt.log_u[seen].exp(), u2[seen].float(), rtol=1e-5)
    assert torch.isneginf(loss_fn.u_img.log_u[~seen]).all()


def test_fastclip_rejects_out_of_range_index():
    img = F.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises(ValueError, match="index"):
        FastCLIPLoss(num_samples=5)(gather_features(img, img), torch.tensor([0.1]), torch.tensor([0, 1, 2, 7]), 0)


@pytest.mark.parametrize("call,arg", [
    (lambda i, t, a, tau: rgcl_log_loss(i, t[:3], tau, EPS, RHO), "txt"),
    (lambda i, t, a, tau: rgcl_log_loss(i * 3, t, tau, EPS, RHO), "img"),
    (lambda i, t, a, tau: rgcl_log_loss(i, t, torch.tensor([0.0]), EPS, RHO), "tau"),
    (lambda i, t, a, tau: rgcl_log_loss(i, t, torch.tensor(0.1), EPS, RHO), "tau"),
    (lambda i, t, a, tau: rgcl_log_loss(i, t, tau, -1.0, RHO), "eps"),
    (lambda i, t, a, tau: neuclip_objective(i, t, a[:2], a, tau, EPS, RHO), "alpha_img"),
    (lambda i, t, a, tau: neuclip_objective(i, t, a, a[:2], tau, EPS, RHO), "alpha_txt"),
    (lambda i, t, a, tau: ClipLoss()(Features(i, t, i, t), -tau), "tau"),
    (lambda i, t, a, tau: NeuCLIPLoss()(Features(i, 2 * t, i, t), tau, a, a), "txt"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(call, arg):
    img = F.normalize(torch.randn(5, 4), dim=-1)
    txt = F.normalize(torch.randn(5, 4), dim=-1)
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        call(img, txt, torch.zeros(5), torch.tensor([0.1]))
