import pytest
import torch

from idml.losses import LOSS_NAMES, build_loss, loss_defaults
from idml.model import IDMLModel


def _batch(n_classes=6, per_class=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    mu = torch.nn.functional.normalize(centres[labels] + 0.8 * torch.randn(len(labels), d, generator=g), dim=1)
    sigma = 0.4 * torch.randn(len(labels), d, generator=g)
    return mu, sigma, labels


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_idml_with_lambda_zero_equals_base_loss(name):
    mu, sigma, labels = _batch()
    base = build_loss(name, num_classes=6, embedding_dim=16, introspective=False)
    idml = build_loss(name, num_classes=6, embedding_dim=16, introspective=True, uncertainty_weight=0.0)
    idml.load_state_dict(base.state_dict())  # same proxies
    torch.manual_seed(3)  # same random sampling in stochastic miners
    expected = base(mu, sigma, labels)
    torch.manual_seed(3)
    got = idml(mu, sigma, labels)
    assert float(expected) != 0.0 or name == "triplet"
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (name, got, expected)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradients_reach_uncertainty_head_when_lambda_positive(name):
    torch.manual_seed(0)
    images = torch.rand(24, 3, 8, 8)
    labels = torch.arange(6).repeat_interleave(4)
    model = IDMLModel(torch.nn.Conv2d(3, 32, 3), 32, embedding_dim=16)
    criterion = build_loss(name, num_classes=6, embedding_dim=16, introspective=True, uncertainty_weight=0.5)
    mu, sigma = model(images)
    criterion(mu, sigma, labels).backward()
    grad = model.uncertainty_head.weight.grad
    assert grad is not None and grad.abs().sum() > 0, name
    assert model.semantic_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_plain_loss_ignores_uncertainty(name):
    mu, sigma, labels = _batch()
    base = build_loss(name, num_classes=6, embedding_dim=16, introspective=False)
    torch.manual_seed(3)
    a = base(mu, sigma, labels)
    torch.manual_seed(3)
    b = base(mu, sigma * 10, labels)
    assert torch.equal(a, b)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("arcface", num_classes=3, embedding_dim=4)
    with pytest.raises(ValueError, match="no margin"):
        build_loss("fastap", num_classes=3, embedding_dim=4, margin=0.1)
    with pytest.raises(ValueError, match="no scale"):
        build_loss("triplet", num_classes=3, embedding_dim=4, scale=2.0)
    assert loss_defaults("proxy_anchor") == {"margin": 0.1, "scale": 32.0}


def test_proxy_anchor_uses_margin_and_scale():
    loss = build_loss("proxy_anchor", num_classes=5, embedding_dim=8, margin=0.2, scale=16)
    assert loss.loss.margin == 0.2 and loss.loss.alpha == 16
    assert loss.uncertainty_weight == pytest.approx(0.1)


def test_uses_uncertainty_only_when_sigma_reaches_the_loss():
    assert build_loss("proxy_anchor", num_classes=3, embedding_dim=4, uncertainty_weight=0.1).uses_uncertainty
    assert not build_loss("proxy_anchor", num_classes=3, embedding_dim=4, uncertainty_weight=0.0).uses_uncertainty
    assert not build_loss("proxy_anchor", num_classes=3, embedding_dim=4, introspective=False).uses_uncertainty
