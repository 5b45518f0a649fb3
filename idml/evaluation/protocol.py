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
from .embedding import embed
from .ambiguity import DEFAULT_RATIOS, iterate_blends, uncertainty_by_blend_ratio
from .plots import plot_selective_retrieval, plot_uncertainty_analysis
from .retrieval import cross_domain_metrics, retrieval_metrics
from .selective import selective_retrieval, uncertainty_ranking
from .uncertainty import image_uncertainty, recall_by_uncertainty, uncertainty_summary

# Images blended at each ratio of the blend-ratio sweep (its 0.5 blends also give the
# clean-vs-mixed AUROC): enough for a stable Spearman correlation and AUROC without making the
# final evaluation several times longer than the test pass itself.
BLEND_SWEEP_IMAGES = 1024
MIXED_RATIO = 0.5  # as ambiguous as a blend gets: it belongs to neither class more


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
    confidence=None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` (an ``ImageShardDataset`` with an eval transform).

    Returns ``metrics`` (recall@K, map@r, r_precision, nmi), ``cross_domain`` (or None),
    ``images_per_s`` and the embeddings; with ``uncertainty`` also ``uncertainty_bins`` (R@1
    per query-uncertainty quartile), ``uncertainty`` (clean vs 50/50 blends), ``blend_ratio``
    (uncertainty against the blend ratio) and ``selective`` (risk-coverage against the free
    confidence signals), else None; without it, ``uncertainty_ranking`` (the AURC and R-AUROC
    of the uncertainty and the top-1 gap alone: cheap enough for every epoch's validation).
    ``pooled_features`` evaluates the backbone's pooled feature instead (frozen baseline).
    ``confidence`` (``idml.evaluation.confidence.Confidence``) adds its risk-coverage and
    calibration to ``selective``.
    """
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.workers)
    start = time.perf_counter()
    mu, sigma = embed(model, loader, device=device, channels_last=cfg.train.channels_last,
                      pooled_features=pooled_features, progress=progress, total=len(loader), desc="embed",
                      precision=cfg.train.precision)
    seconds = time.perf_counter() - start
    labels = np.asarray(dataset.labels)
    domains = np.asarray(dataset.domains)
    ks = tuple(cfg.eval.recall_ks)
    result: dict[str, Any] = {
        "metrics": retrieval_metrics(mu, labels, ks=ks, nmi=cfg.eval.nmi),
        "cross_domain": None,
        "uncertainty_bins": None,
        "uncertainty": None,
        "blend_ratio": None,
        "selective": None,
        "uncertainty_ranking": None,
        "images_per_s": len(mu) / seconds,
        "mu": mu,
        "sigma": sigma,
    }
    if cfg.eval.cross_domain and len(set(domains.tolist())) > 1:
        result["cross_domain"] = cross_domain_metrics(mu, labels, domains, ks=ks)
    if not uncertainty and not pooled_features:
        # Cheap enough for every epoch's validation: what a search over the uncertainty's knobs ranks by.
        result["uncertainty_ranking"] = uncertainty_ranking(mu, labels, image_uncertainty(sigma))
    if uncertainty and not pooled_features:
        clean = image_uncertainty(sigma)

        def blend_uncertainty(ratio: float, max_images: int | None = None) -> np.ndarray:
            blends = iterate_blends(loader, ratio, seed=cfg.train.seed, max_images=max_images)
            _, sigma_blend = embed(model, blends, device=device, channels_last=cfg.train.channels_last,
                                   progress=progress, desc=f"embed blends r={ratio}", precision=cfg.train.precision)
            return image_uncertainty(sigma_blend)

        # A blend at ratio 0 is the clean image itself: reuse its uncertainty, don't embed it again.
        sweep = {r: clean[:BLEND_SWEEP_IMAGES] if r == 0 else blend_uncertainty(r, BLEND_SWEEP_IMAGES)
                 for r in sorted({*DEFAULT_RATIOS, MIXED_RATIO})}
        mixed = sweep[MIXED_RATIO]
        result["uncertainty_bins"] = recall_by_uncertainty(mu, labels, clean)
        result["uncertainty"] = uncertainty_summary(clean, mixed)
        result["blend_ratio"] = uncertainty_by_blend_ratio(sweep)
        result["selective"] = selective_retrieval(mu, labels, clean, confidence=confidence)
        if plot_path is not None:
            plot_uncertainty_analysis(result["uncertainty_bins"], clean, mixed, plot_path)
            plot_selective_retrieval(result["selective"], result["blend_ratio"],
                                     Path(plot_path).with_name("selective_retrieval.png"))
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
        out["uncertainty_blend_spearman"] = result["blend_ratio"]["spearman"]
        for name, curve in result["selective"]["signals"].items():
            out[f"aurc_{name}"] = curve["aurc"]
            out[f"r_auroc_{name}"] = curve["r_auroc"]
        out["aurc_oracle"] = result["selective"]["oracle_aurc"]
        if "calibration" in result["selective"]:
            out["confidence_ece"] = result["selective"]["calibration"]["ece"]
    out.update(result.get("uncertainty_ranking") or {})
    out["embed_images_per_s"] = result["images_per_s"]
    return out


UNCERTAINTY_KEYS = ("uncertainty_bins", "uncertainty", "blend_ratio", "selective")


def uncertainty_report(result: dict[str, Any]) -> dict[str, Any]:
    """The uncertainty analyses of an ``evaluate_model`` result, for metrics.json."""
    return {key: result[key] for key in UNCERTAINTY_KEYS}


def describe_selective(result: dict[str, Any]) -> str | None:
    """One line on selective retrieval: the AURC of each confidence signal (lower is better)."""
    selective = result.get("selective")
    if not selective:
        return None
    curves = ", ".join(f"{name} {curve['aurc']:.3f}" for name, curve in selective["signals"].items())
    r_auroc = ", ".join(f"{name} {curve['r_auroc']:.3f}" for name, curve in selective["signals"].items())
    line = (f"selective retrieval, AURC (lower is better): {curves}; random {selective['random_aurc']:.3f}, "
            f"oracle {selective['oracle_aurc']:.3f}\nR-AUROC (a wrong top-1 predicted; 0.5 = chance): {r_auroc}")
    if "calibration" in selective:
        line += f"\nconfidence calibration error (ECE): {selective['calibration']['ece']:.3f}"
    return line
