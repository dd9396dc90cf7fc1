"""The NPN (E4, E5, E7.4): it learns the log-normalizer, restarts deterministically, rejects bad arguments."""

import math

import pytest
import torch
import torch.nn.functional as F

from neuclip_ds.losses import Features, batch_log_normalizers
from neuclip_ds.npn import NPN, CosineScores, TailoredNPN, npn_objective

EPS = 1e-14


def batch(B=128, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(B, d, generator=g), dim=-1)
    txt = F.normalize(img + 0.6 * torch.randn(B, d, generator=g), dim=-1)
    tau = torch.tensor([0.1])
    lg1, lg2 = batch_log_normalizers(Features(img, txt, img, txt), tau)
    log_eps = math.log(EPS)
    targets = [torch.logaddexp(torch.full_like(x, log_eps), x) for x in (lg1, lg2)]  # log(eps + g_hat)
    return img, txt, tau, targets


def error(npn, img, txt, tau, targets):
    a1, a2 = npn.predict(img, txt, tau)
    return float(((a1 - targets[0]).abs().mean() + (a2 - targets[1]).abs().mean()) / 2)


@pytest.mark.parametrize("variant,m", [("tailored", 64), ("tailored", 512)])
def test_inner_steps_drive_normalizer_error_down_10x(variant, m):
    img, txt, tau, targets = batch()
    npn = NPN(16, num_prototypes=m, eps=EPS, lr=0.05, variant=variant, seed=0)
    before = error(npn, img, txt, tau, targets)
    npn.fit(img, txt, *targets, tau, steps=60)
    after = error(npn, img, txt, tau, targets)
    assert after * 10 <= before, (before, after)


def test_mlp_variant_learns():
    img, txt, tau, targets = batch()
    npn = NPN(16, eps=EPS, lr=0.05, variant="mlp", mlp_hidden=64, seed=0)
    before = error(npn, img, txt, tau, targets)
    npn.fit(img, txt, *targets, tau, steps=200)
    after = error(npn, img, txt, tau, targets)
    assert after < 0.5 * before
    checksum = npn.checksum()
    npn.restart(img, txt, seed=3)  # no prototypes to re-draw: the fitted MLP is kept
    assert npn.checksum() == checksum and error(npn, img, txt, tau, targets) == after


