"""MLflow, the same way for every job (training on Ray, index builds): one tracking URI rule,
metric-name sanitising, runs found or created by name (so a resumed job appends to its run), and
batched, idempotent logging (``MlflowRun``). mlflow is imported only when a run is opened."""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

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


def check_tracking_store(uri: str, *, hint: str = "") -> None:
    """Refuse an MLflow store that cannot be opened before any work starts (MLflow itself finds
    out only when the run is opened, after retrying for minutes). Checked: a SQLite store's file is
    a SQLite database (or absent, with a folder where it can be created). Servers (http://...) are
    left to MLflow. ``hint`` is added to the message (e.g. ``, or pass --no-mlflow``)."""
    if not uri.startswith("sqlite:"):
        return
    path = _sqlite_path(uri)
    if path is None:  # in memory
        return
    problem = _sqlite_problem(Path(path))
    if problem:
        from .errors import InputError

        raise InputError(f"MLflow tracking store {uri} cannot be opened: {problem}; set MLFLOW_TRACKING_URI to "
                         f"sqlite:///<writable folder>/mlflow.db or an MLflow server{hint}")


def _sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite://`` URI (SQLAlchemy's form: ``sqlite:///relative``,
    ``sqlite:////absolute``); None for an in-memory database."""
    rest = uri[len("sqlite:"):]
    if not rest.startswith("//"):
        return rest or None
    rest = rest[2:]
    rest = rest[1:] if rest.startswith("/") else rest  # the host part is empty
    path = rest.split("?", 1)[0]
    return None if path in ("", ":memory:") else path


def _sqlite_problem(path: Path) -> str | None:
    import sqlite3

    if path.exists():
        if path.is_dir():
            return f"{path} is a folder"
        try:
            with open(path, "rb") as f:
                header = f.read(16)
        except OSError as e:
            return f"{path} cannot be read ({e.strerror or e})"
        if header and header != b"SQLite format 3\0":
            return f"{path} is not a SQLite database"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable"
        try:
            connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                connection.execute("select count(*) from sqlite_master").fetchone()
            finally:
                connection.close()
        except sqlite3.DatabaseError as e:
            return f"{path} is not a usable SQLite database ({e})"
        return None
    if not path.parent.is_dir():
        try:  # what MLflow does when it opens the store (mlflow.store.db.utils)
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"its folder {path.parent} cannot be created ({e.strerror or e})"
    try:  # what SQLite will do: create a file there (a name of our own: the store's file may be
        # created by another process meanwhile, and must never be touched by this check)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".idml-store-check-"):
            pass
    except OSError as e:
        return f"{path} cannot be created ({e.strerror or e})"
    return None


def source_tags(entrypoint: str, *, job: bool = True) -> dict[str, str]:
    """MLflow's own source tags: what ran (``mlflow.source.name``), and the git commit of this
    code when it runs from a checkout, so a model leads back to the code that trained it."""
    import getpass
    import subprocess

    tags = {"mlflow.source.name": entrypoint, "mlflow.source.type": "JOB" if job else "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return tags
    if commit.returncode == 0:
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
    return tags


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
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        experiment_name, artifact_location=_artifact_location(client.tracking_uri))
    found = _runs_named(client, experiment_id, run_name)
    if len(found) > 1:
        raise RuntimeError(f"several MLflow runs are named {run_name!r} in {experiment_name!r}; refusing to guess")
    if found:
        return found[0].info.run_id
    return client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {})).info.run_id


def _runs_named(client, experiment_id: str, run_name: str) -> list:
    """The runs called exactly ``run_name``. MLflow's filter strings cannot escape a quote (a
    value is whatever lies between its outer quotes), so the filter carries the name with every
    character but letters, digits, ``-`` and ``.`` as LIKE's one-character wildcard ``_``, and the
    names are compared here."""
    pattern = re.sub(r"[^A-Za-z0-9.\-]", "_", run_name)
    found, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.runName` LIKE '{pattern}'",
                                  max_results=1000, page_token=token)
        found += [run for run in page if run.info.run_name == run_name]
        token = page.token
        if not token:
            return found


def _artifact_location(uri: str) -> str | None:
    """With the default SQLite store, artifacts go next to the database (else the server decides)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None


class MlflowRun:
    """Logging into one MLflow run: params once (MLflow params are immutable), metrics and
    artifacts in batches under MLflow's per-call limits."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient  # slow to import: only when a run is used

        self.client = MlflowClient(uri)
        self.uri, self.run_id = uri, run_id

    @classmethod
    def open(cls, uri: str, experiment: str, run_name: str, *, tags: Mapping[str, str] | None = None) -> "MlflowRun":
        """The run called ``run_name`` in ``experiment`` (both created on first use), marked running."""
        from mlflow.tracking import MlflowClient

        run_id = get_or_create_run(MlflowClient(uri), experiment, run_name, tags=tags)
        run = cls(uri, run_id)
        if run.client.get_run(run_id).info.status != "RUNNING":
            run.client.update_run(run_id, status="RUNNING")
        return run

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        params = clean_params(params)
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:  # a resume with another config keeps the first values
            log.warning("resumed with changed params %s; MLflow keeps the original values", changed)
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in clean_metrics(metrics).items()]
        for start in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 500])

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, metric_name(key))}

    def log_artifact(self, path: str | Path | None, folder: str | None = None) -> None:
        if path is not None and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def fail(self, status: str = "FAILED") -> None:
        """Mark the run failed (``KILLED``: stopped by Ctrl-C), never raising: the error that failed
        it matters more. Only the status: a subclass's ``finish`` may log what a finished run has."""
        try:
            MlflowRun.finish(self, status)
        except Exception:
            log.exception("could not mark MLflow run %s as %s", self.run_id, status)
