import pytest
import torch

from idml.config import load_config
from idml.engine import build_training, embed, train_one_epoch

OVERRIDES = ["model.backbone=resnet18", "model.pretrained=false", "model.embedding_dim=16",
             "train.lr=1e-3", "train.proxy_lr_multiplier=10", "train.backbone_lr_multiplier=0.5",
             "train.warmup_epochs=1", "train.channels_last=false"]


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(4).repeat_interleave(2))
            for _ in range(n)]


def test_param_groups_learning_rates():
    state = build_training(load_config(overrides=OVERRIDES), num_classes=4)
    lrs = {g["name"]: g["lr"] for g in state.optimizer.param_groups}
    assert lrs == pytest.approx({"backbone": 5e-4, "heads": 1e-3, "loss": 1e-2})


def test_warmup_trains_heads_and_proxies_only_then_everything():
    cfg = load_config(overrides=OVERRIDES)
    state = build_training(cfg, num_classes=4)
    snapshot = {k: v.clone() for k, v in state.objective.state_dict().items()}
    stats = train_one_epoch(state.objective, state.optimizer, _batches(), epoch=0, train_cfg=cfg.train, progress=False)
    after = state.objective.state_dict()
    assert torch.equal(after["model.backbone.conv1.weight"], snapshot["model.backbone.conv1.weight"])
    assert not torch.equal(after["model.semantic_head.weight"], snapshot["model.semantic_head.weight"])
    assert not torch.equal(after["criterion.loss.proxies"], snapshot["criterion.loss.proxies"])
    assert stats["steps"] == 3 and stats["images"] == 24 and stats["images_per_s"] > 0
    assert stats["uncertainty_mixed"] >= 0
    train_one_epoch(state.objective, state.optimizer, _batches(), epoch=1, train_cfg=cfg.train, progress=False)
    assert not torch.equal(state.objective.state_dict()["model.backbone.conv1.weight"], snapshot["model.backbone.conv1.weight"])


def test_state_dict_round_trip():
    cfg = load_config(overrides=OVERRIDES)
    a = build_training(cfg, num_classes=4)
    train_one_epoch(a.objective, a.optimizer, _batches(1), epoch=1, train_cfg=cfg.train, progress=False)
    b = build_training(cfg, num_classes=4)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.objective.criterion.loss.proxies, b.objective.criterion.loss.proxies)
    assert a.optimizer.state_dict()["state"].keys() == b.optimizer.state_dict()["state"].keys()


def test_non_finite_loss_and_empty_input_are_clear_errors():
    cfg = load_config(overrides=OVERRIDES + ["train.lr=1e30"])
    state = build_training(cfg, num_classes=4)
    with pytest.raises(ValueError, match="no batches"):
        train_one_epoch(state.objective, state.optimizer, [], epoch=0, train_cfg=cfg.train, progress=False)
    with pytest.raises(FloatingPointError, match="lower train.lr"):
        for epoch in range(3):
            train_one_epoch(state.objective, state.optimizer, _batches(), epoch=epoch, train_cfg=cfg.train, progress=False)
    with pytest.raises(ValueError, match="nothing to embed"):
        embed(state.model, [], progress=False)


def test_max_steps_per_epoch():
    cfg = load_config(overrides=OVERRIDES + ["train.max_steps_per_epoch=2"])
    state = build_training(cfg, num_classes=4)
    assert train_one_epoch(state.objective, state.optimizer, _batches(5), epoch=0, train_cfg=cfg.train, progress=False)["steps"] == 2
