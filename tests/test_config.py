from pathlib import Path

import pytest

from idml.config import ConfigError, config_from_dict, load_config, validate_config


def test_defaults_round_trip():
    cfg = load_config()
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.flat()["train.lr"] == cfg.train.lr


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  lr: 1\nloss:\n  name: triplet\n")
    cfg = load_config(path, ["train.epochs=5", "eval.recall_ks=[1,10]", "loss.margin=null"])
    assert cfg.train.epochs == 5 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.loss.name == "triplet" and cfg.eval.recall_ks == [1, 10] and cfg.loss.margin is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.epoch=3"], "unknown config key.*train.epoch"),
        (["trian.epochs=3"], "unknown config key.*trian"),
        (["train.epochs=three"], "train.epochs must be int"),
        (["train.epochs=true"], "train.epochs must be int"),
        (["train.lr=[1]"], "train.lr must be float"),
        (["eval.recall_ks=[1, x]"], r"eval.recall_ks\[1\] must be int"),
        (["train=3"], "train must be a mapping"),
        (["nonsense"], "section.key=value"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.backbone=vgg"], "model.backbone"),
        (["loss.name=arcface"], "loss.name"),
        (["train.batch_size=30", "train.images_per_class=4"], "multiple"),
        (["train.epochs=0"], "train.epochs"),
        (["loss.uncertainty_weight=-1"], "uncertainty_weight"),
    ],
)
def test_value_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(load_config(overrides=overrides))


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(path)
    validate_config(cfg)


def test_unknown_uncertainty_norm_is_refused():
    cfg = load_config(overrides=["model.uncertainty_norm=softplus"])
    with pytest.raises(ValueError, match="model.uncertainty_norm 'softplus' is not one of batch, unit, none"):
        validate_config(cfg)
