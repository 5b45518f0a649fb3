import torch

from idml.losses import build_loss
from idml.training.objective import IntrospectiveObjective, mix_batch
from idml.model import build_model


def test_mix_batch_is_a_convex_combination():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 4, 4)
    labels = torch.arange(8)
    mixed = mix_batch(images, labels)
    assert 0 <= mixed.lam <= 1
    # recover the partner of each image from labels_b
    partners = images[mixed.labels_b]
    assert torch.allclose(mixed.images, mixed.lam * images + (1 - mixed.lam) * partners, atol=1e-6)
    assert torch.equal(mixed.labels_a, labels)


def test_objective_is_clean_plus_lam_weighted_mixed_losses():
    torch.manual_seed(0)
    model = build_model("resnet18", embedding_dim=8, pretrained=False).train()
    criterion = build_loss("proxy_anchor", num_classes=4, embedding_dim=8)
    objective = IntrospectiveObjective(model, criterion, mixup=True)
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(4).repeat_interleave(2)
    torch.manual_seed(5)
    loss, stats = objective(images, labels)
    torch.manual_seed(5)
    mixed = mix_batch(images, labels)
    with torch.no_grad():
        mu, sigma = model(torch.cat([images, mixed.images]))
        expected = (criterion(mu[:8], sigma[:8], labels) + mixed.lam * criterion(mu[8:], sigma[8:], mixed.labels_a)
                    + (1 - mixed.lam) * criterion(mu[8:], sigma[8:], mixed.labels_b))
    assert torch.allclose(loss, expected, rtol=1e-4)
    assert set(stats) == {"uncertainty_clean", "uncertainty_mixed"}
    loss_plain, stats_plain = IntrospectiveObjective(model, criterion, mixup=False)(images, labels)
    assert set(stats_plain) == {"uncertainty_clean"}
