"""A trained model as an MLflow model: logged with its checkpoint, registered, aliased, resolved
back to the same checkpoint from every kind of reference, and usable as a pyfunc."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from idml.errors import InputError
from idml.registry import describe_model, list_versions, log_model, resolve_checkpoint, set_alias
from support import make_checkpoint, shape_image


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    checkpoint = make_checkpoint(tmp / "best.pt")
    from idml.tracking import MlflowRun

    run = MlflowRun.open(uri, "registry-test", "train-1")
    info = log_model(uri, run.run_id, checkpoint, example_images=[shape_image(1), shape_image(2)],
                     registered_name="tiny-idml")
    run.finish()
    return uri, checkpoint, run.run_id, info


@pytest.fixture()
def tracking(logged, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged[0])
    return logged


def test_logged_model_resolves_to_the_same_checkpoint_from_each_uri(tracking, tmp_path):
    uri, checkpoint, run_id, info = tracking
    assert info["model_uri"] == f"runs:/{run_id}/model" and info["version"] == "1"
    set_alias("tiny-idml", "champion", 1)
    for ref in (f"runs:/{run_id}/model", "models:/tiny-idml/1", "models:/tiny-idml@champion"):
        assert _sha(resolve_checkpoint(ref, cache_dir=tmp_path)) == _sha(checkpoint), ref
    assert describe_model("models:/tiny-idml@champion") == {
        "model_uri": "models:/tiny-idml@champion", "registered_model": "tiny-idml", "alias": "champion",
        "version": "1", "run_id": run_id}
    assert list_versions("tiny-idml")[0]["aliases"] == ["champion"]


def test_pyfunc_predicts_what_the_checkpoint_embeds(tracking):
    import mlflow
    import pandas as pd

    from idml.inference import Embedder

    uri, checkpoint, run_id, _ = tracking
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    images = [shape_image(5), shape_image(6), shape_image(7)]
    out = model.predict(pd.DataFrame({"image": images}))
    mu, sigma = Embedder(checkpoint).embed_images(images)
    np.testing.assert_allclose(np.stack(out["mu"]), mu, atol=1e-5)
    np.testing.assert_allclose(out["uncertainty"].to_numpy(), np.square(sigma).sum(1), rtol=1e-4)
    assert model.metadata.signature is not None
    assert [c.name for c in model.metadata.signature.inputs] == ["image"]


def test_bad_references_are_refused_with_a_message(tracking, tmp_path):
    with pytest.raises(InputError, match="cannot load model models:/no-such-model@champion"):
        resolve_checkpoint("models:/no-such-model@champion")
    with pytest.raises(InputError, match="no version 9"):
        set_alias("tiny-idml", "champion", 9)
    with pytest.raises(InputError, match="cannot open checkpoint"):
        resolve_checkpoint("nosuchscheme://bucket/best.pt")
    assert resolve_checkpoint(f"file://{tracking[1]}").exists()