def test_tailored_npn_is_e4():
    img, txt, tau, _ = batch(B=6, d=5)
    net = TailoredNPN(5, 7, EPS, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a1, a2 = net(img, txt, tau)
    W1 = F.normalize(net.proto_txt.detach(), dim=-1).double()
    W2 = F.normalize(net.proto_img.detach(), dim=-1).double()
    for i in range(6):
        s_ii = float(img[i].double() @ txt[i].double())
        e1 = sum(math.exp((float(img[i].double() @ W1[k]) - s_ii) / 0.1) for k in range(7)) / 7
        e2 = sum(math.exp((float(txt[i].double() @ W2[k]) - s_ii) / 0.1) for k in range(7)) / 7
        assert math.isclose(float(a1[i]), math.log(EPS + e1), rel_tol=1e-5, abs_tol=1e-5)
        assert math.isclose(float(a2[i]), math.log(EPS + e2), rel_tol=1e-5, abs_tol=1e-5)


def test_npn_objective_gradient_vanishes_at_target():
    _, _, tau, targets = batch(B=10)
    alpha = [t.clone().requires_grad_() for t in targets]
    grads = torch.autograd.grad(npn_objective(*alpha, *targets, tau), alpha)
    assert all(g.abs().max() < 1e-6 for g in grads)
    alpha = [(t + 0.5).requires_grad_() for t in targets]
    grads = torch.autograd.grad(npn_objective(*alpha, *targets, tau), alpha)
    # E5: d/d alpha = tau/B (1 - (eps+g) e^-alpha)
    assert torch.allclose(grads[0], 0.1 / 10 * (1 - math.exp(-0.5)) * torch.ones(10), rtol=1e-5)


def test_restart_draws_prototypes_from_the_batch_deterministically_and_resets_adagrad():
    img, txt, tau, targets = batch(B=32)
    a, b = NPN(16, num_prototypes=8, seed=0), NPN(16, num_prototypes=8, seed=1)
    assert a.checksum() != b.checksum()
    for npn in (a, b):
        npn.fit(img, txt, *targets, tau, steps=3)
        npn.restart(img, txt, seed=123, reset_optimizer=True)
        assert all(float(st["sum"].abs().sum()) == 0 for st in npn.optimizer.state.values())
    assert a.checksum() == b.checksum()  # same batch + same seed -> identical replicas
    a.fit(img, txt, *targets, tau, steps=2)
    a.restart(img, txt, seed=7)  # default: AdaGrad accumulators kept
    assert all(float(st["sum"].abs().sum()) > 0 for st in a.optimizer.state.values())
    protos = a.net.proto_txt.detach()
    # every text-side prototype is one of the batch's text embeddings (W1 <- e2 of random samples)
    assert torch.allclose((protos @ txt.T).max(dim=1).values, torch.ones(8), atol=1e-5)
    assert torch.allclose((a.net.proto_img.detach() @ img.T).max(dim=1).values, torch.ones(8), atol=1e-5)
    # more prototypes than samples: copies are jittered apart
    c = NPN(16, num_prototypes=64, seed=0)
    c.restart(img, txt, seed=1)
    assert torch.unique(c.net.proto_txt.detach(), dim=0).shape[0] == 64


def test_state_dict_round_trip():
    img, txt, tau, targets = batch(B=32)
    a = NPN(16, num_prototypes=8, seed=0)
    a.fit(img, txt, *targets, tau, steps=2)
    b = NPN(16, num_prototypes=8, seed=5)
    b.load_state_dict(a.state_dict())
    assert a.checksum() == b.checksum()
    a.fit(img, txt, *targets, tau, steps=2)
    b.fit(img, txt, *targets, tau, steps=2)
    assert a.checksum() == b.checksum()


@pytest.mark.parametrize("rows", [3, 7])  # B < d and B >= d take different forward paths
def test_cosine_scores_match_autograd_through_normalize(rows):
    """The hand-written backward of the NPN's similarity (E4) against autograd of the plain formula, float64,
    prototypes of very different norms; and torch's numerical gradcheck."""
    g = torch.Generator().manual_seed(3)
    anchors = torch.randn(rows, 5, generator=g, dtype=torch.float64, requires_grad=True)
    norms = torch.logspace(-2, 2, 11, dtype=torch.float64)[:, None]
    protos = (torch.randn(11, 5, generator=g, dtype=torch.float64) * norms).requires_grad_()
    upstream = torch.randn(rows, 11, generator=g, dtype=torch.float64)
    offset = torch.randn(rows, 1, generator=g, dtype=torch.float64)
    ours = CosineScores.apply(anchors, protos, offset)
    reference = offset + anchors @ F.normalize(protos, dim=-1).T
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((ours * upstream).sum(), (anchors, protos))
    expected = torch.autograd.grad((reference * upstream).sum(), (anchors, protos))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(CosineScores.apply, (anchors, protos, offset))


def test_fused_adagrad_on_cpu_matches_the_loop_and_survives_a_foreign_state():
    """CPU NPNs use torch's fused AdaGrad: the same steps as the for-loop kernel (to float32 rounding), and a
    state saved by a loop-kernel NPN (e.g. on a GPU) loads without switching this one's kernel."""
    img, txt, tau, targets = batch(B=32)
    fused, loop = NPN(16, num_prototypes=8, seed=0), NPN(16, num_prototypes=8, seed=0)
    assert fused.optimizer.param_groups[0]["fused"] is True
    loop.optimizer = torch.optim.Adagrad(loop.net.parameters(), lr=loop.lr, foreach=False)
    fused.fit(img, txt, *targets, tau, steps=5)
    loop.fit(img, txt, *targets, tau, steps=5)
    for a, b in zip(fused.net.parameters(), loop.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fused.load_state_dict(loop.state_dict())
    assert fused.optimizer.param_groups[0]["fused"] is True and fused.checksum() == loop.checksum()


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"num_prototypes": 0}, "num_prototypes"),
        ({"num_prototypes": -3}, "num_prototypes"),
        ({"lr": 0.0}, "lr"),
        ({"variant": "x"}, "variant"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_bad_npn_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        NPN(16, **kwargs)


def test_bad_fit_inputs():
    img, txt, tau, targets = batch(B=8)
    npn = NPN(16, num_prototypes=4)
    with pytest.raises(ValueError, match=r"^img:"):
        npn.fit(img[:, :8], txt[:, :8], *targets, tau, steps=1)
    with pytest.raises(ValueError, match=r"^tau:"):
        npn.fit(img, txt, *targets, torch.tensor([-0.1]), steps=1)
    with pytest.raises(ValueError, match=r"^steps:"):
        npn.fit(img, txt, *targets, tau, steps=-1)
