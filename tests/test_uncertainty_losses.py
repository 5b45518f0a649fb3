import pytest
import torch

from idml.config import ConfigError, load_config, validate_config
from idml.training.setup import build_training
from idml.uncertainty_losses import FailurePredictionLoss, MutualLikelihoodLoss


def _grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["pfe", "failure"])
def test_stop_gradient_heads_leave_the_embedding_exactly_as_the_base_loss_trains_it(tiny_config, method):
    cfg = tiny_config
    cfg.loss.introspective, cfg.model.uncertainty, cfg.loss.mixup = False, method, False
    state = build_training(cfg, num_classes=4)
    state.model.set_backbone_trainable(True)
    objective = state.objective.train()
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(4).repeat_interleave(2)
    loss, stats = objective(images, labels)
    assert "uncertainty_loss" in stats and objective.trains_uncertainty
    loss.backward()
    with_head = _grads(objective.model)
    objective.zero_grad()
    mu, sigma = objective.embed(images)
    objective.criterion(mu, sigma, labels).backward()  # the base loss alone
    base = _grads(objective.model)
    assert any(name.startswith("uncertainty_head") for name in with_head)
    for name, grad in base.items():
        if not name.startswith("uncertainty_head"):
            assert torch.allclose(with_head[name], grad, atol=1e-6), name


def test_stop_gradient_variants_need_the_plain_base_loss():
    with pytest.raises(ConfigError, match="set loss.introspective=false"):
        validate_config(load_config(overrides=["model.uncertainty=failure", "loss.introspective=true"]))
    with pytest.raises(ConfigError, match="model.uncertainty 'bayes'"):
        validate_config(load_config(overrides=["model.uncertainty=bayes"]))


def test_failure_target_is_a_closer_other_class_item():
    loss = FailurePredictionLoss(bank_size=8)
    # images 0 and 1 (class 0) are orthogonal; image 2 (class 1) sits next to image 0, and every
    # class-1 image points away from image 1: 0 fails, 1 does not
    mu = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, -0.1, 0.42],
                                                     [0.0, -0.3, 0.95]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    sigma = torch.full((4, 3), 0.5, requires_grad=True)  # the same odds for every image
    loss(mu, sigma, labels).backward()
    odds_grad = sigma.grad.sum(1)
    assert odds_grad[0] < 0  # raise image 0's predicted odds of failure
    assert odds_grad[1] > 0  # lower image 1's


def test_failure_bank_adds_other_class_negatives_but_never_the_own_class():
    loss = FailurePredictionLoss(bank_size=4)
    labels = torch.tensor([0, 0])
    mu = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    sigma = torch.ones(2, 1, requires_grad=True)
    loss(mu, sigma, labels)  # the bank now holds these two class-0 embeddings
    assert loss.bank.shape == (2, 2) and loss.bank_labels.tolist() == [0, 0]
    # the same images again: their stale copies share the label, so they are not negatives
    # and not positives; with no other class anywhere, nothing fails
    grad_same = torch.autograd.grad(loss(mu, sigma, labels), sigma)[0]
    assert (grad_same.sum(1) > 0).all()
    # a bank item of another class right next to image 1 makes it fail
    loss.bank = torch.cat([torch.tensor([[0.5, 0.866]]), loss.bank])[:4]  # cos 0.99 to image 1, 0.5 to image 0
    loss.bank_labels = torch.cat([torch.tensor([5]), loss.bank_labels])[:4]
    grad_other = torch.autograd.grad(loss(mu, sigma, labels), sigma)[0]
    assert grad_other.sum(1)[1] < 0 < grad_other.sum(1)[0]
    assert len(loss.bank) == 4  # bounded


def test_mutual_likelihood_is_smallest_where_the_variance_matches_the_pair_distance():
    mls = MutualLikelihoodLoss()
    mu = torch.tensor([[0.0, 0.0], [0.6, 0.0]])
    labels = torch.tensor([0, 0])
    # per dimension the optimum of d^2 / v + log v is v = d^2: 0.36 on the first axis
    values = {v: mls(mu, torch.full((2, 2), (v / 2) ** 0.5), labels).item() for v in (0.1, 0.36, 1.0)}
    assert values[0.36] < values[0.1] and values[0.36] < values[1.0]
    # no positive pair: zero, with a graph
    out = mls(mu, torch.ones(2, 2, requires_grad=True), torch.tensor([0, 1]))
    assert out.item() == 0 and out.requires_grad
