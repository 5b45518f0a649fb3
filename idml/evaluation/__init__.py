"""Evaluation: retrieval metrics on mu, uncertainty analyses on sigma, plots, tables."""

from .plots import plot_recall_curves, plot_retrieval_grid, plot_uncertainty_analysis, save_retrieval_grid
from .tables import format_metrics_table
from .retrieval import cross_domain_metrics, knn, retrieval_metrics
from .uncertainty import (
    image_uncertainty,
    recall_by_uncertainty,
    spearman_uncertainty_vs_error,
    uncertainty_summary,
)

__all__ = [
    "cross_domain_metrics",
    "format_metrics_table",
    "image_uncertainty",
    "knn",
    "plot_recall_curves",
    "plot_retrieval_grid",
    "plot_uncertainty_analysis",
    "recall_by_uncertainty",
    "retrieval_metrics",
    "save_retrieval_grid",
    "spearman_uncertainty_vs_error",
    "uncertainty_summary",
]
