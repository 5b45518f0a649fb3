import json

import pytest
import torch

from idml.checkpoint import load_checkpoint, model_from_checkpoint
from idml.training.loop import SELECTION_METRIC
from pipelines.cli import main
from idml.data import ImageShardDataset
from idml.training.local import class_balanced_loader, train_local
from idml.transforms import train_transform


def test_class_balanced_batches(tiny_config):
    ds = ImageShardDataset(tiny_config.data.dataset, "train", transform=train_transform(32))
    for images, targets in class_balanced_loader(ds, tiny_config):
        counts = torch.bincount(targets)
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
        assert sorted(counts[counts > 0].tolist()) == [2, 2, 2, 2]


def test_train_local_end_to_end_and_resume(tiny_config):
    summary = train_local(tiny_config, progress=False)
    out = tiny_config.output_dir
    for name in ("best.pt", "last.pt", "metrics.json", "uncertainty.png", "selective_retrieval.png", "recall_curves.png",
                 "retrieval_grid.png", "uncertainty_extremes.png"):
        assert (__import__("pathlib").Path(out) / name).stat().st_size > 0, name
    history = summary["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    assert all("val/recall@1" in h for h in history)
    assert not any("test/recall@1" in h for h in history)  # test once, at the end (train.test_every = 0)
    test = summary["test"]
    assert 0 <= test["recall@1"] <= 1 and "xdomain_recall@1" in test and "uncertainty_auroc_mixed" in test
    assert {"aurc_uncertainty", "aurc_top1_similarity", "aurc_top1_gap", "uncertainty_blend_spearman"} <= set(test)
    written = json.loads((__import__("pathlib").Path(out) / "metrics.json").read_text())
    assert written["blend_ratio"]["ratios"] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    # the confidence is fitted on validation (unless every validation query was right, or every one
    # wrong: 8 queries here), stored in best.pt, and evaluated on test with the other signals
    fitted = written["confidence"] is not None
    assert set(written["selective"]["signals"]) == {"uncertainty", "top1_similarity", "top1_gap"} | (
        {"confidence"} if fitted else set())
    assert ("confidence" in load_checkpoint(f"{out}/best.pt")) == fitted
    assert ("confidence_ece" in test) == fitted and all(f"r_auroc_{k}" in test for k in ("uncertainty", "top1_gap"))
    # the selected checkpoint is the best on validation, never chosen on test
    best = max(history, key=lambda h: h[f"val/{SELECTION_METRIC}"])
    assert summary["selected_epoch"] == best["epoch"]
    # plain dict checkpoint readable with weights_only=True
    state = torch.load(f"{out}/last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "config"} <= set(state)
    model, cfg = model_from_checkpoint(f"{out}/best.pt")
    assert cfg.model.embedding_dim == 32

    # resume: one more epoch continues from epoch 2 and keeps the history; test curves on request
    tiny_config.train.epochs, tiny_config.train.test_every = 3, 1
    summary = train_local(tiny_config, progress=False)
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    assert [h["epoch"] for h in summary["history"] if "test/recall@1" in h] == [2]
    assert load_checkpoint(f"{out}/last.pt")["epoch"] == 2


def test_cli_train_and_eval(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--set", *tiny_overrides, "train.epochs=1", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recall@1" in printed and "cross-domain" in printed and "images/s" in printed
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--set", *tiny_overrides,
                 "--output-dir", str(out), "--json", str(tmp_path / "m.json")]) == 0
    written = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= written["metrics"]["map@r"] <= 1 and (out / "uncertainty_test.png").exists()
    assert written["selective"]["num_queries"] > 0 and len(written["blend_ratio"]["mean"]) == 6
    assert "selective retrieval, AURC" in capsys.readouterr().out
    assert main(["eval", "--frozen-backbone", "--set", *tiny_overrides, "--output-dir", str(out)]) == 0
    assert "frozen resnet18" in capsys.readouterr().out


def test_cli_reports_user_errors_without_traceback(tiny_overrides, capsys):
    assert main(["train", "--set", *tiny_overrides, "train.epoch=3"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert main(["train", "--set", "data.dataset=/no/such/dataset"]) == 2
    assert "no/such/dataset" in capsys.readouterr().err


def test_bad_config_fails_before_training(tiny_config):
    tiny_config.train.batch_size = 7
    with pytest.raises(ValueError, match="multiple"):
        train_local(tiny_config, progress=False)


def test_cli_data_convert_and_inspect(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "folder"
    for c in range(4):
        for i in range(3):
            (src / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (60 * c, 10 * i, 90)).save(src / f"class{c}" / f"{i}.png")
    (src / "class0" / "broken.jpg").write_bytes(b"not an image")
    dst = tmp_path / "converted"
    assert main(["data", "convert", "image-folder", str(src), str(dst), "--val-fraction", "0"]) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "test" in printed and "not an image" in printed
    assert main(["data", "inspect", str(dst), "--verify", "--grid", str(tmp_path / "grid.png")]) == 0
    assert "verify: OK" in capsys.readouterr().out and (tmp_path / "grid.png").stat().st_size > 1000


def test_local_run_is_tracked_and_its_model_registered_and_used_by_uri(tiny_overrides, tmp_path, capsys, monkeypatch):
    """idml train logs params, per-epoch metrics and the selected checkpoint as an MLflow model;
    --register-model registers it; eval takes models:/NAME@alias."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "tracked"
    assert main(["train", "--set", *tiny_overrides, "--output-dir", str(out), "--register-model", "tiny-local"]) == 0
    printed = capsys.readouterr().out
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("idml").experiment_id])
    assert f"MLflow model: runs:/{run.info.run_id}/model; registered as models:/tiny-local/1" in printed
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["model.backbone"] == "resnet18" and "final_test/recall_at_1" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0, 1]
    assert run.data.tags["mlflow.source.name"] == "idml train" and run.data.tags["idml.model_uri"].endswith("/model")
    assert [v.run_id for v in client.search_model_versions("name = 'tiny-local'")] == [run.info.run_id]

    assert main(["model", "alias", "tiny-local", "champion", "1"]) == 0
    assert main(["eval", "--checkpoint", "models:/tiny-local@champion", "--set", *tiny_overrides,
                 "--output-dir", str(tmp_path / "eval"), "--json", str(tmp_path / "m.json")]) == 0
    by_uri = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--set", *tiny_overrides,
                 "--output-dir", str(tmp_path / "eval"), "--json", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["metrics"]["map@r"] == by_uri["map@r"]
    assert main(["model", "list", "tiny-local"]) == 0 and "champion" in capsys.readouterr().out


def test_no_mlflow_logs_nothing(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["train", "--set", *tiny_overrides, "train.epochs=1", "--output-dir", str(tmp_path / "x"), "--no-mlflow"]) == 0
    assert not (tmp_path / "mlflow.db").exists()
