"""Search spaces for ``idml tune``: the YAML file, its validation and the trial list.

The driver samples every trial's parameters itself (seeded), so a search is one fixed list of
trials: resuming it by name runs exactly the same trials, and each trial's config is built and
validated before Ray starts anything. Tune runs the list (``grid_search`` over it) and ASHA
stops the weak ones early.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from idml.config import Config, ConfigError, config_from_dict, load_config, parse_overrides, validate_config

KINDS = ("uniform", "loguniform", "choice", "grid")
SPACE_KEYS = ("base_config", "fixed", "space", "trials", "objective", "mode", "scheduler", "concurrency", "seed",
              "resources")
SCHEDULER_KEYS = ("name", "grace_period", "reduction_factor")
RESOURCE_KEYS = ("num_workers", "cpus_per_worker", "decode_cpus", "use_gpu")
LAMBDA = "loss.uncertainty_weight"


class SpaceError(ValueError):
    pass


@dataclass
class Space:
    """A validated search space; ``trials`` are the parameter sets, the lambda = 0 one first."""

    path: Path
    base: Config
    params: dict[str, dict[str, Any]]
    trials: list[dict[str, Any]]
    objective: str = "val/map@r"
    mode: str = "max"
    scheduler: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 1
    resources: dict[str, Any] = field(default_factory=dict)

    def trial_config(self, params: dict[str, Any]) -> Config:
        return with_params(self.base, params)


def load_space(path: str | Path, config: str | Path | None = None, overrides: list[str] | None = None) -> Space:
    """Read and check a space file: every problem is reported here, before Ray starts.
    ``config`` replaces the file's ``base_config``; ``overrides`` apply after its ``fixed``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"space file {path} does not exist (see tune_spaces/)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: the top level must be a mapping")
    _no_unknown(raw, SPACE_KEYS, f"{path}")
    base_path = config or (_relative(path, raw["base_config"]) if raw.get("base_config") else None)
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise SpaceError(f"{path}: 'fixed' must map config keys to values, got {fixed!r}")
    base = load_config(base_path, {**fixed, **parse_overrides(overrides or [])})
    params = raw.get("space") or {}
    if not isinstance(params, dict) or not params:
        raise SpaceError(f"{path}: 'space' must map config keys to distributions, e.g. "
                         f"{LAMBDA}: {{loguniform: [0.01, 1.0]}}")
    known = base.flat()
    for key, spec in params.items():
        if key not in known:
            raise SpaceError(f"{path}: space key {key!r} is not a config key; valid keys: {', '.join(known)}")
        _check_spec(path, key, spec)
    trials = sample_trials(params, _positive_int(path, raw, "trials", 4), int(raw.get("seed", 0)))
    space = Space(path, base, params, trials, objective=str(raw.get("objective", "val/map@r")),
                  scheduler=_scheduler(path, raw.get("scheduler") or {}),
                  concurrency=_positive_int(path, raw, "concurrency", 1),
                  resources=_resources(path, raw.get("resources") or {}))
    # Losses and risk (AURC: the error rate averaged over coverages) are minimised, the rest maximised.
    space.mode = raw.get("mode") or ("min" if space.objective.endswith("loss") or "/aurc_" in space.objective else "max")
    if space.mode not in ("min", "max"):
        raise SpaceError(f"{path}: mode must be min or max, got {space.mode!r}")
    for params_ in trials:
        _check_trial(path, space, params_)
    return space


def with_params(base: Config, params: dict[str, Any]) -> Config:
    """``base`` with dotted ``params`` set (types checked as in a YAML file)."""
    data = base.to_dict()
    for dotted, value in params.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config_from_dict(data)


def sample_trials(params: dict[str, dict], n: int, seed: int) -> list[dict[str, Any]]:
    """The lambda = 0 trial (the plain base loss, base values elsewhere), then ``n`` samples of
    the random keys for every point of the grid keys."""
    rng = random.Random(seed)
    grid = {k: s["grid"] for k, s in params.items() if "grid" in s}
    trials: list[dict[str, Any]] = [{LAMBDA: 0.0}]
    for point in itertools.product(*grid.values()):
        for _ in range(n):
            sampled = dict(zip(grid, point))
            for key, spec in params.items():
                if "uniform" in spec:
                    sampled[key] = rng.uniform(*spec["uniform"])
                elif "loguniform" in spec:
                    low, high = spec["loguniform"]
                    sampled[key] = math.exp(rng.uniform(math.log(low), math.log(high)))
                elif "choice" in spec:
                    sampled[key] = rng.choice(spec["choice"])
            trials.append(sampled)
    return trials


