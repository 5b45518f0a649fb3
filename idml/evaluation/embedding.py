"""The embedding pass: ``(mu, sigma)`` of every image of a batch iterable, the way evaluation
(``protocol.evaluate_model``) and the confidence's fit at the end of training read a model.

Batches are any iterable of image tensors, or tuples whose first item is one (NCHW float in
[0, 1] or uint8), so a torch DataLoader and a Ray Data iterator drive the same code.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..model import IDMLModel
from ..precision import autocast, autocast_dtype


def to_device(images: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    """Images onto ``device`` as float in [0, 1] (uint8 batches are scaled), channels-last when
    asked: the one conversion training batches and evaluated batches both go through."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@torch.no_grad()
def embed(
    model: IDMLModel,
    batches: Iterable[torch.Tensor | tuple],
    *,
    device: str | torch.device = "cpu",
    channels_last: bool = True,
    pooled_features: bool = False,
    progress: bool = True,
    total: int | None = None,
    desc: str = "embed",
    precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``(mu, sigma)`` of every image in ``batches`` (batches may be image tensors
    or tuples whose first item is the image tensor). ``pooled_features=True`` returns the
    normalised backbone feature instead of mu (the frozen-backbone baseline) and empty sigma.
    ``precision``: the backbone's (``idml.precision``); the outputs are fp32."""
    model.eval()
    dtype = autocast_dtype(device, precision)
    mus, sigmas = [], []
    for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        images = to_device(images, device, channels_last)
        if pooled_features:
            with autocast(device, dtype):
                feats = model.pooled_features(images)
            feats = torch.nn.functional.normalize(feats.float(), dim=1)
            mus.append(feats.cpu())
            sigmas.append(feats.new_zeros(len(feats), 0).cpu())
        else:
            with autocast(device, dtype):
                mu, sigma = model(images)
            mus.append(mu.float().cpu())
            sigmas.append(sigma.float().cpu())
    if not mus:
        raise ValueError("nothing to embed: the batch iterable was empty")
    return torch.cat(mus).numpy(), torch.cat(sigmas).numpy()

