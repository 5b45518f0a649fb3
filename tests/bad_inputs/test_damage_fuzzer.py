"""The damage fuzzer: for each kind of file the product reads to answer, flip, truncate or
overwrite bytes at random offsets (seeded), run the command that consumes it, and hold the
property: the result is identical to the undamaged run's, or the command refuses (exit 2, one
line naming the file). Never exit 0 with another answer (silent), never an internal error or a
traceback, never a hang (every call runs under a deadline). The same for the search service's
request bodies (malformed, nested, huge, binary, damaged images): an answer or a 4xx, never a 5xx.

    IDML_FUZZ_TRIALS=500 IDML_FUZZ_SEED=7 pytest tests/bad_inputs/test_damage_fuzzer.py -s

runs more trials (default 24 per kind; the kinds that train or export run a quarter of them);
each test prints its counts: ``N inputs: clear / skipped / handled / traceback / hang / 5xx / silent``
(skipped: the damage left the bytes as they were)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from bad_inputs.outcomes import FAILURES, OUTCOMES, record
from support import build_in_process, class_image, make_checkpoint, make_class_dataset, make_index_dataset

from pipelines.cli import main

TRIALS = int(os.environ.get("IDML_FUZZ_TRIALS", "24"))
SEED = int(os.environ.get("IDML_FUZZ_SEED", "0"))
DEADLINE_S = float(os.environ.get("IDML_FUZZ_DEADLINE_S", "120"))
# Timings differ between any two runs; everything else an evaluation reports must not.
TIMING = ("_s", "seconds")


class Hang(BaseException):
    """The call ran past its deadline (a BaseException: the CLI's last line of defence must not turn it into an exit code)."""


@contextlib.contextmanager
def deadline(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"no answer in {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def damage(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One random damage: flip 1-8 bits, truncate, or overwrite a run of up to 256 KiB."""
    how = rng.choice(["flip", "truncate", "overwrite"])
    out = bytearray(data)
    if how == "flip":
        offsets = rng.integers(0, len(data), int(rng.integers(1, 9)))
        for offset in offsets:
            out[offset] ^= 1 << int(rng.integers(0, 8))
        return f"flip bits at {sorted(int(o) for o in offsets)}", bytes(out)
    if how == "truncate":
        size = int(rng.integers(0, len(data)))
        return f"truncate to {size} of {len(data)} bytes", bytes(out[:size])
    length = int(rng.integers(1, min(len(data), 256 << 10) + 1))
    offset = int(rng.integers(0, len(data) - length + 1))
    fill = rng.choice(["random", "zeros"])
    out[offset:offset + length] = (rng.integers(0, 256, length, dtype=np.uint8).tobytes() if fill == "random"
                                   else bytes(length))
    return f"overwrite {length} bytes at {offset} with {fill}", bytes(out)


@dataclass
class Tally:
    kind: str
    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def add(self, outcome: str, what: str) -> None:
        self.counts[outcome] += 1
        if outcome in FAILURES:
            self.failures.append(f"{outcome}: {what}")

    def line(self) -> str:
        n = sum(self.counts.values())
        return f"{self.kind}: {n} inputs: " + " / ".join(f"{self.counts[o]} {o}" for o in OUTCOMES)

    def check(self, capsys) -> None:
        with capsys.disabled():
            print("\n" + self.line())
        record(self.counts)  # the suite's total (conftest.py)
        assert not self.failures, self.line() + "\n" + "\n".join(self.failures[:10])


def run_idml(*args) -> tuple[int | str, str, str]:
    """``idml ARGS`` in this process under the deadline: (exit code or "hang"/"traceback", stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), deadline(DEADLINE_S):
            code = main([str(a) for a in args])
    except Hang as e:
        return "hang", out.getvalue(), str(e)
    except BaseException as e:  # noqa: BLE001 - what escapes the command line is a traceback for the user
        return "traceback", out.getvalue(), f"{type(e).__name__}: {e}"
    return code, out.getvalue(), err.getvalue()


def judge(result, names: tuple[str, ...], same_answer: Callable[[str], bool]) -> str:
    """The outcome of one consuming command on a damaged file; a refusal must name it (or one of
    ``names``: its dataset folder). ``same_answer(stdout)``: whether an exit 0 gave the undamaged
    run's answer."""
    code, out, err = result
    if code in ("hang", "traceback"):
        return code
    errors = [line for line in err.splitlines() if line.startswith(("idml: error:", "idml index: error:"))]
    if code == 2:
        # A refusal: one line that names the damaged file (or its dataset folder).
        named = len(errors) == 1 and any(name in errors[0] for name in names)
        return "handled" if named and "Traceback" not in err else "traceback"
    if code == 0:
        return "clear" if same_answer(out) else "silent"
    return "traceback"  # exit 1: an internal error ("TypeError: ... (run with -v for the traceback)")


def fuzz(kind: str, path: Path, consumers: list[tuple[str, Callable[[], tuple], Callable[[str], bool]]], trials: int,
         seed_offset: int, *, folder: Path | None = None) -> Tally:
    """Damage ``path`` ``trials`` times; after each, run every consumer (name, run, same_answer).
    A refusal names ``path`` or the dataset ``folder`` holding it."""
    names = (str(path),) + ((f"dataset {folder} ",) if folder is not None else ())
    tally = Tally(kind)
    pristine = path.read_bytes()
    rng = np.random.default_rng([SEED, seed_offset])
    for trial in range(trials):
        what, damaged = damage(pristine, rng)
        if damaged == pristine:
            tally.counts["skipped"] += len(consumers)
            continue
        path.write_bytes(damaged)
        try:
            for name, run, same in consumers:
                tally.add(judge(run(), names, same), f"{name} after trial {trial}: {what}")
        finally:
            path.write_bytes(pristine)
    return tally


def without_timings(metrics):
    if isinstance(metrics, dict):
        return {k: without_timings(v) for k, v in metrics.items() if not k.endswith(TIMING)}
    if isinstance(metrics, list):
        return [without_timings(v) for v in metrics]
    return metrics


# -- the undamaged inputs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A checkpoint (resnet18 at 32 px) and a small dataset; tests damage copies."""
    root = tmp_path_factory.mktemp("fuzz")
    checkpoint = Path(make_checkpoint(root / "best.pt"))
    dataset = Path(make_class_dataset(root / "ds", train_classes=4, val_classes=2, test_classes=3, per_class=4,
                                      size=32))
    return root, checkpoint, dataset


def eval_consumer(checkpoint: Path, dataset: Path, out: Path, split: str = "test"):
    """``idml eval`` writing its metrics to JSON; returns (run, same_answer) against an undamaged run."""
    report = out / "metrics.json"

    def run():
        report.unlink(missing_ok=True)
        return run_idml("eval", "--checkpoint", checkpoint, "--split", split, "--json", report, "--output-dir", out,
                        "--set", f"data.dataset={dataset}", "eval.batch_size=64", "train.threads=1")

    code, _, err = run()
    assert code == 0, err
    baseline = without_timings(json.loads(report.read_text()))
    return run, lambda stdout: report.exists() and without_timings(json.loads(report.read_text())) == baseline


def verify_consumer(dataset: Path):
    code, baseline, err = run_idml("data", "inspect", dataset, "--verify")
    assert code == 0 and "verify: OK" in baseline, err
    return lambda: run_idml("data", "inspect", dataset, "--verify"), lambda stdout: stdout == baseline


# -- checkpoints ---------------------------------------------------------------------------------
def test_damaged_checkpoints_are_refused_by_eval_or_evaluated_the_same(world, tmp_path, capsys):
    _, checkpoint, dataset = world
    path = tmp_path / "best.pt"
    shutil.copy(checkpoint, path)
    run, same = eval_consumer(path, dataset, tmp_path / "eval")
    fuzz("checkpoint (idml eval)", path, [("eval", run, same)], TRIALS, 1).check(capsys)


def test_damaged_checkpoints_are_refused_by_export_or_exported_the_same(world, tmp_path, capsys):
    import torch

    _, checkpoint, _ = world
    path = tmp_path / "best.pt"
    shutil.copy(checkpoint, path)
    exported = tmp_path / "model.ts"
    probe = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def run():
        exported.unlink(missing_ok=True)
        return run_idml("export", "--checkpoint", path, "--format", "torchscript", "--output", exported)

    def outputs():
        with torch.no_grad():
            return [t.clone() for t in torch.jit.load(str(exported))(probe)]

    assert run()[0] == 0
    baseline = outputs()
    same = lambda stdout: exported.exists() and all(torch.equal(a, b) for a, b in zip(outputs(), baseline))  # noqa: E731
    fuzz("checkpoint (idml export)", path, [("export", run, same)], max(3, TRIALS // 4), 2).check(capsys)


# -- dataset shards and manifests ----------------------------------------------------------------
@pytest.fixture
def dataset_copy(world, tmp_path) -> Path:
    dataset = tmp_path / "ds"
    shutil.copytree(world[2], dataset)
    return dataset


@pytest.mark.parametrize("split", ["train", "test"])
def test_damaged_shards_are_refused_by_verify_and_eval(world, dataset_copy, tmp_path, capsys, split):
    _, checkpoint, _ = world
    shard = dataset_copy / split / "part-00000.parquet"
    run, same = eval_consumer(checkpoint, dataset_copy, tmp_path / "eval", split)
    consumers = [("data inspect --verify", *verify_consumer(dataset_copy)), (f"eval --split {split}", run, same)]
    fuzz(f"dataset shard ({split}: data inspect --verify, idml eval)", shard, consumers, TRIALS,
         3 + (split == "test"), folder=dataset_copy).check(capsys)


def test_damaged_shards_are_refused_by_training(world, dataset_copy, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = ["model.backbone=resnet18", "model.pretrained=false", "model.embedding_dim=16", "data.image_size=32",
                 "train.batch_size=4", "train.images_per_class=2", "train.epochs=1", "train.warmup_epochs=0",
                 "train.max_steps_per_epoch=1", "train.threads=1", "eval.batch_size=64", f"data.dataset={dataset_copy}"]

    def run():
        shutil.rmtree(out, ignore_errors=True)
        return run_idml("train", "--no-mlflow", "--no-resume", "--output-dir", out, "--set", *overrides)

    code, _, err = run()
    assert code == 0, err
    baseline = without_timings(json.loads((out / "metrics.json").read_text())["test"])

    def same(stdout):
        return without_timings(json.loads((out / "metrics.json").read_text())["test"]) == baseline

    for split in ("train", "val"):
        fuzz(f"dataset shard ({split}: idml train)", dataset_copy / split / "part-00000.parquet",
             [("train", run, same)], max(3, TRIALS // 4), 5 + (split == "val"), folder=dataset_copy).check(capsys)


def test_damaged_manifests_are_refused_or_read_the_same(world, dataset_copy, tmp_path, capsys):
    _, checkpoint, _ = world
    run, same = eval_consumer(checkpoint, dataset_copy, tmp_path / "eval")
    consumers = [("data inspect --verify", *verify_consumer(dataset_copy)), ("eval", run, same)]
    fuzz("dataset manifest (data inspect --verify, idml eval)", dataset_copy / "manifest.json", consumers, TRIALS,
         7, folder=dataset_copy).check(capsys)


# -- index versions and their merged cache -------------------------------------------------------
@pytest.fixture(scope="module")
def ivf_index(world):
    """An IVF version of two shards (searched through its merged on-disk cache) over 40 images."""
    root, checkpoint, _ = world
    build_in_process(root / "idx", make_index_dataset(root / "idx-ds", 40), str(checkpoint), index_type="ivf",
                     nlist=4, shards=2)
    return root / "idx"


@pytest.mark.parametrize("kind, file, seed_offset", [
    ("merged cache: merged again from the shards", "cache/v000001/merged.ivfdata", 9),
    ("merged cache: merged again from the shards", "cache/v000001/merged.index", 10),
    ("shard index: refused", "index", 11),  # a file of the version's first shard, named by its manifest entry
    ("shard embeddings: refused", "embeddings", 12),
])
def test_damaged_index_files_are_refused_by_query_or_answered_the_same(ivf_index, tmp_path, capsys, kind, file,
                                                                      seed_offset):
    index_dir = tmp_path / "idx"
    shutil.copytree(ivf_index, index_dir)

    def run():
        return run_idml("index", "query", "--index-dir", index_dir, "--ids", "img-004", "img-017", "--k", "5")

    code, baseline, err = run()  # merges the cache
    assert code == 0, err
    if "/" in file:
        path = index_dir / file
    else:
        entry = json.loads((index_dir / "versions/v000001/manifest.json").read_text())["shards"][0]
        path = index_dir / "versions/v000001" / entry[file]
    fuzz(f"index {kind} ({path.name}: idml index query)", path, [("index query", run, lambda out: out == baseline)],
         TRIALS, seed_offset).check(capsys)


# -- the search service's request bodies ---------------------------------------------------------
def test_search_request_bodies_are_answered_or_4xx_never_5xx(capsys):
    import base64

    from fastapi import HTTPException

    from idml.data.images import InvalidImageError, decode_image
    from idml.transforms import eval_transform
    from pipelines.serve import search_body

    transform = eval_transform(32)
    png = class_image(3, 1, 32)
    valid_json = json.dumps({"images": [base64.b64encode(png).decode()] * 2}).encode()
    rng = np.random.default_rng([SEED, 8])
    bodies: list[tuple[str, str, bytes]] = [
        ("nested", "application/json", b"[" * 100_000 + b"]" * 100_000),
        ("nested", "application/json", b'{"images": [' + b"{" * 50_000),
        ("huge", "application/json", b'{"images": ["' + b"A" * (8 << 20) + b'"]}'),
        ("huge", "application/json", b"9" * 100_000),
        ("huge", "image/png", png + os.urandom(1 << 20)),
        ("binary", "application/json", os.urandom(4096)),
        ("binary", "image/png", os.urandom(4096)),
        ("binary", "application/octet-stream", b""),
        ("malformed", "application/json", b'{"images": ["' + base64.b64encode(png)[:-3] + b'"]}'),
        ("malformed", "application/json", b'{"images": [null, 1, {}]}'),
    ]
    for trial in range(TRIALS * 4):
        what, damaged = damage(valid_json if trial % 2 else png, rng)
        bodies.append((f"damaged {'JSON' if trial % 2 else 'PNG'} body: {what}",
                       "application/json" if trial % 2 else "image/png", damaged))

    tally = Tally("search request bodies (POST /search parsing and image decoding)")
    for what, content_type, body in bodies:
        try:
            with deadline(30):
                blobs, _ = search_body(content_type, body, max_images=16)
                for blob in blobs:
                    transform(decode_image(blob))
            tally.add("clear", what)  # answered: the images are searchable
        except (HTTPException, InvalidImageError) as e:
            status = e.status_code if isinstance(e, HTTPException) else 400
            tally.add("handled" if 400 <= status < 500 else "5xx", what)
        except Hang:
            tally.add("hang", what)
        except Exception as e:  # noqa: BLE001 - the service's last handler would answer 500
            tally.add("5xx", f"{what}: {type(e).__name__}: {e}")
    tally.check(capsys)