def objectives(cfg: Config) -> list[str]:
    """The metrics every trial reports each epoch (validation is on every epoch in a search)."""
    val = [f"recall@{k}" for k in cfg.eval.recall_ks] + ["map@r", "r_precision"] + (["nmi"] if cfg.eval.nmi else [])
    val += [f"{measure}_{signal}" for measure in ("aurc", "r_auroc") for signal in ("uncertainty", "top1_gap")]
    return [f"val/{m}" for m in val] + ["train/loss"]


def _check_spec(path: Path, key: str, spec: Any) -> None:
    where = f"{path}: space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise SpaceError(f"{where} must be one of {{uniform|loguniform: [low, high]}}, {{choice|grid: [values]}}; "
                         f"got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise SpaceError(f"{where}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform"):
        numbers = [float(v) if isinstance(v, str) and _is_float(v) else v for v in values]
        if len(numbers) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers):
            raise SpaceError(f"{where}: {kind} needs [low, high] numbers, got {values!r}")
        if not numbers[0] < numbers[1]:
            raise SpaceError(f"{where}: empty range {values!r} (low must be < high; use choice for one value)")
        if kind == "loguniform" and numbers[0] <= 0:
            raise SpaceError(f"{where}: loguniform needs low > 0, got {values!r}")
        spec[kind] = [float(v) for v in numbers]


def _check_trial(path: Path, space: Space, params: dict[str, Any]) -> None:
    try:
        cfg = space.trial_config(params)
        validate_config(cfg)
    except (ConfigError, ValueError) as err:
        raise SpaceError(f"{path}: a trial with {params} is invalid: {err}") from None
    if cfg.train.eval_every != 1:
        raise SpaceError(f"{path}: ASHA compares trials every epoch, so train.eval_every must be 1 "
                         f"(got {cfg.train.eval_every}); set it under fixed")
    if space.objective not in objectives(cfg):
        raise SpaceError(f"{path}: no trial reports the objective {space.objective!r}; "
                         f"choose one of {', '.join(objectives(cfg))}")


def _scheduler(path: Path, raw: dict) -> dict[str, Any]:
    _no_unknown(raw, SCHEDULER_KEYS, f"{path}: scheduler")
    out = {"name": raw.get("name", "asha"), "grace_period": raw.get("grace_period", 1),
           "reduction_factor": raw.get("reduction_factor", 2)}
    if out["name"] not in ("asha", "fifo"):
        raise SpaceError(f"{path}: scheduler.name must be asha or fifo, got {out['name']!r}")
    for key in ("grace_period", "reduction_factor"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1 + (key == "reduction_factor"):
            raise SpaceError(f"{path}: scheduler.{key} must be an integer >= {1 + (key == 'reduction_factor')}, "
                             f"got {out[key]!r}")
    return out


def _resources(path: Path, raw: dict) -> dict[str, Any]:
    _no_unknown(raw, RESOURCE_KEYS, f"{path}: resources")
    out = {"num_workers": 1, "cpus_per_worker": 1.0, "decode_cpus": 1.0, "use_gpu": False, **raw}
    for key, kind in (("num_workers", int), ("cpus_per_worker", float), ("decode_cpus", float), ("use_gpu", bool)):
        value = out[key]
        ok = isinstance(value, bool) if kind is bool else (not isinstance(value, bool) and isinstance(value, (int, kind)))
        if not ok or (kind is not bool and value <= 0):
            raise SpaceError(f"{path}: resources.{key} must be a positive {kind.__name__}, got {value!r}")
    return out


def _positive_int(path: Path, raw: dict, key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpaceError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _no_unknown(raw: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(allowed)}")


def _relative(path: Path, target: str) -> Path:
    return (path.parent / target) if not Path(target).is_absolute() else Path(target)


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
