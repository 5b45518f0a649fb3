"""Checkpoints are plain dicts of tensors and builtins, so ``torch.load(weights_only=True)`` reads
them without unpickling code. ``last.pt`` is the resume point (model, criterion, optimizer,
scheduler, epoch, config, history, best); ``best.pt`` is the same without optimizer and
scheduler (for evaluation and indexing, never resumed)."""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from .config import Config, config_from_dict
from .errors import DamagedFileError, InputError
from .model import IDMLModel, model_from_config

REQUIRED_KEYS = ("model", "config", "epoch")

# Config keys a resumed run may change: they change speed or what evaluation reports, never
# what the model learns. ``train.epochs`` may change too, but not below the epochs already done.
RESUMABLE_CHANGES = ("output_dir", "data.workers", "train.threads", "train.channels_last", "train.test_every",
                     "eval.recall_ks", "eval.batch_size", "eval.nmi", "eval.cross_domain")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or a full disk mid-write: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path``; ``DamagedFileError`` (empty, truncated, not a torch file) or
    ``InputError`` (a folder, a torch file that is not an idml checkpoint) name the file."""
    path = Path(path)
    if path.is_dir():
        inside = [name for name in ("best.pt", "last.pt") if (path / name).is_file()]
        hint = f"; pass {path / inside[0]}" if inside else ""
        raise InputError(f"checkpoint {path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise DamagedFileError(f"checkpoint {path} is empty (0 bytes): an interrupted copy or write? "
                               "Use another checkpoint or train again")
    _check_archive(path)
    try:
        with warnings.catch_warnings():  # e.g. a raw pickle's protocol warning: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises EOFError, KeyError, RuntimeError or UnpicklingError for bad bytes
        raise DamagedFileError(_unreadable(path, err)) from err
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise InputError(f"checkpoint {path} is a torch file but not an idml checkpoint (no {', '.join(missing)}); "
                         "pass a best.pt or last.pt written by idml train")
    return state


def _check_archive(path: Path) -> None:
    """A checkpoint's checksums: ``torch.save`` writes a zip archive with a CRC-32 of every member
    (the weights among them), which ``torch.load`` does not check. Every member is read and
    checked here, so bytes damaged anywhere in the data are refused instead of evaluated. A file
    that is not a zip archive at all is left to ``torch.load`` (its error says what it is)."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as err:
        raise DamagedFileError(f"checkpoint {path} is damaged (its archive does not read: {_first_line(err)}); "
                               "use another checkpoint or train again") from err
    if bad is not None:
        raise DamagedFileError(f"checkpoint {path} is damaged ({bad.split('/', 1)[-1]} fails its CRC-32 checksum: "
                               "bytes changed after it was written); use another checkpoint or train again")


def _first_line(err: BaseException) -> str:
    return (str(err).strip() or type(err).__name__).splitlines()[0]


def _unreadable(path: Path, err: Exception) -> str:
    """Why torch could not read ``path``, in the user's terms."""
    if zipfile.is_zipfile(path):
        if "weights only" in str(err).lower():
            return (f"checkpoint {path} holds Python objects an idml checkpoint never has; refusing to unpickle "
                    "them (it was not written by idml train)")
        return f"checkpoint {path} is damaged (a torch archive whose content cannot be read: {type(err).__name__})"
    with open(path, "rb") as f:
        start = f.read(4)
    if start.startswith(b"PK"):
        return (f"checkpoint {path} is truncated ({path.stat().st_size} bytes, the end of the torch archive is "
                "missing): an interrupted copy or write? Use another checkpoint or train again")
    return (f"checkpoint {path} is not a torch checkpoint file (unreadable bytes: {type(err).__name__}); "
            "pass a best.pt or last.pt written by idml train")


def checkpoint_config(state: dict[str, Any]) -> Config:
    data = state["config"]
    if "uncertainty_norm" not in data.get("model", {}):
        # Written before model.uncertainty_norm existed: those models used the raw head output.
        data = {**data, "model": {**data["model"], "uncertainty_norm": "none"}}
    return config_from_dict(data)


