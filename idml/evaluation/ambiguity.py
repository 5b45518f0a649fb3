"""Does uncertainty rise with ambiguity? Synthetic blends of two images of different classes.

A blend ``(1 - r) * x + r * x_other`` with r in [0, 0.5] is as ambiguous as r is large: at
r = 0.5 it belongs to neither class more than the other. A meaningful uncertainty grows with
r; the Spearman correlation between r and the blends' uncertainty measures how well.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def blend_with_other_class(images: torch.Tensor, targets: torch.Tensor, ratio: float,
                           generator: torch.Generator) -> torch.Tensor:
    """``(1 - ratio) * x + ratio * x[partner]``, each partner drawn from another class of the
    batch where the batch has one (a batch of a single class blends within it)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"blend ratio must be in [0, 1], got {ratio}")
    n = len(targets)
    partners = torch.randint(0, n, (n,), generator=generator)
    for _ in range(10):  # re-draw partners that share the class
        same = targets[partners] == targets
        if not same.any():
            break
        partners[same] = torch.randint(0, n, (int(same.sum()),), generator=generator)
    if images.dtype == torch.uint8:
        images = images.float().div(255)
    return (1.0 - ratio) * images + ratio * images[partners]


def iterate_blends(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], ratio: float, *, seed: int = 0,
                   max_images: int | None = None) -> Iterator[torch.Tensor]:
    """Blends of every batch at ``ratio`` (the same partners for every ratio given the seed),
    stopping after ``max_images``."""
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    for images, targets in batches:
        if max_images is not None and seen >= max_images:
            return
        if max_images is not None:
            images, targets = images[: max_images - seen], targets[: max_images - seen]
        seen += len(targets)
        yield blend_with_other_class(images, targets, ratio, generator)


def uncertainty_by_blend_ratio(uncertainty_at: dict[float, np.ndarray]) -> dict[str, Any]:
    """Summary of ``{ratio: per-image uncertainty of the blends at that ratio}`` (the same
    images at every ratio): mean and median per ratio, and the Spearman correlation between
    the ratio and the uncertainty over all (image, ratio) pairs."""
    if len(uncertainty_at) < 2:
        raise ValueError("need uncertainties at two or more blend ratios")
    ratios = sorted(uncertainty_at)
    sizes = {len(np.asarray(uncertainty_at[r])) for r in ratios}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every ratio needs the same non-empty set of images, got sizes {sorted(sizes)}")
    values = [np.asarray(uncertainty_at[r], dtype=np.float64) for r in ratios]
    xs = np.concatenate([np.full(len(v), r) for r, v in zip(ratios, values)])
    ys = np.concatenate(values)
    rho = float(spearmanr(xs, ys).statistic) if np.ptp(ys) > 0 else float("nan")
    # the share of images whose uncertainty at the most ambiguous ratio exceeds their own clean one
    rises = float(np.mean(values[-1] > values[0]))
    return {
        "ratios": [float(r) for r in ratios],
        "mean": [float(v.mean()) for v in values],
        "median": [float(np.median(v)) for v in values],
        "spearman": rho,
        "share_rising": rises,
        "num_images": int(len(values[0])),
    }

