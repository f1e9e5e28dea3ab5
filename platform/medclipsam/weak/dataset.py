"""The training set of the weak stage as an nnU-Net raw dataset.

Cases come from a ``pseudolabel`` run (its ``ok`` cases and their masks) or from an images folder
and a labels folder paired by case_id. Each case is written as nnU-Net reads it:
``imagesTr/<case>_0000.png`` (2D, one grey channel) or ``.nii.gz`` (volumes, with their spacing,
origin and direction), ``labelsTr/<case>.<ext>`` with labels {0, 1}, and ``dataset.json``. The
same conversion (``nnunet_input``) feeds the trained ensemble at prediction time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import storage
from ..domain.images import MedicalImage, read_image, read_mask
from ..domain.inputs import list_cases
from ..domain.records import STATUS_OK, read_manifest
from ..errors import InputError
from ..ops.slicing import window_to_uint8
from ..storage.outputs import MANIFEST, check_case_id
from .nnunet_env import dataset_folder_name

LABELS = {"background": 0, "target": 1}
NATURAL_SPACING = (999.0, 1.0, 1.0)  # nnU-Net's spacing for 2D images (the 999 marks the absent axis)


@dataclass(frozen=True)
class TrainingCase:
    case_id: str
    image_uri: str
    label_uri: str


@dataclass
class ExportSummary:
    folder: Path
    file_ending: str
    cases: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # case_id -> reason


def cases_from_pseudo(run_output: str) -> tuple[list[TrainingCase], dict[str, str]]:
    """The ``ok`` cases of a ``pseudolabel`` run and their masks; the others with the reason."""
    uri = storage.join(run_output, MANIFEST)
    if not storage.exists(uri):
        raise InputError(f"{run_output}: no {MANIFEST} (is it the output of medclipsam pseudolabel?)")
    cases, skipped = [], {}
    for row in read_manifest(uri).to_pylist():
        check_case_id(row["case_id"], uri)  # it names the training files: never a path out of the work folder
        if row["status"] != STATUS_OK or not row["mask_uri"]:
            skipped[row["case_id"]] = f"status {row['status']}"
        else:
            cases.append(TrainingCase(row["case_id"], row["source_uri"], row["mask_uri"]))
    return sorted(cases, key=lambda c: c.case_id), skipped


def cases_from_folders(images: str, labels: str) -> tuple[list[TrainingCase], dict[str, str]]:
    """Images and labels paired by case_id; images without a label are skipped."""
    found, truths = list_cases(images), list_cases(labels)
    for case_id in found:
        check_case_id(case_id, images)
    cases = [TrainingCase(case_id, uri, truths[case_id]) for case_id, uri in sorted(found.items())
             if case_id in truths]
    skipped = {case_id: "no label" for case_id in found if case_id not in truths}
    return cases, skipped


def training_plane(image: MedicalImage) -> np.ndarray:
    """A 2D image as one grey plane nnU-Net can read back from PNG exactly: 8- and 16-bit grey kept,
    colour as its luminance, anything else (signed, float) windowed to 8 bits."""
    pixels = image.array
    if pixels.ndim == 3:
        rgb = pixels[..., :3].astype(np.float64)
        grey = rgb @ np.array([0.299, 0.587, 0.114]) if rgb.shape[-1] == 3 else rgb[..., 0]
        pixels = np.clip(np.rint(grey), 0, np.iinfo(image.array.dtype).max if image.array.dtype.kind == "u" else 255)
        pixels = pixels.astype(image.array.dtype if image.array.dtype in (np.uint8, np.uint16) else np.uint8)
    if pixels.dtype in (np.uint8, np.uint16):
        return pixels
    return window_to_uint8(pixels)


def nnunet_input(image: MedicalImage) -> tuple[np.ndarray, dict]:
    """The image as nnU-Net's readers return it: ``(1, 1, H, W)`` or ``(1, Z, Y, X)`` float32, and its
    properties (spacing in array order)."""
    if image.is_volume:
        return image.array.astype(np.float32)[None], {"spacing": list(image.spacing_array_order)}
    return training_plane(image).astype(np.float32)[None, None], {"spacing": list(NATURAL_SPACING)}


def _write_volume(array: np.ndarray, reference: MedicalImage, path: Path) -> None:
    out = sitk.GetImageFromArray(array)
    out.SetSpacing(reference.spacing)
    out.SetOrigin(reference.origin)
    out.SetDirection(reference.direction)
    sitk.WriteImage(out, str(path), useCompression=True)


def _export_case(case: TrainingCase, folder: Path, min_mask_pixels: int) -> tuple[str, str]:
    """Write one case; returns (file ending, "") or ("", reason it was skipped)."""
    image = read_image(case.image_uri)
    label = read_mask(case.label_uri).array > 0
    expected = image.array.shape if image.is_volume else image.array.shape[:2]
    if label.shape != expected:
        return "", f"label {case.label_uri} has shape {label.shape}, image {expected}"
    if int(label.sum()) < max(min_mask_pixels, 1):
        return "", f"mask has {int(label.sum())} foreground pixels (minimum {max(min_mask_pixels, 1)})"
    if image.is_volume:
        _write_volume(image.array, image, folder / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        _write_volume(label.astype(np.uint8), image, folder / "labelsTr" / f"{case.case_id}.nii.gz")
        return ".nii.gz", ""
    plane = sitk.GetImageFromArray(training_plane(image))
    sitk.WriteImage(plane, str(folder / "imagesTr" / f"{case.case_id}_0000.png"))
    sitk.WriteImage(sitk.GetImageFromArray(label.astype(np.uint8)), str(folder / "labelsTr" / f"{case.case_id}.png"))
    return ".png", ""


def export_dataset(cases: list[TrainingCase], raw_root: str | Path, dataset_id: int, name: str,
                   normalization: str = "zscore", min_mask_pixels: int = 1,
                   progress: Callable[[int, int], None] | None = None) -> ExportSummary:
    """Write ``DatasetNNN_name`` under ``raw_root``; unreadable or unusable cases are skipped with a reason."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    folder = Path(raw_root) / dataset_folder_name(dataset_id, name)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(folder, "")
    endings: dict[str, str] = {}
    for number, case in enumerate(cases, start=1):
        try:
            ending, reason = _export_case(case, folder, min_mask_pixels)
        except InputError as exc:
            ending, reason = "", str(exc)
        if reason:
            summary.skipped[case.case_id] = reason
        else:
            summary.cases.append(case.case_id)
            endings[case.case_id] = ending
        if progress:
            progress(number, len(cases))
    kinds = set(endings.values())
    if len(kinds) > 1:
        volumes = sorted(c for c, e in endings.items() if e == ".nii.gz")[:3]
        raise InputError(f"the training cases mix 2D images and volumes (volumes: {', '.join(volumes)}, ...); "
                         "nnU-Net trains on one kind")
    if len(summary.cases) < 2:
        raise InputError(f"only {len(summary.cases)} usable training case(s) of {len(cases)}; nnU-Net needs "
                         f"at least 2 ({'; '.join(f'{k}: {v}' for k, v in list(summary.skipped.items())[:5])})")
    summary.file_ending = kinds.pop()
    generate_dataset_json(str(folder), {0: normalization}, LABELS, len(summary.cases), summary.file_ending,
                          dataset_name=dataset_folder_name(dataset_id, name),
                          description="MedCLIP-SAMv2 weak supervision: images with their pseudo-labels")
    (folder / "export.json").write_text(json.dumps({"cases": summary.cases, "skipped": summary.skipped}, indent=1))
    return summary
