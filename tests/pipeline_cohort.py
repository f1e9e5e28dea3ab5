"""A small mixed cohort cut from the real sample scans, with labels: volumes and 2D slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medclipsam.ops.slicing import window_to_uint8

CASES = ["brain1", "brain2", "breast1", "lung2"]  # volume (NIfTI), PNG, volume (NRRD), PNG


def _png(array: np.ndarray, path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def make_cohort(samples: Path, root: Path) -> Path:
    """images/ and labels/ under ``root``: brain1 cut to 8 slices, breast1 whole, one slice of brain2 and lung2."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    image = sitk.ReadImage(str(samples / "images" / "brain1.nrrd"))
    label = sitk.ReadImage(str(samples / "labels" / "brain1.nrrd"))
    sitk.WriteImage(image[:, :, 10:18], str(root / "images" / "brain1.nii.gz"))  # keeps spacing and origin
    sitk.WriteImage(label[:, :, 10:18], str(root / "labels" / "brain1.nii.gz"))
    for kind in ("images", "labels"):
        sitk.WriteImage(sitk.ReadImage(str(samples / kind / "breast1.nrrd")), str(root / kind / "breast1.nrrd"))
    for case in ("brain2", "lung2"):
        volume = sitk.GetArrayFromImage(sitk.ReadImage(str(samples / "images" / f"{case}.nrrd")))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(samples / "labels" / f"{case}.nrrd"))) > 0
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        _png(window_to_uint8(volume[k]), root / "images" / f"{case}.png")
        _png(truth[k].astype(np.uint8) * 255, root / "labels" / f"{case}.png")
    return root
