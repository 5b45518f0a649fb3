"""`idml serve` end to end: the real command on its own local Ray instance, Ray Serve on loopback,
a tiny published index, and real HTTP requests: search by image and by id, re-rank, health, bad
requests, and new index versions published while requests keep coming."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from support import build_in_process, make_checkpoint, make_index_dataset, shape_image

from idml.checkpoint import load_checkpoint, save_checkpoint
from idml.index import IndexStore

from .ray_helpers import REPO, env_without_ray_address, free_port

MAX_BYTES = 100_000
STARTUP_S = 240  # a fresh Ray instance, Serve, and the replica's model on a loaded 2-core machine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    checkpoint = make_checkpoint(root / "ckpt.pt")
    dataset = make_index_dataset(root / "ds", 40, corrupt=(3,))
    index_dir = root / "index"
    build_in_process(index_dir, dataset, checkpoint)
    return {"root": root, "checkpoint": checkpoint, "dataset": dataset, "index_dir": index_dir}


@pytest.fixture(scope="module")
def service(tiny):
    """`idml serve` in a child process (its own local Ray instance), stopped with SIGTERM."""
    port = free_port()
    log = tiny["root"] / "serve.log"
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--index-dir", str(tiny["index_dir"]), "--port", str(port),
           "--poll-s", "0.5", "--cpus-per-replica", "0.5", "--max-bytes", str(MAX_BYTES), "--max-images", "4"]
    env = {**env_without_ray_address(), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=tiny["root"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True,  # SIGINT at its default, as a terminal delivers Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, f"idml serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"idml serve did not answer in {STARTUP_S}s:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/health", timeout=10).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the proxy has no replica yet
                pass
            time.sleep(1)
        yield {"url": url, "proc": proc, "log": log}
    finally:
        if proc.poll() is None:
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)  # Ctrl-C (SIGTERM takes the same way out)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            print(f"idml serve stopped {time.monotonic() - sent:.1f} s after Ctrl-C")
    assert proc.returncode == 130, log.read_text()[-3000:]  # the CLI's exit status for an interrupted command
    assert "idml: stopped (Ctrl-C)" in log.read_text() and "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_app_builder_takes_serve_run_arguments(tiny, tmp_path):
    """`serve run pipelines.serve:app index_dir=DIR key=value`: Serve validates the arguments
    with the builder's ServeOptions and fails on the driver when there is nothing to serve."""
    from pydantic import ValidationError
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary as build  # what `serve run` calls

    from pipelines.serve import app

    assert isinstance(build(app, {"index_dir": str(tiny["index_dir"]), "replicas": "2"}), Application)
    with pytest.raises(ValidationError, match="replicas"):
        build(app, {"index_dir": str(tiny["index_dir"]), "replicas": "0"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        build(app, {"index_dir": str(tiny["index_dir"]), "port": "80"})
    with pytest.raises(FileNotFoundError, match="no index version is published"):
        build(app, {"index_dir": str(tmp_path)})


def test_idml_serve_refuses_bad_input_before_starting_ray(tiny, tmp_path, capsys):
    from pipelines.cli import main

    assert main(["serve", "--index-dir", str(tmp_path)]) == 2
    assert "no index version is published" in capsys.readouterr().err
    other = _other_checkpoint(tiny["checkpoint"], tmp_path / "other.pt")
    assert main(["serve", "--index-dir", str(tiny["index_dir"]), "--checkpoint", other]) == 2
    assert "is not the one index version v000001 was built with" in capsys.readouterr().err
    assert main(["serve", "--index-dir", str(tiny["index_dir"]), "--replicas", "0"]) == 2
    assert "--replicas: Input should be greater than or equal to 1" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--index-dir", str(tiny["index_dir"]), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not _ray_initialized()


def test_a_registered_model_is_accepted_as_the_checkpoint(tiny, tmp_path, monkeypatch):
    """--checkpoint models:/NAME@alias: resolved through the registry, checked against the index's
    sha256, and the replicas get the driver's tracking URI to resolve it the same way."""
    from idml.registry import log_model, set_alias
    from idml.index.serving import ServedIndex
    from idml.tracking import MlflowRun
    from pipelines.serve import ServeOptions, app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run = MlflowRun.open(uri, "serve-test", "train")
    log_model(uri, run.run_id, tiny["checkpoint"], example_images=[shape_image(1)], registered_name="tiny-serve")
    run.finish()
    set_alias("tiny-serve", "champion", 1)

    served = ServedIndex.load(tiny["index_dir"], checkpoint="models:/tiny-serve@champion")
    assert served.checkpoint != tiny["checkpoint"]  # a downloaded copy of the same file
    assert served.describe()["model"]["sha256"] == IndexStore(tiny["index_dir"]).read_manifest()["checkpoint"]["sha256"]
    options = ServeOptions(index_dir=str(tiny["index_dir"]), checkpoint="models:/tiny-serve@champion")
    assert options.checkpoint == "models:/tiny-serve@champion"  # a URI is not made a path
    actor = app(options)._bound_deployment.ray_actor_options
    assert actor["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == uri


def test_serve_refine_reaches_the_searcher_of_every_version_it_loads(tiny, tmp_path, capsys):
    """`idml serve --refine N`: parsed into ServeOptions and passed to the IndexSearcher of the
    version a replica loads first and of each one it loads later (load_served; Ray not started)."""
    from idml.index.spec import DEFAULT_REFINE
    from pipelines.cli import build_parser, main
    from pipelines.serve import load_served
    from pipelines.serve_cli import serve_options

    idx = tmp_path / "sq8"
    build_in_process(idx, tiny["dataset"], tiny["checkpoint"], index_type="SQ8")  # lossy codes: re-scored

    def options(*flags):
        return serve_options(build_parser().parse_args(["serve", "--index-dir", str(idx), *flags]))

    default = load_served(options())
    assert default.searcher.spec.refine == DEFAULT_REFINE and default.describe()["refine"] == DEFAULT_REFINE
    deeper = load_served(options("--refine", "3"), previous=default)
    assert deeper.searcher.spec.refine == 3 and deeper.searcher.index.rescores and deeper.describe()["refine"] == 3
    reloaded = load_served(options("--refine", "3"), deeper.version, deeper)  # as a replica loads a new version
    assert reloaded.searcher.spec.refine == 3 and reloaded.embedder is deeper.embedder
    off = load_served(options("--refine", "0"), previous=default)
    assert not off.searcher.index.rescores and off.describe()["refine"] == 0
    mu, u = off.lookup(["img-005"])
    assert off.search(mu, u, 3, exclude=["img-005"])[0].hits  # the codes' scores still answer
    assert main(["serve", "--index-dir", str(idx), "--refine", "-1"]) == 2
    assert "--refine: Input should be greater than or equal to 0" in capsys.readouterr().err
    assert not _ray_initialized()


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


def _search_image(url: str, image: bytes, **params) -> requests.Response:
    return requests.post(f"{url}/search", data=image, params=params, timeout=60)


def test_health_names_the_version_the_vectors_and_the_model(service, tiny):
    health = requests.get(f"{service['url']}/health", timeout=30).json()
    manifest = IndexStore(tiny["index_dir"]).read_manifest()
    assert health["status"] == "ok" and health["version"] == "v000001" and health["vectors"] == 39
    assert health["model"]["checkpoint"] == tiny["checkpoint"]
    assert health["model"]["sha256"] == manifest["checkpoint"]["sha256"]
    assert health["reload_error"] is None


def test_search_by_image_by_id_and_rerank(service):
    url = service["url"]
    res = _search_image(url, shape_image(10), k=3)  # the content of img-010
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["version"] == "v000001" and body["k"] == 3 and not body["rerank"]
    [result] = body["results"]
    assert result["uncertainty"] > 0 and len(result["hits"]) == 3
    top = result["hits"][0]
    assert top["id"] == "img-010" and top["cosine"] > 0.999 and top["uncertainty"] > 0
    cosines = [h["cosine"] for h in result["hits"]]
    assert cosines == sorted(cosines, reverse=True) and all(h["similarity"] == h["cosine"] for h in result["hits"])

    reranked = _search_image(url, shape_image(10), k=5, rerank="true").json()
    assert reranked["rerank"] and reranked["uncertainty_weight"] == 0.5
    sims = [h["similarity"] for h in reranked["results"][0]["hits"]]
    assert sims == sorted(sims, reverse=True)
    assert any(h["similarity"] != h["cosine"] for h in reranked["results"][0]["hits"])  # the introspective score

    several = requests.post(f"{url}/search", params={"k": 2}, timeout=60,
                            json={"images": [base64.b64encode(shape_image(s)).decode() for s in (10, 20)]}).json()
    assert [r["hits"][0]["id"] for r in several["results"]] == ["img-010", "img-020"]

    by_id = requests.get(f"{url}/search/id/img-000", params={"k": 4}, timeout=60).json()
    [result] = by_id["results"]
    assert result["query"] == "img-000" and len(result["hits"]) == 4
    assert "img-000" not in [h["id"] for h in result["hits"]]  # left out of its own results


def test_bad_requests_get_a_4xx_and_the_replica_keeps_answering(service):
    url = service["url"]
    image = shape_image(10)

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(MAX_BYTES // 1000 + 2):
            yield b"x" * 1000

    cases = {
        "not an image": (_search_image(url, b"hello, I am text"), 400, "not a usable image"),
        "empty body": (_search_image(url, b""), 400, "empty body"),
        "truncated image": (_search_image(url, image[:40]), 400, "not a usable image"),
        "too large": (_search_image(url, b"x" * (MAX_BYTES + 1)), 413, "over the limit"),
        "too large, chunked": (requests.post(f"{url}/search", data=chunks(), timeout=60), 413, "over the limit"),
        "k = 0": (_search_image(url, image, k=0), 400, "k must be between 1 and 100"),
        "k too large": (_search_image(url, image, k=101), 400, "k must be between 1 and 100"),
        "k not a number": (_search_image(url, image, k="many"), 422, "valid integer"),
        "unknown id": (requests.get(f"{url}/search/id/no-such-image", timeout=60), 404, "not in index version"),
        "bad JSON": (requests.post(f"{url}/search", data=b"{not json", headers={"Content-Type": "application/json"},
                                   timeout=60), 400, "not valid JSON"),
        # 40,000 levels fit the body limit; Python's parser gives up after about 1,000 (was a 500 RecursionError).
        "nested JSON": (requests.post(f"{url}/search", data=b"[" * 40_000 + b"]" * 40_000,
                                      headers={"Content-Type": "application/json"}, timeout=60), 400, "nested too deeply"),
        "JSON without images": (requests.post(f"{url}/search", json={"image": "x"}, timeout=60), 400, "images"),
        "bad base64": (requests.post(f"{url}/search", json={"images": ["@@@"]}, timeout=60), 400, "base64"),
        "too many images": (requests.post(f"{url}/search", json={"images": ["aGk="] * 5}, timeout=60), 413, "at most 4"),
        "unknown path": (requests.get(f"{url}/nothing", timeout=60), 404, ""),
        # this index's model carries no confidence (made without a validation split)
        "min_confidence without a confidence": (_search_image(url, image, min_confidence=0.5), 400, "no confidence"),
        "min_confidence not a probability": (requests.get(f"{url}/search/id/img-010", params={"min_confidence": 2},
                                                          timeout=60), 400, "probability in [0, 1]"),
    }
    for name, (res, status, message) in cases.items():
        assert res.status_code == status, f"{name}: {res.status_code} {res.text}"
        assert message in str(res.json()["detail"]), f"{name}: {res.text}"
    assert requests.get(f"{url}/health", timeout=30).status_code == 200
    assert _search_image(url, image, k=1).json()["results"][0]["hits"][0]["id"] == "img-010"


class _RequestLoop:
    """Requests by image and by id in a loop on two threads; records the versions that answered
    and every failure."""

    def __init__(self, url: str):
        self.url, self.stop = url, threading.Event()
        self.versions: list[str] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(by_id,)) for by_id in (False, True)]

    def _run(self, by_id: bool) -> None:
        session = requests.Session()
        image = shape_image(10)
        while not self.stop.is_set():
            try:
                res = (session.get(f"{self.url}/search/id/img-010", params={"k": 3}, timeout=60) if by_id
                       else session.post(f"{self.url}/search", data=image, params={"k": 3, "rerank": "true"}, timeout=60))
                if res.status_code != 200:
                    self.failures.append(f"{res.status_code} {res.text}")
                else:
                    self.versions.append(res.json()["version"])
            except requests.RequestException as e:
                self.failures.append(repr(e))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def _wait_for_version(url: str, version: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = requests.get(f"{url}/health", timeout=30).json()
        if health["version"] == version:
            return health
        assert time.monotonic() < deadline, f"still serving {health['version']}, not {version}: {health}"
        time.sleep(0.2)


def _other_checkpoint(checkpoint: str, path: Path) -> str:
    """Another model of the same architecture: the semantic head's weights perturbed."""
    state = load_checkpoint(checkpoint)
    weight = state["model"]["semantic_head.weight"]
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * weight.std()
    state["model"]["semantic_head.weight"] = weight + noise
    save_checkpoint(path, state)
    return str(path)


def test_new_versions_are_served_without_a_failed_request(service, tiny):
    """Last in this module: it changes the served index."""
    url = service["url"]
    make_index_dataset(Path(tiny["dataset"]), 40, corrupt=(3,), extra=4)  # img-040..043 added
    with _RequestLoop(url) as loop:
        time.sleep(1)
        manifest = build_in_process(tiny["index_dir"], tiny["dataset"], tiny["checkpoint"], kind="update")
        assert manifest["version"] == "v000002"
        health = _wait_for_version(url, "v000002")
        time.sleep(1)
    assert not loop.failures, loop.failures[:5]
    assert {"v000001", "v000002"} <= set(loop.versions), set(loop.versions)
    assert health["vectors"] == 43 and health["reload_error"] is None
    assert requests.get(f"{url}/search/id/img-041", timeout=60).status_code == 200

    # A version built with another model: the replica loads that model with it.
    other = _other_checkpoint(tiny["checkpoint"], tiny["root"] / "other.pt")
    with _RequestLoop(url) as loop:
        manifest = build_in_process(tiny["index_dir"], tiny["dataset"], other, kind="build")
        health = _wait_for_version(url, manifest["version"])
        time.sleep(1)
    assert not loop.failures, loop.failures[:5]
    assert health["model"]["checkpoint"] == other and health["model"]["sha256"] == manifest["checkpoint"]["sha256"]
    top = _search_image(url, shape_image(10), k=1).json()["results"][0]["hits"][0]
    assert top["id"] == "img-010" and top["cosine"] > 0.999  # the query is embedded with the new model too
