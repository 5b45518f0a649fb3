"""Inference with a trained checkpoint: images in, ``mu`` (semantic embedding), ``sigma``
(uncertainty embedding) and the per-image uncertainty out.

``Embedder`` is what every consumer of a checkpoint uses (the MLflow pyfunc and its input
example, index builds through ``idml.index.embed.BatchEmbedder``, index queries, the search
service): the model loads once, in eval mode, in the precision ``idml.precision`` picks for the
device (bf16 autocast where the device computes it natively; vectors come out float32 either
way), with ``channels_last`` convolutions. ``image_uncertainty`` (``idml.metric``'s) is the one
definition of an image's uncertainty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .checkpoint import load_checkpoint, model_from_checkpoint
from .data.images import InvalidImageError, decode_image
from .errors import InputError
from .evaluation.confidence import Confidence
from .metric import image_uncertainty  # noqa: F401 - the one definition, re-exported with the embedder
from .precision import autocast, autocast_dtype
from .transforms import eval_transform


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Embedder:
    """A checkpoint (a path or a loaded checkpoint dict) ready to embed images."""

    def __init__(self, checkpoint: str | Path | Mapping[str, Any], *, device: str | None = None, threads: int = 0,
                 channels_last: bool | None = None, precision: str = "auto"):
        if threads > 0:
            torch.set_num_threads(threads)
        state = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
        self.device = torch.device(device) if device else default_device()
        model, cfg = model_from_checkpoint(dict(state), path=None if isinstance(checkpoint, Mapping) else checkpoint)
        # channels_last speeds up convolutions on CPU and is neutral on GPU.
        self.channels_last = cfg.train.channels_last if channels_last is None else channels_last
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.autocast_dtype = autocast_dtype(self.device, precision)
        self.dim = cfg.model.embedding_dim
        self.transform = eval_transform(cfg.data.image_size)
        # The confidence fitted on validation when the model was trained (None for older checkpoints).
        self.confidence = Confidence.from_dict(state["confidence"]) if state.get("confidence") else None

    @torch.inference_mode()
    def embed_tensors(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (or [0, 1] float) NCHW images -> float32 ``(mu, sigma)`` numpy arrays."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.autocast_dtype):
            mu, sigma = self.model(images)
        return mu.float().cpu().numpy(), sigma.float().cpu().numpy()

    def embed_images(self, blobs: list[bytes], batch_size: int = 64,
                     names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embed encoded images (query images, an input example); a corrupt one raises
        InputError naming it (``names``, else its position)."""
        mus, sigmas = [], []
        for start in range(0, len(blobs), batch_size):
            chunk = [self.decode(b, names[i] if names else f"image {i}")
                     for i, b in enumerate(blobs[start:start + batch_size], start)]
            mu, sigma = self.embed_tensors(torch.stack(chunk))
            mus.append(mu)
            sigmas.append(sigma)
        if not mus:
            return np.zeros((0, self.dim), np.float32), np.zeros((0, self.dim), np.float32)
        return np.concatenate(mus), np.concatenate(sigmas)

    def decode(self, blob: bytes, name: str) -> torch.Tensor:
        """One encoded image as the model's input tensor; InputError naming it if it is unusable."""
        try:
            return self.transform(decode_image(blob))
        except InvalidImageError as e:
            raise InputError(f"{name} is not a usable image ({e})") from e
