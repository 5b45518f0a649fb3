"""Run configuration: typed dataclasses, loaded from YAML with ``section.key=value`` overrides.

Unknown keys and wrong types are errors that name the key, so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError


class ConfigError(InputError):
    """A config file, override or value that cannot be used; the message names the key."""


@dataclass
class DataConfig:
    dataset: str = "emoji"  # a built-in name (emoji, fashion-mnist) or a converted dataset folder
    image_size: int = 64  # square side fed to the model
    train_split: str = "train"
    val_split: str = "val"  # carved from the training classes; picks the best checkpoint
    test_split: str = "test"
    workers: int = 0  # torch DataLoader workers in the local loop


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    embedding_dim: int = 512
    pretrained: bool = True
    weights_path: str | None = None  # local backbone state_dict (e.g. ResNet-50 offline)
    uncertainty_norm: str = "batch"  # batch | unit (released code: constant) | none (unbounded); see idml.model
    # How the uncertainty head learns: metric (IDML's introspective metric, inside the base loss) |
    # pfe (mutual likelihood on positive pairs) | failure (predicts a wrong top-1 neighbour); pfe and
    # failure learn from a stop-gradient copy of the features (idml.uncertainty_losses)
    uncertainty: str = "metric"
    # The failure predictor's gallery beside the batch: the last N embeddings of other classes
    # (idml.uncertainty_losses.FailurePredictionLoss). 2048: about 30 batches of 64, a few hundred
    # classes, as many as a test gallery's near neighbours span; searched by tune_spaces/emoji_failure.yaml
    failure_bank_size: int = 2048


@dataclass
class LossConfig:
    name: str = "proxy_anchor"
    introspective: bool = True  # false = the plain base loss
    uncertainty_weight: float = 0.1  # lambda
    margin: float | None = None  # per-loss default when null (see idml.losses.loss_defaults)
    scale: float | None = None
    mixup: bool = True
    mixup_alpha: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 64
    images_per_class: int = 4  # m in class-balanced batches of batch_size / m classes
    lr: float = 3e-4
    proxy_lr_multiplier: float = 10.0  # the paper's 100x collapsed recall on our data; 10x is stable
    backbone_lr_multiplier: float = 1.0  # < 1 fine-tunes the pretrained backbone more gently
    uncertainty_lr_multiplier: float = 1.0  # the uncertainty head's lr relative to train.lr
    weight_decay: float = 1e-4
    warmup_epochs: int = 1  # epochs training only heads and proxies
    lr_step: int = 5
    lr_gamma: float = 0.5
    grad_clip: float = 10.0  # gradient value clipping, as in the paper
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default (Ray workers: sized to the node, see pipelines.train)
    channels_last: bool = True  # faster convolutions on CPU
    # auto: bf16 autocast for the backbone where the device computes bf16 natively (CUDA with
    # bf16, CPUs with AVX512-BF16/AMX), else fp32; the heads and the loss always run in fp32.
    precision: str = "auto"  # auto | bf16 | fp32
    eval_every: int = 1  # evaluate on the validation split every N epochs
    # The test split is only reported, never selects: by default it is evaluated once, on the
    # selected checkpoint at the end (N > 0: also every N epochs, for curves).
    test_every: int = 0
    max_steps_per_epoch: int = 0  # 0 = a full pass over the training split


@dataclass
class EvalConfig:
    recall_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batch_size: int = 128
    nmi: bool = True
    cross_domain: bool = True  # when the split has several domains


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 3e-4, ...}``, e.g. for MLflow params."""
        out = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (``"train.lr=1e-3"`` strings
    or a ``{"train.lr": 1e-3}`` dict)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} " + ("is a folder" if path.is_dir() else "does not exist"))
        with open(path) as f:
            data = _yaml(f, f"config file {path}")
        if data is None:
            raise ConfigError(f"config file {path} is empty (no settings, only blanks or comments); running it "
                              "would start the default job. Name a config with settings, e.g. configs/smoke.yaml, "
                              "or leave out --config for the defaults")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    for dotted, value in parse_overrides(overrides).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {part} is not a section")
        node[leaf] = value
    return _build(Config, data, "")


