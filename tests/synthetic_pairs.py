"""Synthetic image-caption pairs that carry a learnable signal: a coloured square whose colour and
position the caption names."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}
ROWS = {"top": 0, "bottom": 1}
COLS = {"left": 0, "right": 1}


def make_pairs(folder: Path, n: int, seed: int = 0, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % 3]
        vertical, horizontal = list(ROWS)[(i // 3) % 2], list(COLS)[(i // 6) % 2]
        image = rng.integers(0, 8, (size, size, 3)).astype(np.uint8)
        top, left = ROWS[vertical] * size // 2 + 4, COLS[horizontal] * size // 2 + 4
        image[top : top + size // 2 - 8, left : left + size // 2 - 8] = COLOURS[colour]
        path = folder / f"img{i:03d}.png"
        sitk.WriteImage(sitk.GetImageFromArray(image, isVector=True), str(path))
        rows.append({"image": str(path), "caption": f"a {colour} square in the {vertical} {horizontal} corner"})
    out = folder / "pairs.csv"
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return out
