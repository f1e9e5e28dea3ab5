"""Small labelled 2D images for tests: grey noise with one brighter disc each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def disc_images(root: Path, n: int, size: int = 64, seed: int = 0, rgb: bool = False) -> Path:
    """``root/images/c<i>.png`` and ``root/labels/c<i>.png`` (0/255, as masks are written)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.integers(20, size - 20), rng.integers(20, size - 20), rng.integers(6, 14)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        pixels = np.clip(rng.normal(80, 20, (size, size)) + 100 * disc, 0, 255).astype(np.uint8)
        if rgb:
            pixels = np.stack([pixels, pixels // 2, 255 - pixels], axis=-1)
        sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=rgb), str(root / "images" / f"c{i}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(disc.astype(np.uint8) * 255), str(root / "labels" / f"c{i}.png"))
    return root
