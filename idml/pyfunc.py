"""The MLflow pyfunc form of a trained model: encoded images in, ``mu``, ``sigma`` and
``uncertainty`` out. Kept apart from ``idml.registry`` because defining it imports mlflow."""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd

from .metric import image_uncertainty

CHECKPOINT_ARTIFACT = "checkpoint"
IMAGE_COLUMN = "image"


class IDMLPyfunc(mlflow.pyfunc.PythonModel):
    """``predict`` takes a DataFrame with an ``image`` column of encoded image bytes (PNG, JPEG,
    ...) and returns one row per image: ``mu`` (the L2-normalised semantic embedding), ``sigma``
    (the uncertainty embedding) and ``uncertainty`` (``||sigma||^2``)."""

    def load_context(self, context) -> None:
        from .inference import Embedder

        self.embedder = Embedder(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input:
            raise ValueError(f"the input needs an {IMAGE_COLUMN!r} column of encoded image bytes, "
                             f"got columns {list(model_input.columns)}")
        mu, sigma = self.embedder.embed_images([bytes(b) for b in model_input[IMAGE_COLUMN]])
        return predictions_frame(mu, sigma)


def predictions_frame(mu: np.ndarray, sigma: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"mu": list(mu.astype(np.float32)), "sigma": list(sigma.astype(np.float32)),
                         "uncertainty": image_uncertainty(sigma)})
