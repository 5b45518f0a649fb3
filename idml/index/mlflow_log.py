"""One MLflow run per build/update: params (checkpoint, corpus, index spec), metrics, manifest.

The run is named after the build key, so the rerun of an interrupted build continues the run
the interrupted one started instead of adding a second one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from idml.tracking import clean_metrics, clean_params, get_or_create_run, tracking_uri


class IndexRun:
    def __init__(self, experiment: str, run_name: str, params: Mapping[str, Any], *, uri: str | None = None):
        from mlflow import MlflowClient  # imported here: mlflow is slow to import

        self.client = MlflowClient(uri or tracking_uri())
        self.run_id = get_or_create_run(self.client, experiment, run_name, tags={"idml.job": "index"})
        self.client.update_run(self.run_id, status="RUNNING")
        logged = self.client.get_run(self.run_id).data.params
        # A rerun logs the same params; MLflow rejects re-logging a param with another value.
        new = {k: v for k, v in clean_params(params).items() if k not in logged}
        self._log(params=new)

    def _log(self, params: Mapping[str, str] | None = None, metrics: Mapping[str, float] | None = None) -> None:
        from mlflow.entities import Metric, Param

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, 0) for k, v in (metrics or {}).items()],
                              params=[Param(k, v) for k, v in (params or {}).items()])

    def finish(self, metrics: Mapping[str, Any], manifest_path: Path | None = None) -> None:
        self._log(metrics=clean_metrics(metrics))
        if manifest_path is not None:
            self.client.log_artifact(self.run_id, str(manifest_path), artifact_path="index")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")


def index_params(manifest_or_request: Mapping[str, Any]) -> dict[str, Any]:
    """Flat MLflow params from a manifest (or the same fields of a request)."""
    m = manifest_or_request
    ckpt, corpus = m["checkpoint"], m["corpus"]
    params = {
        "kind": m["kind"],
        "checkpoint": ckpt["path"],
        "checkpoint_sha256": ckpt["sha256"],
        "corpus": corpus["uri"],
        "corpus_kind": corpus["kind"],
        "splits": ",".join(corpus.get("splits") or []) or "-",
    }
    for key in ("index_type", "nlist", "nprobe", "shards", "recall_sample", "target_recall"):
        if key in m:
            params[f"index.{key}"] = "auto" if m[key] is None else m[key]
    return params
