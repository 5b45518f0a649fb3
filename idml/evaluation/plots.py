"""PNG figures for evaluation reports.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot), so nothing here
touches global backend state and it works headless and in worker processes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .retrieval import to_numpy

CORRECT_COLOR = (0, 170, 0)
WRONG_COLOR = (220, 0, 0)


def _save(fig: Figure, path: str | Path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return str(path)


def _bin_label(i: int, n: int) -> str:
    name = f"Q{i + 1}"
    if i == 0:
        return f"{name} (lowest)"
    if i == n - 1:
        return f"{name} (highest)"
    return name


def plot_uncertainty_analysis(
    bins: Sequence[dict],
    clean_uncertainty: Any,
    mixed_uncertainty: Any,
    path: str | Path,
) -> str:
    """Two panels: R@1 per query-uncertainty bin, and clean-vs-mixed uncertainty histograms.

    ``bins`` is the output of :func:`~idml.evaluation.uncertainty.recall_by_uncertainty`.
    ``mixed_uncertainty`` may be ``None`` (only the clean histogram is drawn). Returns the
    written path.
    """
    if not bins:
        raise ValueError("bins is empty; pass the output of recall_by_uncertainty")
    missing = [k for k in ("recall@1", "num_queries") if k not in bins[0]]
    if missing:
        raise ValueError(f"bins entries lack keys {missing}; pass the output of recall_by_uncertainty")
    clean = to_numpy(clean_uncertainty, "clean_uncertainty").astype(np.float64).ravel()
    mixed = None
    if mixed_uncertainty is not None:
        mixed = to_numpy(mixed_uncertainty, "mixed_uncertainty").astype(np.float64).ravel()
    if clean.size == 0:
        raise ValueError("clean_uncertainty is empty")

    fig = Figure(figsize=(12, 4.5))
    left, right = fig.subplots(1, 2)

    recall = [100.0 * b["recall@1"] for b in bins]
    x = np.arange(len(bins))
    bars = left.bar(x, recall, color="tab:blue")
    for bar, b, r in zip(bars, bins, recall):
        left.annotate(
            f"{r:.1f}%\n(n={b['num_queries']})",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center", va="bottom", fontsize=8,
        )
    left.set_xticks(x, [_bin_label(i, len(bins)) for i in range(len(bins))])
    left.set_ylim(0, 110)
    left.set_xlabel("Query uncertainty quantile (||sigma||^2)")
    left.set_ylabel("Recall@1 (%)")
    left.set_title("Retrieval R@1 by query uncertainty")

    series = [("clean", clean, "tab:green")]
    if mixed is not None and mixed.size:
        series.append(("mixed", mixed, "tab:red"))
    edges = np.histogram_bin_edges(np.concatenate([s[1] for s in series]), bins=40)
    for name, values, color in series:
        right.hist(values, bins=edges, density=True, alpha=0.45, color=color,
                   label=f"{name} (n={len(values)})")
        mean = values.mean()
        right.axvline(mean, color=color, linestyle="--", linewidth=2, label=f"{name} mean = {mean:.3g}")
    right.set_xlabel("Uncertainty ||sigma||^2")
    right.set_ylabel("Density")
    right.set_title("Uncertainty of clean vs mixed images")
    right.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _matches(key: str, metric: str) -> bool:
    # "recall@1" matches "recall@1", "val/recall@1", "test_recall@1" but not "recall@16".
    return key == metric or re.fullmatch(rf".+[/_.:\-]{re.escape(metric)}", key) is not None


def has_recall_curves(history: Sequence[dict], keys: Sequence[str] = ("recall@1", "map@r")) -> bool:
    """Whether ``plot_recall_curves`` has a line to draw: a run without a validation split (and no
    other evaluated split) records none, and then there is no figure to make."""
    return any(_matches(k, m) for h in history for k in h if k != "epoch" for m in keys)


def plot_recall_curves(
    history: Sequence[dict],
    path: str | Path,
    keys: Sequence[str] = ("recall@1", "map@r"),
) -> str:
    """Metric vs epoch, one panel per metric in ``keys``.

    Each history item has ``"epoch"`` plus metric values (fractions, plotted as %). Every
    history key equal to a metric name or ending in ``<sep><metric>`` (``val/recall@1``,
    ``test_recall@1``) becomes one line, so several splits share a panel. Items lacking a
    key are skipped for that line only.
    """
    if not history:
        raise ValueError("history is empty; pass a list of {'epoch': ..., metric: ...} dicts")
    if any("epoch" not in h for h in history):
        raise ValueError("every history item needs an 'epoch' key")
    all_keys = list(dict.fromkeys(k for h in history for k in h if k != "epoch"))
    panels = {m: [k for k in all_keys if _matches(k, m)] for m in keys}
    panels = {m: ks for m, ks in panels.items() if ks}
    if not panels:
        raise ValueError(f"no history key matches any of {list(keys)}; available keys: {all_keys}")

    fig = Figure(figsize=(5.5 * len(panels), 4))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (metric, series_keys) in zip(axes, panels.items()):
        for key in series_keys:
            points = sorted((h["epoch"], h[key]) for h in history if key in h and h[key] is not None)
            epochs = [p[0] for p in points]
            values = [100.0 * float(p[1]) for p in points]
            ax.plot(epochs, values, marker="o", markersize=3, label=key)
        ax.set_xlabel("Epoch")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{metric} vs epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _to_rgb(img: Any, where: str) -> np.ndarray:
    if hasattr(img, "convert") and hasattr(img, "size"):  # PIL image
        img = img.convert("RGB")
    arr = to_numpy(img, where)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{where} must be an HxWx3 uint8 array or a PIL image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        raise ValueError(f"{where} must have dtype uint8, got {arr.dtype}")
    return arr


def _with_border(img: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    # Border in pixels (not a patch) so its thickness scales with the thumbnail.
    width = max(2, round(0.08 * min(img.shape[:2])))
    out = np.empty((img.shape[0] + 2 * width, img.shape[1] + 2 * width, 3), dtype=np.uint8)
    out[:] = color
    out[width:-width, width:-width] = img
    return out


def plot_retrieval_grid(
    query_images: Sequence[Any],
    result_images: Sequence[Sequence[Any]],
    correct: Sequence[Sequence[bool]],
    path: str | Path,
    *,
    query_titles: Sequence[str] | None = None,
    result_scores: Sequence[Sequence[float]] | None = None,
) -> str:
    """Grid of retrievals: one row per query, the query first, then its ranked results.

    Images are HxWx3 uint8 arrays or PIL images. ``correct[i][j]`` tells whether result j
    of query i has the query's label: correct results get a thick green border, wrong ones
    a thick red border. ``result_scores[i][j]`` (e.g. cosine similarity) is written under
    each result when given.
    """
    n = len(query_images)
    if n == 0:
        raise ValueError("query_images is empty")
    if len(result_images) != n or len(correct) != n:
        raise ValueError(
            f"need one row of results and of correctness flags per query: {n} queries, "
            f"{len(result_images)} result rows, {len(correct)} correct rows"
        )
    if query_titles is not None and len(query_titles) != n:
        raise ValueError(f"query_titles has {len(query_titles)} entries for {n} queries")
    if result_scores is not None and len(result_scores) != n:
        raise ValueError(f"result_scores has {len(result_scores)} rows for {n} queries")
    for i in range(n):
        if len(correct[i]) != len(result_images[i]):
            raise ValueError(
                f"query {i}: {len(result_images[i])} results but {len(correct[i])} correct flags"
            )
        if result_scores is not None and len(result_scores[i]) != len(result_images[i]):
            raise ValueError(
                f"query {i}: {len(result_images[i])} results but {len(result_scores[i])} scores"
            )
    k = max(len(r) for r in result_images)
    if k == 0:
        raise ValueError("result_images has no results to show")

    fig = Figure(figsize=(1.7 * (k + 1), 1.9 * n))
    axes = np.asarray(fig.subplots(n, k + 1, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(_to_rgb(query_images[i], f"query_images[{i}]"))
        ax.set_title(query_titles[i] if query_titles is not None else "Query", fontsize=9,
                     fontweight="bold")
        for j, img in enumerate(result_images[i]):
            ax = axes[i, j + 1]
            ok = bool(correct[i][j])
            ax.imshow(_with_border(_to_rgb(img, f"result_images[{i}][{j}]"),
                                   CORRECT_COLOR if ok else WRONG_COLOR))
            ax.set_title(f"#{j + 1}", fontsize=8)
            if result_scores is not None:
                score = float(result_scores[i][j])
                ax.text(0.5, -0.04, f"{score:.3f}" if math.isfinite(score) else str(score),
                        transform=ax.transAxes, ha="center", va="top", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _thumbnail(picture) -> np.ndarray:
    # One size for every figure's images: small emoji and large photos alike.
    return np.asarray(picture.convert("RGB").resize((96, 96)))


def save_retrieval_grid(mu: np.ndarray, labels: Sequence[int], load_images: Callable[[list[int]], dict[int, Any]],
                        path: str | Path, *, num_queries: int = 8, k: int = 5, seed: int = 0) -> Path | None:
    """``plot_retrieval_grid`` of an evaluated split: one random query from each of up to
    ``num_queries`` random classes with its top-``k`` neighbours in ``mu`` (wrong ones outlined).
    ``load_images(indices)`` returns ``{row: PIL image}`` (one call, so a streamed split reads
    its shards once). None when the split is too small for a neighbour."""
    from .retrieval import knn

    labels = np.asarray(labels)
    k = min(k, len(mu) - 1)
    if k < 1:
        return None
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))[:num_queries]
    queries = np.array([rng.choice(np.flatnonzero(labels == c)) for c in classes])
    sims, idx = knn(mu[queries], mu, k + 1)
    rows, scores = [], []
    for q, s_row, i_row in zip(queries, sims, idx):
        keep = [(s, j) for s, j in zip(s_row.tolist(), i_row.tolist()) if j != q][:k]
        rows.append([j for _, j in keep])
        scores.append([s for s, _ in keep])
    pictures = load_images(sorted({int(q) for q in queries} | {j for row in rows for j in row}))

    def thumb(i: int) -> np.ndarray:
        return _thumbnail(pictures[i])

    plot_retrieval_grid([thumb(q) for q in queries], [[thumb(j) for j in row] for row in rows],
                        [[labels[j] == labels[q] for j in row] for q, row in zip(queries, rows)], path,
                        query_titles=[f"query (label {labels[q]})" for q in queries], result_scores=scores)
    return Path(path)


def save_uncertainty_extremes(uncertainty: np.ndarray, load_images: Callable[[list[int]], dict[int, Any]],
                              path: str | Path, *, n: int = 10) -> Path | None:
    """Two rows of a split's images: the ``n`` least and the ``n`` most uncertain, each with its
    uncertainty (what a user looks at to judge whether the head finds the ambiguous images).
    ``load_images`` as in ``save_retrieval_grid``. None when the split has fewer than 2 images."""
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    n = min(n, len(uncertainty) // 2)
    if n < 1:
        return None
    order = np.argsort(uncertainty, kind="stable")
    rows = {"least uncertain": order[:n].tolist(), "most uncertain": order[::-1][:n].tolist()}
    pictures = load_images(sorted({i for row in rows.values() for i in row}))
    fig = Figure(figsize=(1.5 * n, 4.0))
    axes = np.asarray(fig.subplots(2, n, squeeze=False))
    for r, (title, row) in enumerate(rows.items()):
        for j, i in enumerate(row):
            ax = axes[r, j]
            ax.set_axis_off()
            ax.imshow(_thumbnail(pictures[i]))
            ax.set_title(f"{uncertainty[i]:.2f}", fontsize=9)
        axes[r, 0].text(-0.15, 0.5, title, transform=axes[r, 0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=10, fontweight="bold")
    fig.suptitle("Test images by uncertainty (x the average training image)", fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    return Path(path)


SIGNAL_LABELS = {
    "uncertainty": "uncertainty head (least uncertain first)",
    "top1_similarity": "top-1 similarity (free)",
    "top1_gap": "top-1 minus top-2 similarity (free)",
    "confidence": "calibrated confidence (fitted on val)",
}


def plot_selective_retrieval(selective: dict, blend_ratio: dict | None, path: str | Path) -> str:
    """R@1 against coverage per confidence signal (risk-coverage, from
    :func:`~idml.evaluation.selective.selective_retrieval`), mean uncertainty against the
    blend ratio (from :func:`~idml.evaluation.ambiguity.uncertainty_by_blend_ratio`), and,
    where a calibrated confidence was evaluated, accuracy against confidence (reliability)."""
    calibrated = selective.get("calibration")
    fig = Figure(figsize=(18 if calibrated else 12, 4.5))
    left, right, *rest = fig.subplots(1, 3 if calibrated else 2)
    if calibrated:
        bins = calibrated["bins"]
        reliability = rest[0]
        reliability.plot([0, 100], [0, 100], color="gray", linestyle=":", label="perfect calibration")
        reliability.plot([100 * b["confidence"] for b in bins], [100 * b["accuracy"] for b in bins], marker="o",
                         label="test queries per confidence bin")
        for b in bins:
            reliability.annotate(str(b["num_queries"]), (100 * b["confidence"], 100 * b["accuracy"]), fontsize=7,
                                 textcoords="offset points", xytext=(3, -9))
        reliability.set_xlabel("Confidence: predicted P(top-1 right) (%)")
        reliability.set_ylabel("R@1 of the queries in the bin (%)")
        reliability.set_title(f"Calibration on test (ECE {calibrated['ece']:.3f})")
        reliability.legend(fontsize=8)
    for name, curve in selective["signals"].items():
        left.plot(100 * np.asarray(curve["coverage"]), 100 * np.asarray(curve["recall@1"]), marker="o",
                  label=f"{SIGNAL_LABELS.get(name, name)}: AURC {curve['aurc']:.3f}")
    left.axhline(100 * selective["recall@1"], color="gray", linestyle=":",
                 label=f"answer everything: R@1 {100 * selective['recall@1']:.1f}%")
    left.set_xlabel("Coverage: queries answered (%)")
    left.set_ylabel("R@1 of answered queries (%)")
    left.set_title(f"Selective retrieval (oracle AURC {selective['oracle_aurc']:.3f})")
    left.legend(fontsize=8)
    if blend_ratio is not None:
        ratios = np.asarray(blend_ratio["ratios"])
        right.plot(ratios, blend_ratio["mean"], marker="o", label="mean")
        right.plot(ratios, blend_ratio["median"], marker="s", linestyle="--", label="median")
        right.set_title(f"Uncertainty of blends (Spearman {blend_ratio['spearman']:.2f}, "
                        f"n={blend_ratio['num_images']})")
        right.legend(fontsize=8)
    right.set_xlabel("Blend ratio r: (1 - r) x + r x_other")
    right.set_ylabel("Uncertainty ||sigma||^2")
    fig.tight_layout()
    return _save(fig, path)
