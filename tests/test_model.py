import pytest
import torch

from idml.backbones import WeightsMismatchError, create_backbone
from idml.model import IDMLModel, UncertaintyNorm, build_model
from idml.errors import DamagedFileError


def test_efficientnet_lite0_loads_packaged_imagenet_weights():
    bb = create_backbone("efficientnet_lite0", pretrained=True)
    random = create_backbone("efficientnet_lite0", pretrained=False)
    assert bb.feature_dim == 1280 and bb.mean == (0.5, 0.5, 0.5)
    w, r = bb.module.conv_stem.weight, random.module.conv_stem.weight
    assert not torch.equal(w, r)
    # trained BN statistics, not the fresh (0, 1) ones
    assert not torch.allclose(bb.module.bn1.running_var, torch.ones_like(bb.module.bn1.running_var))


def test_model_outputs_and_per_image_uncertainty():
    model = build_model("resnet18", embedding_dim=16, pretrained=False).eval()
    images = torch.rand(6, 3, 32, 32)
    mu, sigma = model(images)
    assert mu.shape == sigma.shape == (6, 16)
    assert torch.allclose(mu.norm(dim=1), torch.ones(6), atol=1e-5)
    u = sigma.pow(2).sum(1)
    # unlike the released code (UncertaintyNorm "unit"), uncertainty differs between images
    assert u.std() > 0 and not torch.allclose(u, torch.ones(6))
    # uint8 input is scaled to [0, 1] first
    mu8, _ = model((images * 255).round().to(torch.uint8))
    assert torch.allclose(mu8, mu, atol=1e-2)


def test_pooling_is_average_plus_max():
    backbone = torch.nn.Identity()
    model = IDMLModel(backbone, 3, embedding_dim=4, mean=(0, 0, 0), std=(1, 1, 1))
    x = torch.rand(2, 3, 5, 5)
    assert torch.allclose(model.pooled_features(x), x.mean((2, 3)) + x.amax((2, 3)))


def test_batchnorm_statistics_stay_frozen_in_training():
    model = build_model("resnet18", embedding_dim=8, pretrained=False).train()
    bn = model.backbone.bn1
    before = bn.running_mean.clone()
    assert not bn.training and model.semantic_head.training
    model(torch.rand(4, 3, 32, 32) * 3)
    assert torch.equal(bn.running_mean, before)


def test_warmup_freezes_only_the_backbone():
    model = build_model("resnet18", embedding_dim=8, pretrained=False)
    model.set_backbone_trainable(False)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.semantic_head.parameters())
    model.set_backbone_trainable(True)
    assert all(p.requires_grad for p in model.backbone.parameters())


def test_local_weights_file_round_trip(tmp_path):
    source = create_backbone("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    # a torchvision-style file, classifier included (it is ignored)
    torch.save({**source.module.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, path)
    loaded = create_backbone("resnet18", weights_path=str(path))
    assert torch.equal(loaded.module.conv1.weight, source.module.conv1.weight)


def test_mismatched_weights_file_names_the_keys(tmp_path):
    state = create_backbone("resnet18", pretrained=False).module.state_dict()
    state.pop("layer4.1.bn2.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError, match=r"missing keys \[layer4.1.bn2.weight\].*unexpected keys \[extra.weight\]"):
        create_backbone("resnet18", weights_path=str(path))
    # a resnet50 file into resnet18: shape mismatch reported
    torch.save(create_backbone("resnet50", pretrained=False).module.state_dict(), path)
    with pytest.raises(WeightsMismatchError, match="wrong shapes|unexpected keys"):
        create_backbone("resnet18", weights_path=str(path))


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("vgg16")


def test_batch_uncertainty_norm_spends_a_budget_of_one_per_image_on_average():
    torch.manual_seed(0)
    norm = UncertaintyNorm("batch", momentum=0.5).train()
    raw = torch.randn(8, 4, requires_grad=True) * torch.arange(1, 9).float()[:, None]
    sigma = norm(raw)
    u = sigma.pow(2).sum(1)
    assert u.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert u.std() > 0.1  # per image, not constant
    # the budget couples the images: raising one image's uncertainty lowers everyone else's
    grad, = torch.autograd.grad(u[0], raw)
    assert (grad[1:] * raw[1:]).sum(1).lt(0).all()
    # evaluation uses the running mean of the training batches, so one image's value does not
    # depend on the batch it comes in
    raw_mean = raw.detach().pow(2).sum(1).mean()
    assert norm.running_uncertainty.item() == pytest.approx(0.5 + 0.5 * raw_mean.item(), rel=1e-5)
    norm.eval()
    alone = norm(raw.detach()[:1]).pow(2).sum()
    assert alone.item() == pytest.approx(raw.detach()[0].pow(2).sum().item() / norm.running_uncertainty.item(), rel=1e-5)


def test_unit_and_none_uncertainty_norms():
    raw = torch.randn(5, 3) * 4
    assert torch.allclose(UncertaintyNorm("unit")(raw).pow(2).sum(1), torch.ones(5))  # the released code's constant
    assert torch.equal(UncertaintyNorm("none")(raw), raw)
    with pytest.raises(ValueError, match="not one of batch, unit, none"):
        UncertaintyNorm("softplus")


def test_batch_uncertainty_norm_state_is_saved_with_the_model():
    model = build_model("resnet18", embedding_dim=8, pretrained=False).train()
    model(torch.rand(4, 3, 32, 32))
    state = model.state_dict()
    assert "uncertainty_norm.running_uncertainty" in state
    assert state["uncertainty_norm.running_uncertainty"].item() != 1.0


def test_checkpoints_from_before_the_uncertainty_budget_load_with_the_raw_head(tmp_path):
    from idml.checkpoint import model_from_checkpoint, save_checkpoint
    from idml.config import load_config

    cfg = load_config(overrides=["model.backbone=resnet18", "model.embedding_dim=8", "model.pretrained=false"]).to_dict()
    del cfg["model"]["uncertainty_norm"]  # as written before the key existed
    old = build_model("resnet18", embedding_dim=8, pretrained=False, uncertainty_norm="none")
    state = {k: v for k, v in old.state_dict().items() if k != "uncertainty_norm.running_uncertainty"}
    path = save_checkpoint(tmp_path / "old.pt", {"model": state, "config": cfg, "epoch": 0})
    model, loaded_cfg = model_from_checkpoint(path)
    assert loaded_cfg.model.uncertainty_norm == "none"
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model(images)[1], old.eval()(images)[1])
    # anything else missing is still an error
    del state["semantic_head.weight"]
    save_checkpoint(path, {"model": state, "config": cfg, "epoch": 0})
    with pytest.raises(DamagedFileError, match="semantic_head.weight"):
        model_from_checkpoint(path)


@pytest.mark.parametrize("method", ["pfe", "failure"])
def test_stop_gradient_uncertainty_head_never_moves_the_features(method):
    model = build_model("resnet18", embedding_dim=8, pretrained=False, uncertainty=method).train()
    mu, sigma = model(torch.rand(4, 3, 32, 32))
    assert sigma.shape == mu.shape and (sigma > 0).all()
    # about e^-1 of total variance (odds of failure) at the start, whatever the width
    assert torch.allclose(sigma.pow(2).sum(1), torch.full((4,), 0.3679), atol=1e-3)
    sigma.pow(2).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.uncertainty_head.parameters())
