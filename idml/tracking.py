"""MLflow helpers: one tracking URI rule, metric-name sanitising, find-or-create runs by name."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

DEFAULT_DB = "mlflow.db"
_BAD_CHARS = re.compile(r"[^\w\-. /:]")


def tracking_uri(project_dir: str | Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project_dir>/mlflow.db`` (MLflow >= 3.13
    refuses the plain file store, so SQLite is the local default)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    base = Path(project_dir) if project_dir is not None else Path.cwd()
    return f"sqlite:///{(base / DEFAULT_DB).resolve()}"


def metric_name(name: str) -> str:
    """MLflow accepts only [\\w-. /:] in names: ``recall@1`` -> ``recall_at_1``."""
    return _BAD_CHARS.sub("_", name.replace("@", "_at_"))


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Finite numeric values only, with MLflow-safe names (NaN would poison charts)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[metric_name(key)] = float(value)
    return out


def clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    # MLflow params are strings of at most 6000 characters.
    return {metric_name(k): str(v)[:6000] for k, v in params.items()}


def get_or_create_run(client, experiment_name: str, run_name: str, *, tags: Mapping[str, str] | None = None) -> str:
    """The id of the run called ``run_name`` in ``experiment_name``, created if absent, so a
    resumed job appends to its run instead of making a duplicate."""
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    found = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.runName` = '{run_name}'", max_results=2)
    if len(found) > 1:
        raise RuntimeError(f"several MLflow runs are named {run_name!r} in {experiment_name!r}; refusing to guess")
    if found:
        return found[0].info.run_id
    return client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {})).info.run_id
