"""The evaluation protocol of a model on one split: leave-one-out retrieval, cross-domain
retrieval, and the uncertainty analysis (R@1 per query-uncertainty quartile, clean vs mixed)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import Config
from ..engine import embed, iterate_mixed
from .plots import plot_uncertainty_analysis
from .retrieval import cross_domain_metrics, retrieval_metrics
from .uncertainty import image_uncertainty, recall_by_uncertainty, uncertainty_summary


def evaluate_model(
    model: torch.nn.Module,
    dataset,
    cfg: Config,
    *,
    device: str | torch.device = "cpu",
    uncertainty: bool = True,
    pooled_features: bool = False,
    plot_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` (an ``ImageShardDataset`` with an eval transform).

    Returns ``metrics`` (recall@K, map@r, r_precision, nmi), ``cross_domain`` (or None),
    ``uncertainty_bins`` and ``uncertainty`` (or None), ``images_per_s`` and the embeddings.
    ``pooled_features`` evaluates the backbone's pooled feature instead (frozen baseline).
    """
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.workers)
    start = time.perf_counter()
    mu, sigma = embed(model, loader, device=device, channels_last=cfg.train.channels_last,
                      pooled_features=pooled_features, progress=progress, total=len(loader), desc="embed")
    seconds = time.perf_counter() - start
    labels = np.asarray(dataset.labels)
    domains = np.asarray(dataset.domains)
    ks = tuple(cfg.eval.recall_ks)
    result: dict[str, Any] = {
        "metrics": retrieval_metrics(mu, labels, ks=ks, nmi=cfg.eval.nmi),
        "cross_domain": None,
        "uncertainty_bins": None,
        "uncertainty": None,
        "images_per_s": len(mu) / seconds,
        "mu": mu,
        "sigma": sigma,
    }
    if cfg.eval.cross_domain and len(set(domains.tolist())) > 1:
        result["cross_domain"] = cross_domain_metrics(mu, labels, domains, ks=ks)
    if uncertainty and not pooled_features:
        clean = image_uncertainty(sigma)
        _, sigma_mixed = embed(model, iterate_mixed(loader, seed=cfg.train.seed), device=device,
                               channels_last=cfg.train.channels_last, progress=progress, total=len(loader),
                               desc="embed mixed")
        mixed = image_uncertainty(sigma_mixed)
        result["uncertainty_bins"] = recall_by_uncertainty(mu, labels, clean)
        result["uncertainty"] = uncertainty_summary(clean, mixed)
        if plot_path is not None:
            plot_uncertainty_analysis(result["uncertainty_bins"], clean, mixed, plot_path)
    return result


def summary_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat scalar metrics of an ``evaluate_model`` result (for tables, MLflow, JSON)."""
    out = dict(result["metrics"])
    if result["cross_domain"] is not None:
        out.update({f"xdomain_{k}": v for k, v in result["cross_domain"]["average"].items()})
    if result["uncertainty"] is not None:
        u = result["uncertainty"]
        out.update(uncertainty_mean_clean=u["mean_clean"], uncertainty_mean_mixed=u["mean_mixed"],
                   uncertainty_auroc_mixed=u["auroc"])
        bins = result["uncertainty_bins"]
        out.update(recall_at_1_lowest_uncertainty=bins[0]["recall@1"], recall_at_1_highest_uncertainty=bins[-1]["recall@1"])
    out["embed_images_per_s"] = result["images_per_s"]
    return out
