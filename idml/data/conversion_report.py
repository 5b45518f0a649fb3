"""What a conversion wrote and what it left out, stored in the manifest."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class ConversionReport:
    """Counts of written images per split and of skipped inputs per reason.

    Every input a converter does not write is counted here under a short reason
    ("truncated", "not an image", ...), so nothing is dropped silently.
    """

    max_examples: int = 5
    written: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    empty_classes: list[str] = field(default_factory=list)
    # Decisions the user should know about (e.g. a validation split left out), one sentence each.
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str, path: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(str(path))

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def log_summary(self, log: logging.Logger | None = None) -> None:
        log = log or logger
        for reason in sorted(self.skipped):
            log.warning(
                "skipped %d input(s): %s (e.g. %s)",
                self.skipped[reason],
                reason,
                ", ".join(self.examples.get(reason, [])),
            )
        if self.empty_classes:
            log.warning(
                "%d class(es) have no valid image and were left out: %s",
                len(self.empty_classes),
                ", ".join(self.empty_classes),
            )
        for note in self.notes:
            log.warning("%s", note)

    def to_dict(self) -> dict[str, Any]:
        return {
            "written": dict(sorted(self.written.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
            "empty_classes": list(self.empty_classes),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ConversionReport":
        data = data or {}
        return cls(
            written=dict(data.get("written", {})),
            skipped=dict(data.get("skipped", {})),
            examples={k: list(v) for k, v in data.get("examples", {}).items()},
            empty_classes=list(data.get("empty_classes", [])),
            notes=list(data.get("notes", [])),
        )
