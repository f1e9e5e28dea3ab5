"""Visual prompts for one 2D image or slice."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SlicePrompts:
    """Boxes ``N x 4`` (x0, y0, x1, y1) and points ``P x 2`` (x, y) with labels ``P`` (1 fg, 0 bg).

    Each box is decoded on its own (with all points, if any) and the masks are unioned; with no
    box, the points form one prompt.
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))

    def is_empty(self) -> bool:
        return len(self.boxes) == 0 and len(self.points) == 0

    def to_record(self, precise: bool = False) -> dict:
        """JSON-ready lists; coordinates to 0.01 px for people, or exact (``precise``) between stages."""
        digits = 17 if precise else 2
        return {
            "boxes": np.asarray(self.boxes, dtype=float).round(digits).tolist(),
            "points": np.asarray(self.points, dtype=float).round(digits).tolist(),
            "labels": np.asarray(self.labels).astype(int).tolist(),
        }

    @classmethod
    def from_record(cls, record: dict) -> SlicePrompts:
        """The inverse of ``to_record`` (coordinates as recorded)."""
        return cls(
            boxes=np.asarray(record.get("boxes", []), dtype=float).reshape(-1, 4),
            points=np.asarray(record.get("points", []), dtype=float).reshape(-1, 2),
            labels=np.asarray(record.get("labels", []), dtype=np.int64).reshape(-1),
        )