def model_from_checkpoint(path_or_state: str | Path | dict[str, Any], *, path: str | Path | None = None
                          ) -> tuple[IDMLModel, Config]:
    """Rebuild the model a checkpoint was trained with and load its weights (eval mode).
    ``path``: the file a loaded checkpoint dict came from, named in errors."""
    state = path_or_state if isinstance(path_or_state, dict) else load_checkpoint(path_or_state)
    cfg = checkpoint_config(state)
    # The checkpoint holds every weight, so skip fetching pretrained ones.
    model = model_from_config(cfg.model, pretrained=False)
    name = f" {path}" if path is not None else "" if isinstance(path_or_state, dict) else f" {path_or_state}"
    mismatch = (f"checkpoint{name} does not match its own config ({cfg.model.backbone}, "
                f"embedding_dim {cfg.model.embedding_dim})")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise DamagedFileError(f"checkpoint{name} holds no model weights (its 'model' is not a dict of tensors)")
    expected = model.state_dict()
    wrong = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise DamagedFileError(f"{mismatch}: {len(wrong)} weight(s) of another shape, e.g. {k} "
                               f"{tuple(weights[k].shape)} where the model has {tuple(expected[k].shape)}: a "
                               "checkpoint of another backbone or embedding size?")
    # strict=False only for the one buffer older checkpoints lack; anything else must match.
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"uncertainty_norm.running_uncertainty"}:
        raise DamagedFileError(f"{mismatch}: missing {_few(missing)}, unexpected {_few(unexpected)}")
    return model.eval(), cfg


def _few(keys: list[str], limit: int = 5) -> str:
    return "[" + ", ".join(keys[:limit]) + (f", ... {len(keys) - limit} more" if len(keys) > limit else "") + "]"


def config_changes(stored: Config, new: Config, *, epochs_done: int) -> list[str]:
    """The differences that make ``new`` another run than the one ``stored`` describes, as
    ``key: old -> new`` lines; empty when ``new`` may resume it (see ``RESUMABLE_CHANGES``)."""
    old_flat, new_flat = stored.flat(), new.flat()
    changes = []
    for key in sorted(set(old_flat) | set(new_flat)):
        old, value = old_flat.get(key), new_flat.get(key)
        if old == value or key in RESUMABLE_CHANGES:
            continue
        if key == "train.epochs" and value >= epochs_done:
            continue
        if key == "train.epochs":
            changes.append(f"train.epochs: {old} -> {value} (but {epochs_done} epochs are done)")
        else:
            changes.append(f"{key}: {old!r} -> {value!r}")
    return changes


def resume_checkpoint(path: str | Path, cfg: Config, *, start_over: str) -> dict[str, Any]:
    """The checkpoint at ``path`` if ``cfg`` may resume it; else ``InputError`` listing what
    differs, or why the file cannot be read. ``start_over`` says how to train ``cfg`` instead."""
    try:
        state = load_checkpoint(path)
    except InputError as err:
        raise type(err)(f"cannot resume: {err}. Nothing was changed; {start_over}") from err
    changes = config_changes(checkpoint_config(state), cfg, epochs_done=state["epoch"] + 1)
    if changes:
        raise InputError(f"{path} holds a run with another config; resuming it would train nothing or mix two "
                         f"runs. Nothing was changed; {start_over}. Differences (checkpoint -> now):\n  "
                         + "\n  ".join(changes))
    try:
        model_from_checkpoint({**state, "config": cfg.to_dict()})  # weights of the shapes this config trains
    except InputError as err:
        raise type(err)(f"cannot resume: {path}: {err}. Nothing was changed; {start_over}") from err
    return state


def describe_last_checkpoint(path: str | Path, *, since: float | None = None) -> str:
    """Where a run stands, for a user who stopped it: ``path``'s epoch, or that there is none
    (a file older than ``since``, a Unix time, belongs to an earlier run)."""
    path = Path(path)
    if not path.is_file() or (since is not None and path.stat().st_mtime < since):
        return f"no checkpoint was written yet (the first epoch had not finished; {path} is absent)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        epochs = f" (epoch {state['epoch'] + 1} of {state['config']['train']['epochs']} done)"
    except Exception:  # the message must come even if the file cannot be read
        epochs = ""
    return f"the last checkpoint is {path}{epochs}; the same command without --no-resume resumes from it"
