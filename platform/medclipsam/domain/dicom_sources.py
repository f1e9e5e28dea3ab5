"""A mask's DICOM source as pydicom datasets, slice for slice with the volume ``read_image`` returns:
what the DICOM writers (``dicom_seg``, ``rtstruct``) reference and copy patient and study from."""

from __future__ import annotations

import os
import tempfile

import pydicom

from .. import storage
from ..errors import InputError, describe
from .images import dicom_series_files, split_series_uri


def source_datasets(local: str, uri: str) -> list[pydicom.Dataset]:
    """The source's slices in ``read_image``'s slice order (a single file: one); of one series of a folder
    (``series_uri``), that series' slices only, so a SEG never references another series' instances."""
    names = dicom_series_files(local, uri) if os.path.isdir(split_series_uri(local)[0]) else [local]
    try:
        return [pydicom.dcmread(name) for name in names]
    except (pydicom.errors.InvalidDicomError, OSError, ValueError) as exc:
        raise InputError(f"{uri}: cannot read the DICOM source of the mask ({describe(exc)})") from exc


def save_dataset(dataset: pydicom.Dataset, uri: str) -> None:
    """Write ``dataset`` (a SEG, an RTSTRUCT) to ``uri`` whole or not at all."""
    with tempfile.TemporaryDirectory(prefix="medclipsam-") as tmp:
        path = os.path.join(tmp, "object.dcm")
        dataset.save_as(path, enforce_file_format=True)
        storage.upload_file_atomic(path, uri)
