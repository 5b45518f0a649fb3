import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from idml.metric import IntrospectiveDistance, IntrospectiveSimilarity, introspective_distance, pack


def _embeddings(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    sigma = 0.5 * torch.randn(n, d, generator=g)
    return mu, sigma


def test_lambda_zero_gives_plain_distance_exactly():
    alpha = torch.rand(50) * 4
    beta = torch.rand(50) * 3
    assert torch.equal(introspective_distance(alpha, beta, 0.0), alpha)


def test_formula_matches_reference():
    alpha, beta, lam = torch.tensor([0.5, 2.0]), torch.tensor([0.3, 1.0]), 0.7
    expected = alpha * torch.exp(-lam * beta / alpha)
    assert torch.allclose(introspective_distance(alpha, beta, lam), expected)


@pytest.mark.parametrize("lam", [0.01, 0.1, 1.0, 10.0])
def test_derivative_wrt_alpha_in_unit_interval_and_bounded_by_alpha(lam):
    alpha = torch.linspace(1e-4, 4, 400, dtype=torch.float64).requires_grad_()
    beta = torch.rand(400, dtype=torch.float64) * 5
    d = introspective_distance(alpha, beta, lam)
    (grad,) = torch.autograd.grad(d.sum(), alpha)
    t = lam * beta / alpha
    # strictly positive wherever exp(-t) does not underflow float64
    assert (grad[t < 500] > 0).all() and (grad >= 0).all() and (grad <= 1 + 1e-12).all()
    assert (d <= alpha).all()
    # analytic: exp(-t)(1+t) with t = lam*beta/alpha
    assert torch.allclose(grad, torch.exp(-t) * (1 + t))
    # more uncertainty -> slower learning on the semantic distance
    (g_lo,) = torch.autograd.grad(introspective_distance(alpha, beta * 0.5, lam).sum(), alpha)
    assert (g_lo >= grad - 1e-12).all()


def test_safe_at_alpha_zero():
    alpha = torch.zeros(3, requires_grad=True)
    beta = torch.tensor([0.0, 1.0, 5.0], requires_grad=True)
    d = introspective_distance(alpha, beta, 0.5)
    d.sum().backward()
    assert torch.equal(d.detach(), torch.zeros(3))
    assert torch.isfinite(alpha.grad).all() and torch.isfinite(beta.grad).all()


def test_similarity_equals_cosine_at_lambda_zero():
    mu, sigma = _embeddings()
    ours = IntrospectiveSimilarity(8, 0.0)(pack(mu, sigma))
    assert torch.allclose(ours, CosineSimilarity()(mu), atol=1e-6)


@pytest.mark.parametrize("power", [1, 2])
def test_distance_equals_lp_at_lambda_zero(power):
    mu, sigma = _embeddings()
    ours = IntrospectiveDistance(8, 0.0, power=power)(pack(mu, sigma))
    ref = LpDistance(normalize_embeddings=True, p=2, power=power)(mu)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_matrix_matches_definition_with_uncertainty():
    mu, sigma = _embeddings()
    lam = 0.3
    packed = pack(mu, sigma)
    alpha = torch.cdist(mu, mu).pow(2)
    u = sigma.pow(2).sum(1)
    beta = u[:, None] + u[None, :]
    expected = alpha * torch.exp(-lam * beta / alpha.clamp_min(1e-12))
    assert torch.allclose(IntrospectiveDistance(8, lam, power=2)(packed), expected, atol=1e-5)
    assert torch.allclose(IntrospectiveSimilarity(8, lam)(packed), 1 - expected / 2, atol=1e-5)
    assert torch.allclose(IntrospectiveDistance(8, lam, power=1)(packed), expected.sqrt(), atol=1e-4)


def test_pairwise_matches_matrix_diagonal():
    mu, sigma = _embeddings()
    mu2, sigma2 = _embeddings(seed=1)
    a, b = pack(mu, sigma), pack(mu2, sigma2)
    for dist in (IntrospectiveDistance(8, 0.4, power=2), IntrospectiveSimilarity(8, 0.4)):
        assert torch.allclose(dist.pairwise_distance(a, b), torch.diagonal(dist(a, b)), atol=1e-4)


def test_proxies_have_zero_uncertainty():
    mu, sigma = _embeddings()
    proxies = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    lam = 0.2
    got = IntrospectiveSimilarity(8, lam)(pack(mu, sigma), proxies)
    alpha = torch.cdist(mu, proxies).pow(2)
    beta = sigma.pow(2).sum(1)[:, None].expand_as(alpha)
    assert torch.allclose(got, 1 - alpha * torch.exp(-lam * beta / alpha) / 2, atol=1e-5)


def test_more_uncertainty_means_more_similar():
    mu, sigma = _embeddings()
    sim = IntrospectiveSimilarity(8, 0.5)
    low, high = sim(pack(mu, sigma * 0.1)), sim(pack(mu, sigma * 2))
    off = ~torch.eye(len(mu), dtype=torch.bool)
    assert (high[off] > low[off]).all()


def test_wrong_width_is_a_clear_error():
    with pytest.raises(ValueError, match="expected 8"):
        IntrospectiveSimilarity(8, 0.1)(torch.randn(4, 12))
    with pytest.raises(ValueError, match=">= 0"):
        IntrospectiveSimilarity(8, -1.0)
    with pytest.raises(ValueError):
        pack(torch.randn(3, 4), torch.randn(3, 5))


def test_gradient_reaches_sigma_only_when_lambda_positive():
    mu, sigma = _embeddings()
    for lam, expect_grad in ((0.0, False), (0.5, True)):
        s = sigma.clone().requires_grad_()
        out = IntrospectiveSimilarity(8, lam)(pack(mu, s))
        out.sum().backward()
        has = s.grad is not None and s.grad.abs().sum() > 0
        assert has == expect_grad
    assert torch.isfinite(out).all()
