"""Reading medical images and writing masks with the source geometry.

2D images (PNG/JPG/TIFF, grey or RGB, 8 or 16 bit) and 3D volumes (NIfTI, NRRD, MHA, DICOM
series) are read with SimpleITK. Arrays follow SimpleITK's order: a volume is ``Z x Y x X``
and its ``spacing``/``origin``/``direction`` are SimpleITK's (x, y, z) values.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from . import storage

IMAGE_2D_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_EXTENSIONS = (".dcm", ".dicom")
SUPPORTED_EXTENSIONS = IMAGE_2D_EXTENSIONS + VOLUME_EXTENSIONS + DICOM_EXTENSIONS


@dataclass
class MedicalImage:
    """Pixels plus the geometry needed to write a mask back in place.

    array: ``H x W`` or ``H x W x C`` for 2D images, ``Z x Y x X`` for volumes.
    """

    array: np.ndarray
    is_volume: bool
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    uri: str = ""

    @property
    def spacing_array_order(self) -> tuple[float, ...]:
        """Spacing in the order of the array axes (SimpleITK reverses them)."""
        return tuple(reversed(self.spacing))


def extension_of(uri: str) -> str:
    """The image extension of ``uri`` (``.nii.gz`` counts as one), lower case, or ''."""
    name = storage.basename(uri).lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return os.path.splitext(name)[1]


def case_id_from_uri(uri: str) -> str:
    """The file (or DICOM series folder) name without its image extension."""
    name = storage.basename(uri)
    ext = extension_of(uri)
    if ext in SUPPORTED_EXTENSIONS:
        return name[: len(name) - len(ext)]
    return name


def is_supported(uri: str) -> bool:
    return extension_of(uri) in SUPPORTED_EXTENSIONS


def _read_dicom_series(folder: str, uri: str) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series:
        raise InputError(f"{uri}: folder holds no DICOM series")
    # The longest series is the scan; others are usually localisers.
    best = max(series, key=lambda s: len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, s)))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, best))
    return reader.Execute()


def _to_medical_image(image: sitk.Image, uri: str, force_2d: bool, single_frame_is_2d: bool = False) -> MedicalImage:
    array = sitk.GetArrayFromImage(image)
    ncomp = image.GetNumberOfComponentsPerPixel()
    dim = image.GetDimension()
    if array.size == 0:
        raise InputError(f"{uri}: image is empty (size {image.GetSize()})")
    if dim == 3 and image.GetSize()[2] == 1 and single_frame_is_2d:  # one DICOM frame (X-ray, ultrasound)
        array = array[0]
        dim = 2
    if dim == 2 or force_2d:
        if ncomp == 4:
            array = array[..., :3]
        elif ncomp == 2:  # grey + alpha
            array = array[..., 0]
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        spacing = tuple(image.GetSpacing()[:2])
        origin = tuple(image.GetOrigin()[:2])
        direction = (1.0, 0.0, 0.0, 1.0)
        if image.GetDimension() == 2:
            direction = tuple(image.GetDirection())
        return MedicalImage(array, False, spacing, origin, direction, uri)
    if dim != 3 or ncomp != 1:
        raise InputError(f"{uri}: unsupported image: {dim}D with {ncomp} components per pixel")
    return MedicalImage(
        array, True, tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()), uri
    )


def read_image(uri: str) -> MedicalImage:
    """Read a 2D image, a volume or a DICOM series folder from a path or URI."""
    if not storage.exists(uri):
        raise InputError(f"{uri}: no such file or object")
    is_dir = storage.isdir(uri)
    ext = extension_of(uri)
    if not is_dir and ext not in SUPPORTED_EXTENSIONS:
        raise InputError(
            f"{uri}: unsupported extension '{ext or '(none)'}'; supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    with storage.local_copy(uri) as local:
        try:
            if is_dir:
                image = _read_dicom_series(local, uri)
            else:
                image = sitk.ReadImage(local)
        except RuntimeError as exc:  # SimpleITK reports unreadable files as RuntimeError
            first = str(exc).strip().splitlines()
            fallback = first[-1] if first else ""
            detail = next((line for line in first if "ERROR" in line or "Exception" in line), fallback)
            raise InputError(f"{uri}: cannot read image ({detail.strip()[:300]})") from exc
    result = _to_medical_image(
        image, uri, force_2d=ext in IMAGE_2D_EXTENSIONS and image.GetDimension() == 2,
        single_frame_is_2d=not is_dir and ext in DICOM_EXTENSIONS,
    )
    if result.array.min() == result.array.max():
        raise InputError(f"{uri}: image is constant (every pixel is {result.array.flat[0]}); nothing to segment")
    return result


def mask_extension(image: MedicalImage) -> str:
    return ".nii.gz" if image.is_volume else ".png"


def mask_to_sitk(mask: np.ndarray, reference: MedicalImage) -> sitk.Image:
    """A binary mask as a SimpleITK image carrying the reference's geometry."""
    if reference.is_volume:
        if mask.shape != reference.array.shape:
            raise ValueError(f"mask shape {mask.shape} != volume shape {reference.array.shape}")
        out = sitk.GetImageFromArray(mask.astype(np.uint8))
        out.SetSpacing(reference.spacing)
        out.SetOrigin(reference.origin)
        out.SetDirection(reference.direction)
        return out
    if mask.shape != reference.array.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} != image shape {reference.array.shape[:2]}")
    return sitk.GetImageFromArray((mask > 0).astype(np.uint8) * 255)


def write_mask(mask: np.ndarray, reference: MedicalImage, uri: str) -> None:
    """Write a binary mask: PNG (0/255) for 2D images, NIfTI (0/1) with the source geometry for volumes."""
    image = mask_to_sitk(mask, reference)
    write_sitk(image, uri)


def write_sitk(image: sitk.Image, uri: str) -> None:
    """Write any SimpleITK image to a path or URI, atomically."""
    suffix = extension_of(uri) or ".nii.gz"
    with tempfile.TemporaryDirectory(prefix="medclipsam-") as tmp:
        local = os.path.join(tmp, "out" + suffix)
        sitk.WriteImage(image, local, useCompression=True)
        storage.upload_file_atomic(local, uri)


def read_mask(uri: str) -> MedicalImage:
    """Read a mask (any supported format) as a boolean array with its geometry."""
    if not storage.exists(uri):
        raise InputError(f"{uri}: no such file or object")
    with storage.local_copy(uri) as local:
        try:
            image = sitk.ReadImage(local)
        except RuntimeError as exc:
            raise InputError(f"{uri}: cannot read mask") from exc
    ext = extension_of(uri)
    result = _to_medical_image(image, uri, force_2d=ext in IMAGE_2D_EXTENSIONS,
                               single_frame_is_2d=ext in DICOM_EXTENSIONS)
    array = result.array
    if array.ndim == 3 and not result.is_volume:
        array = array.max(axis=-1)
    result.array = array > 0
    return result
