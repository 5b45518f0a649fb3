"""Introspective Deep Metric Learning: the model, losses, data, evaluation and indexing (no Ray)."""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it
