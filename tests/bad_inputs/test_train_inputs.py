"""Bad input on the training side, through the real command line: resuming with another config,
damaged checkpoints, MLflow run names, Ctrl-C, checkpoint sizes and a new user's typos. Every
case ends in one clear message with exit code 2 (130 for Ctrl-C), and nothing valid is lost
(issue 11)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from idml.checkpoint import load_checkpoint
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]
BAD_INPUT, INTERRUPTED = 2, 130

# A resnet18 from scratch on 32 px images, one step per epoch: a two-epoch run in seconds.
TINY = ["model.backbone=resnet18", "model.pretrained=false", "model.embedding_dim=32", "data.image_size=32",
        "train.batch_size=8", "train.images_per_class=2", "train.epochs=2", "train.warmup_epochs=1",
        "train.max_steps_per_epoch=1", "train.lr=1e-3", "train.threads=1", "eval.batch_size=16",
        "eval.recall_ks=[1,2]", "eval.nmi=false"]


@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory):
    """A finished two-epoch local run (last.pt, best.pt, metrics.json); tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--set", *TINY, f"data.dataset={tiny_dataset}", "--output-dir", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def train_args(dataset, out, *extra):
    return ["train", "--set", *TINY, f"data.dataset={dataset}", *extra, "--output-dir", out]


