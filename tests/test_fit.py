"""The one epoch loop (``idml.training.loop``): warm-up, evaluation cadence, best selection, checkpoints,
history, hooks."""

import pytest
import torch
from support import TRAIN_OVERRIDES, random_batches

from idml.checkpoint import load_checkpoint
from idml.config import load_config
from idml.data import ImageShardDataset
from idml.training.setup import build_training
from idml.training.loop import SELECTION_METRIC, Hooks, Progress, fit, train_one_epoch
from idml.transforms import eval_transform

OVERRIDES = TRAIN_OVERRIDES


def test_warmup_trains_heads_and_proxies_only_then_everything(tmp_path):
    cfg = load_config(overrides=OVERRIDES + ["train.epochs=1"])
    state = build_training(cfg, num_classes=4)
    snapshot = {k: v.clone() for k, v in state.objective.state_dict().items()}
    wrapped = []
    hooks = Hooks(wrap=lambda objective: wrapped.append(objective) or objective)
    fit(state, cfg, lambda epoch: random_batches(), out_dir=tmp_path, hooks=hooks, show_progress=False)
    after = state.objective.state_dict()
    assert torch.equal(after["model.backbone.conv1.weight"], snapshot["model.backbone.conv1.weight"])
    assert not torch.equal(after["model.semantic_head.weight"], snapshot["model.semantic_head.weight"])
    assert not torch.equal(after["criterion.loss.proxies"], snapshot["criterion.loss.proxies"])
    cfg.train.epochs = 3  # two more epochs after the warm-up: one phase change, one re-wrap
    done = fit(state, cfg, lambda epoch: random_batches(), out_dir=tmp_path, hooks=hooks, show_progress=False,
               progress=Progress.resume(state, load_checkpoint(tmp_path / "last.pt")))
    assert not torch.equal(state.objective.state_dict()["model.backbone.conv1.weight"], snapshot["model.backbone.conv1.weight"])
    assert len(wrapped) == 2 and [h["epoch"] for h in done.history] == [0, 1, 2]
    stats = done.history[0]
    assert stats["train/steps"] == 3 and stats["train/images"] == 24 and stats["train/images_per_s"] > 0
    assert stats["train/uncertainty_mixed"] >= 0


def test_best_selected_on_validation_at_the_eval_cadence(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.train.epochs, cfg.train.eval_every = 3, 2
    state = build_training(cfg, num_classes=4)
    val = ImageShardDataset(cfg.data.dataset, "val", transform=eval_transform(32))
    ended = []
    done = fit(state, cfg, lambda epoch: random_batches(2), out_dir=tmp_path, val=val, reported={"test": val},
               hooks=Hooks(epoch_end=lambda epoch, record: ended.append(epoch)), show_progress=False)
    assert ended == [0, 1, 2]
    evaluated = [h["epoch"] for h in done.history if f"val/{SELECTION_METRIC}" in h]
    assert evaluated == [1, 2]  # every 2nd epoch, and the last
    # the uncertainty's ranking on validation, for a search over its knobs (tune_spaces/emoji_failure.yaml)
    assert all(0 <= h["val/aurc_uncertainty"] <= 1 and "val/r_auroc_top1_gap" in h
               for h in done.history if h["epoch"] in evaluated)
    # test only reports: by default never during training (the caller evaluates the selected checkpoint)
    assert not any("test/recall@1" in h for h in done.history)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == done.best["epoch"] and "optimizer" not in best  # best.pt is for evaluation
    assert "optimizer" in load_checkpoint(tmp_path / "last.pt")
    assert done.selected(tmp_path) == tmp_path / "best.pt"


def test_other_processes_only_train(tmp_path):
    cfg = load_config(overrides=OVERRIDES + ["train.epochs=1"])
    state = build_training(cfg, num_classes=4)
    done = fit(state, cfg, lambda epoch: random_batches(1), out_dir=tmp_path, main_process=False, show_progress=False,
               hooks=Hooks(epoch_stats=lambda stats: {**stats, "reduced": 1.0}))
    assert done.history == [] and not (tmp_path / "last.pt").exists()


def test_non_finite_loss_and_empty_input_are_clear_errors():
    cfg = load_config(overrides=OVERRIDES + ["train.lr=1e30"])
    state = build_training(cfg, num_classes=4)
    with pytest.raises(ValueError, match="no batches"):
        train_one_epoch(state.objective, state.optimizer, [], epoch=0, train_cfg=cfg.train, progress=False)
    state.model.set_backbone_trainable(True)
    with pytest.raises(FloatingPointError, match="lower train.lr"):
        for epoch in range(3):
            train_one_epoch(state.objective, state.optimizer, random_batches(), epoch=epoch, train_cfg=cfg.train, progress=False)


def test_max_steps_per_epoch():
    cfg = load_config(overrides=OVERRIDES + ["train.max_steps_per_epoch=2"])
    state = build_training(cfg, num_classes=4)
    assert train_one_epoch(state.objective, state.optimizer, random_batches(5), epoch=0, train_cfg=cfg.train, progress=False)["steps"] == 2


def test_selection_follows_map_at_r_not_recall_at_1(tmp_path, monkeypatch):
    """R@1 on a small validation split ties and jumps; best.pt follows MAP@R. A run resumed from a
    checkpoint picked on R@1 is compared on MAP@R from its history, never R@1 against MAP@R."""
    import idml.training.loop as fit_module

    cfg = load_config(overrides=OVERRIDES)
    state = build_training(cfg, num_classes=4)
    per_epoch = iter([{"recall@1": 0.80, "map@r": 0.50}, {"recall@1": 0.80, "map@r": 0.60},
                      {"recall@1": 0.90, "map@r": 0.55}])
    monkeypatch.setattr(fit_module, "evaluate_model", lambda *a, **k: None)
    monkeypatch.setattr(fit_module, "summary_metrics", lambda result: next(per_epoch))
    progress = Progress()
    for epoch in range(3):
        record = {"epoch": epoch}
        fit_module._evaluate(state, cfg, epoch, record, progress, object(), {}, tmp_path / "best.pt", device="cpu",
                             show_progress=False)
        progress.history.append(record)
    assert SELECTION_METRIC == "map@r"
    assert progress.best == {"epoch": 1, "metric": "map@r", "score": 0.60}
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1

    # Resumed from a checkpoint whose best was picked on R@1 (epoch 2 of the history above, MAP@R 0.55).
    resumed = Progress(3, progress.history, {"epoch": 2, "metric": "recall@1", "score": 0.90})
    per_epoch = iter([{"recall@1": 0.85, "map@r": 0.58}])
    fit_module._evaluate(state, cfg, 3, {"epoch": 3}, resumed, object(), {}, tmp_path / "best.pt", device="cpu",
                         show_progress=False)
    assert resumed.best["epoch"] == 3  # 0.58 beats the old best's MAP@R 0.55, though not its R@1 0.90


def test_reported_splits_every_test_every_epochs(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.train.epochs, cfg.train.test_every = 3, 2
    state = build_training(cfg, num_classes=4)
    val = ImageShardDataset(cfg.data.dataset, "val", transform=eval_transform(32))
    done = fit(state, cfg, lambda epoch: random_batches(1), out_dir=tmp_path, val=val, reported={"test": val},
               show_progress=False)
    assert [h["epoch"] for h in done.history if "test/recall@1" in h] == [1, 2]  # every 2nd epoch, and the last
    assert all(f"val/{SELECTION_METRIC}" in h for h in done.history)
