"""The shipped search spaces (tune_spaces/*.yaml) load and validate without Ray, and the failure
predictor's space searches knobs that reach its objective and ranks trials by the uncertainty's
own validation AURC (minimised)."""

from __future__ import annotations

from pathlib import Path

import pytest

from idml.uncertainty_losses import build_uncertainty_loss
from pipelines._tune_report import save_plot
from pipelines._tune_space import load_space

SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_load_and_validate(path):
    space = load_space(path)
    assert space.trials and space.mode in ("min", "max")


def test_failure_space_searches_the_failure_predictors_knobs():
    space = load_space(SPACES / "emoji_failure.yaml")
    assert space.objective == "val/aurc_uncertainty" and space.mode == "min"  # a risk: lower is better
    banks = set()
    for params in space.trials[1:]:  # trial 0 is the base config
        cfg = space.trial_config(params)
        assert cfg.model.uncertainty == "failure" and not cfg.loss.introspective
        assert build_uncertainty_loss(cfg.model).bank_size == params["model.failure_bank_size"]
        assert cfg.train.uncertainty_lr_multiplier == params["train.uncertainty_lr_multiplier"]
        banks.add(params["model.failure_bank_size"])
    assert len(banks) > 1


def test_the_plot_has_a_panel_per_searched_key(tmp_path):
    rows = [{"trial": i, "status": "completed", "lambda": 0.0, "margin": 0.1, "model.failure_bank_size": bank,
             "train.uncertainty_lr_multiplier": lr, "objective": 0.3 - i / 100}
            for i, (bank, lr) in enumerate([(0, 1.0), (512, 0.3), (2048, 3.0)])]
    path = save_plot(rows, "val/aurc_uncertainty", ["model.failure_bank_size", "train.uncertainty_lr_multiplier"],
                     tmp_path / "plot.png")
    assert path.stat().st_size > 0
