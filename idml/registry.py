"""Trained models in MLflow: a training run logs its best checkpoint as an MLflow model (the
pyfunc of ``idml.pyfunc``, with signature, input example and the checkpoint as its artifact),
optionally registered under a name; and every command that takes a checkpoint resolves what it
is given here: a local path, a path on shared storage (any pyarrow/fsspec URI such as s3://),
or an MLflow model URI (``models:/NAME@alias``, ``models:/NAME/3``, ``runs:/<run id>/model``).
mlflow is imported only when a model URI is used."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import InputError
from .tracking import tracking_uri

if TYPE_CHECKING:
    from .data.source import DatasetSource

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the model's name within its run: runs:/<run id>/model
MODEL_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def is_model_uri(ref: str) -> bool:
    return str(ref).startswith(MODEL_URI_SCHEMES)


def _is_remote(ref: str) -> bool:
    return "://" in str(ref) and not str(ref).startswith("file://")


def log_model(uri: str, run_id: str, checkpoint: str | Path, *, example_images: Sequence[bytes],
              registered_name: str | None = None) -> dict[str, Any]:
    """Log ``checkpoint`` into MLflow run ``run_id`` as the model ``runs:/<run id>/model`` and,
    with ``registered_name``, register it as the next version of that name. Returns the model
    URI, and the registered name and version when registered."""
    import mlflow
    from mlflow.models import infer_signature

    from .inference import Embedder
    from .pyfunc import CHECKPOINT_ARTIFACT, IMAGE_COLUMN, IDMLPyfunc, predictions_frame

    import pandas as pd

    example = pd.DataFrame({IMAGE_COLUMN: [bytes(b) for b in example_images]})
    mu, sigma = Embedder(str(checkpoint)).embed_images(list(example[IMAGE_COLUMN]))
    signature = infer_signature(example, predictions_frame(mu, sigma))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=IDMLPyfunc(), artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            signature=signature, input_example=example,
            # Named, not inferred: inferring loads the model in a subprocess, and the package
            # that defines the pyfunc is this one.
            pip_requirements=[f"idml=={_version()}"] if _version() else ["idml"],
            registered_model_name=registered_name)
    out = {"model_uri": f"runs:/{run_id}/{MODEL_NAME}", "logged_model_uri": info.model_uri}
    if registered_name:
        out.update(registered_model=registered_name, version=str(info.registered_model_version))
    return out


def log_run_model(run, cfg, checkpoint: str | Path, source: DatasetSource, *,
                  registered_name: str | None = None) -> dict[str, Any]:
    """What every training run (local and Ray) does at its end: ``log_model`` into the open
    ``MlflowRun`` with two images of the test split of ``source`` (the dataset it trained on) as
    the input example, and tag the run with the model."""
    model = log_model(run.uri, run.run_id, checkpoint, registered_name=registered_name,
                      example_images=source.sample_images(cfg.data.test_split))
    run.client.set_tag(run.run_id, "idml.model_uri", model["model_uri"])
    if "version" in model:
        run.client.set_tag(run.run_id, "idml.registered_model", f"{model['registered_model']}/{model['version']}")
    return model


def register(model_uri: str, name: str, *, uri: str | None = None) -> str:
    """Register a logged model (``runs:/<run id>/model``) as the next version of ``name``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri or tracking_uri())
    try:
        return str(mlflow.register_model(model_uri, name).version)
    except MlflowException as e:
        raise InputError(f"cannot register {model_uri} as {name!r}: {_first_line(e)}") from e


def set_alias(name: str, alias: str, version: str | int, *, uri: str | None = None) -> None:
    """Point ``models:/NAME@alias`` at ``version`` (moving it if it pointed elsewhere)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or tracking_uri())
    try:
        client.get_model_version(name, str(version))
    except MlflowException as e:
        raise InputError(f"no version {version} of registered model {name!r} ({_first_line(e)})") from e
    client.set_registered_model_alias(name, alias, str(version))


def list_versions(name: str, *, uri: str | None = None) -> list[dict[str, Any]]:
    """Every version of registered model ``name``: version, aliases, source run, creation time."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or tracking_uri())
    try:
        aliases: dict[str, list[str]] = {}
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        versions = client.search_model_versions(f"name = '{_quote(name)}'")
    except MlflowException as e:
        raise InputError(f"no registered model {name!r} at {client.tracking_uri} ({_first_line(e)})") from e
    return sorted(({"version": v.version, "aliases": sorted(aliases.get(str(v.version), [])), "run_id": v.run_id,
                    "created": v.creation_timestamp} for v in versions), key=lambda v: int(v["version"]))


