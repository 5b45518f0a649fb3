import pytest
import torch
from support import TRAIN_OVERRIDES, random_batches

from idml.config import load_config
from idml.evaluation.embedding import embed
from idml.training.setup import build_training
from idml.training.loop import train_one_epoch

OVERRIDES = TRAIN_OVERRIDES


def test_param_groups_learning_rates():
    state = build_training(load_config(overrides=[*OVERRIDES, "train.uncertainty_lr_multiplier=0.1"]), num_classes=4)
    lrs = {g["name"]: g["lr"] for g in state.optimizer.param_groups}
    assert lrs == pytest.approx({"backbone": 5e-4, "semantic_head": 1e-3, "uncertainty_head": 1e-4, "loss": 1e-2})


def test_state_dict_round_trip():
    cfg = load_config(overrides=OVERRIDES)
    a = build_training(cfg, num_classes=4)
    train_one_epoch(a.objective, a.optimizer, random_batches(1), epoch=1, train_cfg=cfg.train, progress=False)
    b = build_training(cfg, num_classes=4)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.objective.criterion.loss.proxies, b.objective.criterion.loss.proxies)
    assert a.optimizer.state_dict()["state"].keys() == b.optimizer.state_dict()["state"].keys()


def test_embedding_nothing_is_a_clear_error():
    state = build_training(load_config(overrides=OVERRIDES), num_classes=4)
    with pytest.raises(ValueError, match="nothing to embed"):
        embed(state.model, [], progress=False)
