"""One MLflow run per build/update: params (checkpoint, corpus, index spec), metrics, manifest.

The run is named after the build key, so the rerun of an interrupted build continues the run
the interrupted one started instead of adding a second one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from idml.tracking import MlflowRun, tracking_uri


class IndexRun(MlflowRun):
    @classmethod
    def start(cls, experiment: str, run_name: str, params: Mapping[str, Any], *, uri: str | None = None) -> "IndexRun":
        run = cls.open(uri or tracking_uri(), experiment, run_name, tags={"idml.job": "index"})
        run.log_params(params)  # a rerun logs the same params again: only new ones are sent
        return run

    def finish(self, metrics: Mapping[str, Any] | None = None, manifest_path: Path | None = None,  # type: ignore[override]
               status: str = "FINISHED") -> None:
        self.log_metrics(metrics or {})
        self.log_artifact(manifest_path, "index")
        super().finish(status)


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
    for key in ("index_type", "max_index_bytes", "max_query_ms", "nlist", "nprobe", "shards", "recall_sample",
                "target_recall", "refine"):
        if key in m:
            params[f"index.{key}"] = "auto" if m[key] is None else m[key]
    return params