def validate_config(cfg: Config) -> None:
    """Value checks beyond types, before any expensive work starts."""
    from .backbones import BACKBONE_NAMES  # imported here: config stays cheap to import
    from .losses import LOSS_NAMES
    from .model import UNCERTAINTY_METHODS, UNCERTAINTY_NORMS
    from .precision import PRECISIONS

    t = cfg.train
    problems = []
    if cfg.model.backbone not in BACKBONE_NAMES:
        problems.append(f"model.backbone {cfg.model.backbone!r} is not one of {', '.join(BACKBONE_NAMES)}")
    if cfg.loss.name not in LOSS_NAMES:
        problems.append(f"loss.name {cfg.loss.name!r} is not one of {', '.join(LOSS_NAMES)}")
    if cfg.model.uncertainty not in UNCERTAINTY_METHODS:
        problems.append(f"model.uncertainty {cfg.model.uncertainty!r} is not one of {', '.join(UNCERTAINTY_METHODS)}")
    elif cfg.model.uncertainty != "metric" and cfg.loss.introspective:
        problems.append(f"model.uncertainty {cfg.model.uncertainty!r} learns sigma apart from the base loss, so the "
                        "base loss must be plain: set loss.introspective=false (or model.uncertainty=metric)")
    if cfg.model.uncertainty_norm not in UNCERTAINTY_NORMS:
        problems.append(f"model.uncertainty_norm {cfg.model.uncertainty_norm!r} is not one of {', '.join(UNCERTAINTY_NORMS)}")
    if cfg.loss.uncertainty_weight < 0:
        problems.append("loss.uncertainty_weight must be >= 0")
    if cfg.model.failure_bank_size < 0:
        problems.append(f"model.failure_bank_size must be >= 0 (0: the batch alone), got {cfg.model.failure_bank_size}")
    if t.images_per_class < 2 or t.batch_size < t.images_per_class or t.batch_size % t.images_per_class:
        problems.append(f"train.batch_size ({t.batch_size}) must be a positive multiple of train.images_per_class "
                        f"({t.images_per_class}), which must be >= 2 so every batch holds positive pairs")
    for key in ("epochs", "lr_step", "eval_every"):
        if getattr(t, key) < 1:
            problems.append(f"train.{key} must be >= 1")
    if t.test_every < 0:
        problems.append("train.test_every must be >= 0 (0: the test split only at the end)")
    if t.precision not in PRECISIONS:
        problems.append(f"train.precision {t.precision!r} is not one of {', '.join(PRECISIONS)}")
    if t.lr <= 0 or not math.isfinite(t.lr):
        problems.append("train.lr must be a positive number")
    if cfg.data.image_size < 16:
        problems.append("data.image_size must be >= 16")
    if not cfg.eval.recall_ks or min(cfg.eval.recall_ks) < 1:
        problems.append("eval.recall_ks must be a non-empty list of positive integers")
    problems.extend(_output_dir_problems(cfg.output_dir))
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def check_output_dir(output_dir: str) -> None:
    """Refuse an output folder that cannot be created (see ``_output_dir_problems``) before any work."""
    problems = _output_dir_problems(output_dir)
    if problems:
        raise ConfigError(f"invalid config: {problems[0]}")


def _output_dir_problems(output_dir: str) -> list[str]:
    """An output folder that cannot be created: it, or a folder above it, is a file."""
    path = Path(output_dir).expanduser()
    for folder in (path, *path.parents):
        if folder.exists():
            if folder.is_dir():
                return []
            what = "is a file" if folder == path else f"lies under {folder}, which is a file"
            return [f"output_dir {output_dir} {what}, not a folder (--output-dir); choose a folder"]
    return []


def config_from_dict(data: dict[str, Any]) -> Config:
    """The inverse of ``Config.to_dict`` (validated the same way as a YAML file)."""
    return _build(Config, data, "")


def parse_overrides(overrides) -> dict[str, Any]:
    """``["train.lr=1e-3", ...]`` (values read as YAML) or a dict, as ``{"train.lr": 0.001}``."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parsed[key.strip()] = _yaml(raw, f"override {item!r}") if raw.strip() else None
    return parsed


def _yaml(text, what: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(err).split())}") from err


def _build(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys in {prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, kind, prefix + name)
    return cls(**kwargs)


def _check_type(value, kind, key: str):
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_check_type(v, item_kind, f"{key}[{i}]") for i, v in enumerate(value)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        # PyYAML reads "1e-3" (no dot) as a string; accept numeric strings for float fields.
        try:
            return float(value)
        except ValueError:
            pass
    # bool is a subclass of int: `epochs: true` must not pass as 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value