def describe_model(ref: str, *, uri: str | None = None) -> dict[str, Any]:
    """Where a model came from, for an index manifest or a service's health page: the URI it was
    given as and, for MLflow URIs, the registered name, version and the training run."""
    if not is_model_uri(ref):
        return {"model_uri": str(ref)}
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri or tracking_uri())
    out: dict[str, Any] = {"model_uri": ref}
    body = ref.split(":/", 1)[1].strip("/")
    try:
        if ref.startswith("models:/") and "@" in body:
            name, alias = body.split("@", 1)
            v = client.get_model_version_by_alias(name, alias)
            out.update(registered_model=name, alias=alias, version=str(v.version), run_id=v.run_id)
        elif ref.startswith("models:/") and "/" in body and body.rsplit("/", 1)[1].isdigit():
            name, version = body.rsplit("/", 1)
            v = client.get_model_version(name, version)
            out.update(registered_model=name, version=str(v.version), run_id=v.run_id)
        elif ref.startswith("runs:/"):
            out["run_id"] = body.split("/", 1)[0]
    except MlflowException as e:
        raise InputError(f"model {ref} not found at {client.tracking_uri} ({_first_line(e)})") from e
    return out


def resolve_checkpoint(ref: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """A local file holding the checkpoint ``ref`` names: the path itself, or a copy downloaded
    from MLflow or shared storage into ``cache_dir`` (default: a new temporary folder)."""
    ref = str(ref)
    if is_model_uri(ref):
        return _download_model(ref, cache_dir)
    if _is_remote(ref):
        return _copy_from_storage(ref, cache_dir)
    # A local path as it is: idml.checkpoint.load_checkpoint says what is wrong with it (missing,
    # a folder and which file inside to pass, damaged).
    return Path(ref[len("file://"):] if ref.startswith("file://") else ref)


def _download_model(ref: str, cache_dir) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    from .pyfunc import CHECKPOINT_ARTIFACT

    mlflow.set_tracking_uri(tracking_uri())
    dst = _fresh_dir(cache_dir, ref)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dst)))
    except MlflowException as e:
        shutil.rmtree(dst, ignore_errors=True)
        raise InputError(f"cannot load model {ref} from MLflow at {mlflow.get_tracking_uri()}: {_first_line(e)}") from e
    found = sorted((local / "artifacts").glob("*.pt")) if (local / "artifacts").is_dir() else []
    if not found:
        raise InputError(f"model {ref} holds no idml checkpoint (artifacts/{CHECKPOINT_ARTIFACT}: *.pt); "
                         "was it logged by idml train?")
    return found[0]


def _copy_from_storage(ref: str, cache_dir) -> Path:
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, inner = pafs.FileSystem.from_uri(ref)
        info = fs.get_file_info(inner)
    except (pa.ArrowInvalid, OSError) as e:  # unknown scheme, no credentials, unreachable
        raise InputError(f"cannot open checkpoint {ref}: {e}") from e
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"checkpoint {ref} does not exist or is not a file")
    dst = _fresh_dir(cache_dir, ref) / Path(inner).name
    with fs.open_input_stream(inner) as src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out, length=1 << 22)
    return dst


def _fresh_dir(cache_dir, ref: str) -> Path:
    if cache_dir is None:
        return Path(tempfile.mkdtemp(prefix="idml-model-"))
    dst = Path(cache_dir) / hashlib.sha256(ref.encode()).hexdigest()[:16] / str(os.getpid())
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    return dst


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("idml")
    except PackageNotFoundError:
        return None