def fingerprints(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("idml: error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- 1. resuming with another config ------------------------------------------------------------
@pytest.mark.parametrize("change, listed", [
    ("loss.uncertainty_weight=0.5", "loss.uncertainty_weight: 0.1 -> 0.5"),  # lambda
    ("train.lr=0.01", "train.lr: 0.001 -> 0.01"),
    ("loss.name=triplet", "loss.name: 'proxy_anchor' -> 'triplet'"),  # was "Unexpected key(s) loss.proxies"
    ("loss.mixup=false", "loss.mixup: True -> False"),
    ("train.epochs=1", "train.epochs: 2 -> 1 (but 2 epochs are done)"),
])
def test_resume_with_another_config_is_refused(idml, tiny_dataset, run_copy, change, listed):
    before = fingerprints(run_copy)
    code, out, err = idml(*train_args(tiny_dataset, run_copy, change))
    assert code == BAD_INPUT, err
    assert f"{run_copy / 'last.pt'} holds a run with another config" in err and listed in err
    assert "--no-resume" in err and "--output-dir" in err and "Traceback" not in err
    assert out == ""  # no metrics table of the finished run passed off as this config's
    assert fingerprints(run_copy) == before


def test_resume_with_changes_that_keep_the_run_continues_from_last_pt(idml, tiny_dataset, run_copy):
    # More epochs, and evaluation or speed settings: the same run, continued from last.pt.
    code, out, err = idml(*train_args(tiny_dataset, run_copy, "train.epochs=3", "eval.batch_size=8",
                                      "train.threads=2"))
    assert code == 0, err
    last = load_checkpoint(run_copy / "last.pt")
    assert last["epoch"] == 2 and [h["epoch"] for h in last["history"]] == [0, 1, 2]
    assert "recall@1" in out


def test_no_resume_starts_over_with_the_new_config(idml, tiny_dataset, run_copy):
    code, _, err = idml(*train_args(tiny_dataset, run_copy, "loss.name=triplet"), "--no-resume")
    assert code == 0, err
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run_copy / name)
        assert state["config"]["loss"]["name"] == "triplet", name
    assert [h["epoch"] for h in load_checkpoint(run_copy / "last.pt")["history"]] == [0, 1]


def test_ray_run_refuses_an_output_folder_holding_another_runs_last_pt(idml, tiny_dataset, run_copy):
    # Checked on the driver before Ray starts: Ray run "other" has no checkpoint, and starting it
    # would replace the local run's last.pt.
    before = fingerprints(run_copy)
    code, _, err = idml(*train_args(tiny_dataset, run_copy), "--ray", "--run-name", "other")
    assert code == BAD_INPUT, err
    assert "belongs to another run" in err and "'other' has no checkpoint" in err and "--no-resume" in err
    assert fingerprints(run_copy) == before and not (run_copy / "ray").exists()


# -- 2. damaged checkpoints ---------------------------------------------------------------------
def _empty(path: Path, real: Path) -> None:
    path.write_bytes(b"")


def _random_bytes(path: Path, real: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _truncated(path: Path, real: Path) -> None:
    data = real.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _overwritten(path: Path, real: Path) -> None:
    data = bytearray(real.read_bytes())  # 256 KB of the weights overwritten: the zip's CRC fails
    middle = len(data) // 2
    data[middle:middle + (256 << 10)] = bytes(256 << 10)
    path.write_bytes(bytes(data))


def _plain_state_dict(path: Path, real: Path) -> None:
    torch.save({"weight": torch.zeros(3)}, path)


def _pickled_object(path: Path, real: Path) -> None:
    torch.save({"model": Path("/")}, path)  # any object beyond tensors and builtins


@pytest.mark.parametrize("damage, message", [
    (_empty, "is empty (0 bytes)"),
    (_random_bytes, "is not a torch checkpoint file"),
    (_truncated, "is truncated"),
    (_overwritten, "is damaged (data/"),
    (_plain_state_dict, "is a torch file but not an idml checkpoint (no model, config, epoch)"),
    (_pickled_object, "refusing to unpickle them"),
])
def test_eval_refuses_a_damaged_checkpoint(idml, finished_run, tiny_dataset, tmp_path, damage, message):
    checkpoint = tmp_path / "model.pt"
    damage(checkpoint, finished_run / "best.pt")
    code, _, err = idml("eval", "--checkpoint", checkpoint, "--set", f"data.dataset={tiny_dataset}",
                        "--output-dir", tmp_path / "eval")
    line = one_line_error(err)
    assert code == BAD_INPUT and f"checkpoint {checkpoint} " in line and message in line


def test_eval_refuses_a_folder_and_names_the_checkpoint_inside(idml, finished_run, tiny_dataset, tmp_path):
    code, _, err = idml("eval", "--checkpoint", finished_run, "--set", f"data.dataset={tiny_dataset}",
                        "--output-dir", tmp_path / "eval")
    line = one_line_error(err)
    assert code == BAD_INPUT and f"{finished_run} is a folder" in line and f"pass {finished_run / 'best.pt'}" in line


@pytest.mark.parametrize("damage, message", [(_empty, "is empty"), (_truncated, "is truncated"),
                                             (_overwritten, "fails its CRC-32 checksum")])
def test_resume_from_a_damaged_last_pt_is_refused_never_started_over(idml, tiny_dataset, run_copy, damage, message):
    damage(run_copy / "last.pt", run_copy / "last.pt")
    before = fingerprints(run_copy)
    code, _, err = idml(*train_args(tiny_dataset, run_copy))
    line = one_line_error(err)
    assert code == BAD_INPUT and line.startswith(f"idml: error: cannot resume: checkpoint {run_copy / 'last.pt'}")
    assert message in line and "--no-resume" in line
    assert fingerprints(run_copy) == before  # best.pt and the damaged file stay for the user to judge


# -- 3. MLflow run names ------------------------------------------------------------------------
def test_mlflow_run_names_with_quotes_and_wildcards_are_found_again(tmp_path):
    # Was an MlflowException: the name went into a filter string between single quotes.
    from mlflow.tracking import MlflowClient

    from idml.tracking import get_or_create_run

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    names = ["a'b", 'a"b', "it's \"x\"", "a\\", "a_b", "aXb", "a%b", "a b", "é'ü"]
    ids = {name: get_or_create_run(client, "idml", name) for name in names}
    assert len(set(ids.values())) == len(names)  # LIKE's wildcards never match another name
    assert {name: get_or_create_run(client, "idml", name) for name in names} == ids
    assert {client.get_run(run_id).info.run_name for run_id in ids.values()} == set(names)


def test_ray_run_name_must_be_a_folder_name(idml, tiny_dataset, tmp_path):
    code, _, err = idml(*train_args(tiny_dataset, tmp_path / "out"), "--ray", "--run-name", "a/b")
    line = one_line_error(err)
    assert code == BAD_INPUT and "run_name 'a/b' must be a folder name" in line
    assert not (tmp_path / "out").exists()


# -- 4. Ctrl-C ----------------------------------------------------------------------------------
def test_ctrl_c_says_where_the_local_run_stopped(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    # Many one-step epochs, no evaluation before the last: a checkpoint every second or so.
    args = train_args(tiny_dataset, out, "train.epochs=500", "train.eval_every=500")
    # SIGINT as a terminal delivers it: a suite started in the background (`cmd &`) ignores it,
    # and a child that starts with SIGINT ignored never gets Python's KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while not (out / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "last.pt").exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in 180 s"
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"local idml train stopped {time.monotonic() - sent:.1f} s after Ctrl-C")
    assert proc.returncode == INTERRUPTED, err
    assert "Traceback" not in err
    epoch = load_checkpoint(out / "last.pt")["epoch"]  # a whole checkpoint: nothing half-written
    assert (f"idml: stopped (Ctrl-C); the last checkpoint is {out / 'last.pt'} (epoch {epoch + 1} of 500 done); "
            "the same command without --no-resume resumes from it") in err
    assert not (out / "last.pt.tmp").exists()


def test_ray_stop_message_before_the_first_checkpoint(tiny_dataset, tmp_path):
    # The real Ctrl-C on a Ray run is in tests/ray_jobs/test_train_pipeline.py.
    from idml.config import load_config
    from pipelines.train import RayOptions, plan, where_stopped

    p = plan(load_config(overrides=TINY + [f"data.dataset={tiny_dataset}", f"output_dir={tmp_path / 'run'}"]),
             RayOptions(run_name="fresh"))
    assert where_stopped(p) == "Ray run 'fresh' reported no checkpoint yet (nothing to resume)"


# -- 5. checkpoint sizes ------------------------------------------------------------------------
def test_best_pt_holds_no_optimizer_state_and_serves_eval_and_index(idml, finished_run, tiny_dataset, tmp_path):
    from idml.index.embed import BatchEmbedder, describe_checkpoint

    best, last = load_checkpoint(finished_run / "best.pt"), load_checkpoint(finished_run / "last.pt")
    assert not {"optimizer", "scheduler"} & set(best) and {"optimizer", "scheduler"} <= set(last)
    assert {"model", "criterion", "config", "epoch", "history", "best"} <= set(best)
    # AdamW keeps two moments per weight: last.pt is about three times best.pt.
    assert (finished_run / "best.pt").stat().st_size < (finished_run / "last.pt").stat().st_size / 2
    code, out, err = idml("eval", "--checkpoint", finished_run / "best.pt", "--set", f"data.dataset={tiny_dataset}",
                          "--output-dir", tmp_path / "eval")
    assert code == 0 and "recall@1" in out, err
    assert describe_checkpoint(finished_run / "best.pt")["embedding_dim"] == 32
    assert BatchEmbedder(str(finished_run / "best.pt"), device="cpu").dim == 32


# -- other inputs a new user gets wrong ---------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--set", "train.epoch=3"], "unknown config key(s) train.epoch; valid keys in train: epochs,"),
    (["--set", "train.epochs=two"], "train.epochs must be int, got str 'two'"),
    (["--set", "train.epochs=-1"], "invalid config: train.epochs must be >= 1"),
    (["--set", "train.epochs"], "override 'train.epochs' must look like section.key=value"),
    (["--set", "train.lr=[1"], "override 'train.lr=[1' is not valid YAML"),
    (["--config", "{tmp}/missing.yaml"], "config file {tmp}/missing.yaml does not exist"),
    (["--config", "{tmp}"], "config file {tmp} is a folder"),
    (["--config", "{tmp}/broken.yaml"], "config file {tmp}/broken.yaml is not valid YAML"),
    (["--set", "data.dataset={tmp}/no-such-dataset"], "is neither a dataset folder nor a built-in dataset"),
])
def test_train_input_errors_are_one_line(idml, tmp_path, args, message):
    (tmp_path / "broken.yaml").write_text("train: {epochs: 2\n")
    args = [a.format(tmp=tmp_path) for a in args]
    code, _, err = idml("train", *args, "--output-dir", tmp_path / "out")
    line = one_line_error(err)
    assert code == BAD_INPUT and message.format(tmp=tmp_path) in line
    assert not (tmp_path / "out").exists()
