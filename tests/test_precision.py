import pytest
import torch

from idml.config import load_config
from idml.evaluation.embedding import embed
from idml.training.setup import build_training
from idml.precision import autocast_dtype, native_bf16
from idml.model import build_model


def test_precision_policy():
    assert autocast_dtype("cpu", "fp32") is None
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16
    assert autocast_dtype("cpu", "auto") is (torch.bfloat16 if native_bf16("cpu") else None)
    with pytest.raises(ValueError, match="precision 'fp16' is not one of"):
        autocast_dtype("cpu", "fp16")


def test_config_refuses_an_unknown_precision():
    from idml.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="train.precision 'half'"):
        validate_config(load_config(overrides=["train.precision=half"]))


def test_bf16_backbone_keeps_heads_and_outputs_in_fp32():
    torch.manual_seed(0)
    model = build_model("resnet18", embedding_dim=16, pretrained=False).eval()
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        exact = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(images)
    for full, low in zip(exact, mixed):
        assert low.dtype == torch.float32
        assert torch.allclose(full, low, atol=0.05)
    mu, sigma = embed(model, [images], precision="bf16", progress=False)
    assert mu.dtype == sigma.dtype and str(mu.dtype) == "float32"


def test_training_step_under_bf16_learns(tiny_config):
    cfg = tiny_config
    cfg.train.precision = "bf16"
    state = build_training(cfg, num_classes=4)
    assert state.objective.autocast_dtype is torch.bfloat16
    state.model.set_backbone_trainable(True)
    state.objective.train()
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(4).repeat_interleave(2)
    losses = []
    for _ in range(5):
        loss, _ = state.objective(images, labels)
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        losses.append(loss.item())
    assert loss.dtype == torch.float32 and losses[-1] < losses[0]
