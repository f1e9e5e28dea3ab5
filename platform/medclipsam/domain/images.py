"""Reading medical images and writing masks with the source geometry.

2D images (PNG/JPG/TIFF, grey or RGB, 8 or 16 bit) and 3D volumes (NIfTI, NRRD, MHA, DICOM
series) are read with SimpleITK. Arrays follow SimpleITK's order: a volume is ``Z x Y x X``
and its ``spacing``/``origin``/``direction`` are SimpleITK's (x, y, z) values.

Hostile files are refused before their pixels are read, each with one sentence naming the file:
the header is read first, and an image with a zero-size dimension or more voxels than
``MEDCLIPSAM_MAX_VOXELS`` (an environment variable, default 1.5e9 voxels, about 6 GB as float32)
is an ``InputError``, so a 100-byte header cannot make the reader allocate gigabytes. A DICOM
series must be one volume: slices of one size and orientation, evenly spaced (a missing slice is
refused, since one spacing would misplace the mask). An image that is mostly NaN or infinite
(more than half its voxels) is refused after reading; fewer non-finite voxels are left to the
windowing (``ops.slicing``), which ignores them. Reader errors keep SimpleITK's reason, without
its C++ file and line.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .. import storage
from ..errors import InputError, shorten
from ..storage.environment import number_from_env

IMAGE_2D_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_EXTENSIONS = (".dcm", ".dicom")
SUPPORTED_EXTENSIONS = IMAGE_2D_EXTENSIONS + VOLUME_EXTENSIONS + DICOM_EXTENSIONS
MAX_VOXELS_ENV = "MEDCLIPSAM_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 1_500_000_000
MAX_NON_FINITE_SHARE = 0.5  # an image or slice with more NaN/Inf voxels than this share has no picture left
DICOM_STEP_TOLERANCE = 0.1  # the largest slice step may exceed the smallest by this share of it (0.1: 10%)
FRAME_OF_REFERENCE = "0020|0052"  # FrameOfReferenceUID, as ITK names DICOM tags
SERIES_UID = "0020|000e"  # SeriesInstanceUID
SEG_FILE_SUFFIX = ".seg.dcm"  # a DICOM SEG named for its case: a mask, not an image (case_id without it)
PROBABILITY_SEG_SUFFIX = ".prob.seg.dcm"  # weak predict's FRACTIONAL SEG beside the binary one: no mask
SERIES_PART = "#series="  # <folder>#series=<SeriesInstanceUID>: one series of a folder holding several
SEGMENT_PART = "#segment="  # <case_id>.seg.dcm#segment=<number or label>: one segment of a SEG truth


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
    series_uid: str = ""  # a DICOM source's SeriesInstanceUID and FrameOfReferenceUID ("" otherwise):
    frame_of_reference: str = ""  # what a DICOM SEG ground truth is checked against

    @property
    def spacing_array_order(self) -> tuple[float, ...]:
        """Spacing in the order of the array axes (SimpleITK reverses them)."""
        return tuple(reversed(self.spacing))


def series_uri(folder: str, series_uid: str) -> str:
    """The URI of one series of a DICOM folder that holds several: ``<folder>#series=<SeriesInstanceUID>``."""
    return f"{folder.rstrip('/')}{SERIES_PART}{series_uid}"


def split_series_uri(uri: str) -> tuple[str, str]:
    """``(folder, SeriesInstanceUID)`` of a ``series_uri``; ``(uri, "")`` for any other URI or path."""
    folder, part = storage.split_part(uri)
    return (folder, part.removeprefix(SERIES_PART)) if part.startswith(SERIES_PART) else (uri, "")


def segment_uri(seg_uri: str, segment: str) -> str:
    """The URI of one segment of a DICOM SEG truth, so that the choice travels with the case's ``gt_uri``."""
    return f"{seg_uri}{SEGMENT_PART}{segment}"


def extension_of(uri: str) -> str:
    """The image extension of ``uri`` (``.nii.gz`` counts as one), lower case, or '' (a folder's series too)."""
    if split_series_uri(uri)[1]:
        return ""
    name = storage.basename(uri).lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return os.path.splitext(name)[1]


def is_seg_file(uri: str) -> bool:
    """A binary SEG named for its case (a probability SEG beside it is not a case's mask)."""
    name = uri.lower()
    return name.endswith(SEG_FILE_SUFFIX) and not name.endswith(PROBABILITY_SEG_SUFFIX)


def case_id_from_uri(uri: str) -> str:
    """The file (or DICOM series folder) name without its image extension (a SEG's: ``.seg.dcm``); for one
    series of a folder, ``<folder>_<SeriesInstanceUID>``."""
    folder, series = split_series_uri(uri)
    if series:
        return f"{storage.basename(folder)}_{series}"
    name = storage.basename(uri)
    if is_seg_file(name):
        return name[: -len(SEG_FILE_SUFFIX)]
    ext = extension_of(uri)
    if ext in SUPPORTED_EXTENSIONS:
        return name[: len(name) - len(ext)]
    return name


def is_supported(uri: str) -> bool:
    return extension_of(uri) in SUPPORTED_EXTENSIONS


def max_voxels() -> int:
    """The largest image, in voxels, this process will read: ``MEDCLIPSAM_MAX_VOXELS`` or the default."""
    return int(number_from_env(MAX_VOXELS_ENV, DEFAULT_MAX_VOXELS, 1, "voxels"))


def _check_size(size: tuple[int, ...], uri: str) -> None:
    """Refuse, from the header alone, an image with no voxels or with more than ``max_voxels()``."""
    shown = " x ".join(str(n) for n in size)
    if any(n <= 0 for n in size):
        raise InputError(f"{uri}: image has a zero-size dimension ({shown}), so it holds no pixels")
    voxels, limit = math.prod(size), max_voxels()
    if voxels > limit:
        raise InputError(f"{uri}: image of {shown} = {voxels} voxels is over the limit of {limit} voxels "
                         f"({MAX_VOXELS_ENV})")


def _header(path: str) -> sitk.ImageFileReader:
    """A reader that has read ``path``'s header only (size, geometry, pixel type), not its pixels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def _read_file(local: str, uri: str) -> sitk.Image:
    """Read one image file, after its header has passed the size checks."""
    reader = _header(local)
    _check_size(tuple(reader.GetSize()), uri)
    return reader.Execute()


def _mm(value: float) -> str:
    return f"{round(float(value), 4):g}"


def _check_dicom_geometry(headers: list[sitk.ImageFileReader], uri: str) -> None:
    """The slices of a series must make one volume: one frame of reference, size and orientation,
    evenly spaced.

    ITK would stack mixed orientations silently, and give a series with a gap one spacing (so
    the mask would be written misplaced), so these are refused before any pixel is read.
    """
    if len(headers) < 2:
        return
    frames = {h.GetMetaData(FRAME_OF_REFERENCE).strip() for h in headers if h.HasMetaDataKey(FRAME_OF_REFERENCE)}
    if len(frames) > 1:
        raise InputError(f"{uri}: DICOM series mixes {len(frames)} frames of reference (FrameOfReferenceUID), so "
                         "its slices' positions are not in one space and it is not one volume")
    sizes = [tuple(h.GetSize()[:2]) for h in headers]
    odd = next((size for size in sizes if size != sizes[0]), None)
    if odd is not None:
        raise InputError(f"{uri}: DICOM series mixes slice sizes ({sizes[0][0]} x {sizes[0][1]} and "
                         f"{odd[0]} x {odd[1]}), so it is not one volume")
    directions = [np.asarray(h.GetDirection(), dtype=np.float64) for h in headers]
    if len(directions[0]) != 9 or any(not np.allclose(d, directions[0], atol=1e-4) for d in directions):
        raise InputError(f"{uri}: DICOM series mixes slice orientations, so it is not one volume")
    axes = directions[0].reshape(3, 3)
    normal = np.cross(axes[:, 0], axes[:, 1])
    positions = np.sort([float(np.dot(h.GetOrigin(), normal)) for h in headers])
    steps = np.diff(positions)
    if steps.min() < 1e-3:
        raise InputError(f"{uri}: two DICOM slices share the position {_mm(positions[np.argmin(steps)])} mm, "
                         "so the series is not one volume")
    if steps.max() - steps.min() > DICOM_STEP_TOLERANCE * steps.min():
        raise InputError(f"{uri}: DICOM slice positions are not evenly spaced (steps from {_mm(steps.min())} to "
                         f"{_mm(steps.max())} mm), so a slice is missing or misplaced")


@contextlib.contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """ITK prints warnings (with its C++ file and line) to stderr; where we raise a sentence of our
    own for the same problem, that print is only noise."""
    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def _series_file_names(local: str, uri: str) -> tuple[str, ...]:
    """The files of the series ``local`` names (``series_uri``), sorted by GDCM along the slice normal; of a
    plain folder, its longest series (the scan: others are usually localisers)."""
    folder, wanted = split_series_uri(local)
    with _itk_warnings_off():  # "No Series were found" for a folder without DICOM files
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series:
        raise InputError(f"{uri}: folder holds no DICOM series")
    if wanted and wanted not in series:
        raise InputError(f"{uri}: the folder holds no DICOM series {wanted} (it holds {', '.join(series[:3])}"
                         f"{' and more' if len(series) > 3 else ''})")
    if wanted:
        return sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, wanted)
    return max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, s) for s in series), key=len)


def _dicom_series(folder: str, uri: str) -> tuple[list[str], list[sitk.ImageFileReader], tuple[int, ...]]:
    """The scan's slice files, their headers and the volume's size (x, y, z), every header check passed;
    ``folder`` is a local folder or one series of it (``series_uri``)."""
    names = _series_file_names(folder, uri)
    headers = [_header(name) for name in names]
    _check_dicom_geometry(headers, uri)
    first = tuple(headers[0].GetSize())
    size = (*first[:2], (first[2] if len(first) > 2 else 1) * len(names))
    _check_size(size, uri)
    return list(names), headers, size


def dicom_series_files(folder: str, uri: str) -> list[str]:
    """The files of a DICOM folder's scan (or of the series a ``series_uri`` names) in the order of the
    volume's slices (``read_image``'s z)."""
    return _dicom_series(folder, uri)[0]


def _read_dicom_series(folder: str, uri: str) -> tuple[sitk.Image, tuple[str, str]]:
    names, headers, _ = _dicom_series(folder, uri)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    return reader.Execute(), _dicom_identity(headers[0])


def _dicom_identity(header: sitk.ImageFileReader | sitk.Image) -> tuple[str, str]:
    """The series and frame-of-reference UIDs of a DICOM header ("" where absent)."""
    return tuple(header.GetMetaData(key).strip() if header.HasMetaDataKey(key) else ""  # type: ignore[return-value]
                 for key in (SERIES_UID, FRAME_OF_REFERENCE))


_SITK_PREFIX = re.compile(r"Exception thrown in SimpleITK \w+:\s*")
_CPP_LOCATION = re.compile(r"\S+\.(?:cxx|cpp|cc|hxx|hpp|txx|h)(?::\d+)+:?")
_ERROR_TAG = re.compile(r"(?:sitk::ERROR|itk::ERROR|ITK ERROR):\s*")
_OBJECT_ID = re.compile(r"\w+ ?\(0x[0-9a-fA-F]+\):?\s*")
_METHOD = re.compile(r"^(?:ReadImageInformation|Read|Execute|Update|GenerateOutputInformation|GenerateData):\s*")
_NOISE_LINE = re.compile(r"^(?:itk::ExceptionObject|Location:|File:|Line:)")
_LIBRARY_LINE = re.compile(r"^\[\w+\]\s*(?:\w+:\s*)?")  # teem's "[nrrd] _function: reason" chain


def reader_reason(exc: Exception, local: str, uri: str) -> str:
    """SimpleITK's reason for a failed read, as a phrase: without the C++ file and line, object
    addresses and error tags, with the local (temporary) path shown as the file's name."""
    text = str(exc)
    if len(local) > 1:
        text = text.replace(local.rstrip("/"), storage.basename(uri))
    main: list[str] = []
    details: list[str] = []
    for raw in text.splitlines():
        line = _OBJECT_ID.sub("", _ERROR_TAG.sub("", _CPP_LOCATION.sub("", _SITK_PREFIX.sub("", raw)))).strip()
        line = line.removeprefix("Description:").strip()
        if not line or _NOISE_LINE.match(line):
            continue
        if _LIBRARY_LINE.match(line):
            detail = _LIBRARY_LINE.sub("", line)
            if detail:
                details.append(detail)
        else:
            main.append(_METHOD.sub("", line))
    reason = " ".join(main)
    if details:  # the innermost step of a library's chain says what was wrong
        reason = f"{reason.rstrip(': ')}: {details[-1]}" if reason else details[-1]
    reason = re.sub(r"\s+", " ", reason).strip().rstrip(":")
    return shorten(reason) or type(exc).__name__


def _decoder_reason(exc: Exception, local: str, uri: str) -> str:
    """Why a file could not be read. For 2D formats SimpleITK often says only "Error while reading
    file", so PIL (which decodes the same formats) is asked: "image file is truncated", "cannot
    identify image file" name the problem."""
    reason = reader_reason(exc, local, uri)
    if extension_of(uri) not in IMAGE_2D_EXTENSIONS or not os.path.isfile(local):
        return reason
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(local) as picture:
            picture.load()
    except UnidentifiedImageError:
        return f"not a {extension_of(uri).lstrip('.').upper()} image, or an encoding the reader lacks"
    except (OSError, ValueError, SyntaxError) as exc_pil:  # PIL's reasons: truncated, broken chunk, bad header
        return shorten(str(exc_pil).replace(local, storage.basename(uri))) or reason
    return reason


def non_finite_count(array: np.ndarray) -> int:
    """NaN and infinite values in ``array``; 0 for integer pixel types, which cannot hold them."""
    if array.dtype.kind not in "fc":
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_finite(array: np.ndarray, uri: str, where: str = "") -> int:
    """Refuse an image (or the part ``where`` names) that is mostly NaN or infinite: a window over
    what is left would show nothing real. Returns how many values are not finite."""
    count = non_finite_count(array)
    if count > MAX_NON_FINITE_SHARE * array.size:
        raise InputError(f"{uri}: {count} of {array.size} voxels{where} are NaN or infinite (more than half), "
                         "so there is nothing to segment")
    return count


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
        raise InputError(unsupported_image(uri, dim, ncomp))
    return MedicalImage(
        array, True, tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()), uri
    )


def unsupported_image(uri: str, dim: int, ncomp: int) -> str:
    return (f"{uri}: unsupported image: {dim}D with {ncomp} component(s) per pixel; supported are 2D images (grey, "
            "grey + alpha, RGB or RGBA) and 3D volumes with one value per voxel (split a 4D series or a "
            "multi-channel volume into 3D volumes first)")


@dataclass(frozen=True)
class ImageHeader:
    """What ``read_image`` would give, from the header alone: the array's shape and whether it is a volume."""

    shape: tuple[int, ...]  # ``H x W`` for 2D images, ``Z x Y x X`` for volumes
    is_volume: bool


def _check_input(uri: str) -> bool:
    """The checks every read starts with; True for a (DICOM series) folder or one series of a folder."""
    folder, series = split_series_uri(uri)
    if not storage.exists(folder):
        raise InputError(f"{uri}: no such file or object")
    is_dir = storage.isdir(folder)
    if series and not is_dir:
        raise InputError(f"{uri}: names a series of {folder}, which is not a folder")
    ext = extension_of(uri)
    if not is_dir and ext not in SUPPORTED_EXTENSIONS:
        raise InputError(
            f"{uri}: unsupported extension '{ext or '(none)'}'; supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    return is_dir


def read_header(uri: str) -> ImageHeader:
    """The shape ``read_image`` would give, its pixels unread, so a run's plan can check prompts
    against every prompted image before any model loads. Refuses what ``read_image`` refuses on
    its header (size limits, DICOM geometry, unsupported dimensions)."""
    is_dir = _check_input(uri)
    with storage.local_copy(uri) as local:
        try:
            if is_dir:
                _, headers, size = _dicom_series(local, uri)
                dim, ncomp = 3, headers[0].GetNumberOfComponents()
            else:
                reader = _header(local)
                size, dim, ncomp = tuple(reader.GetSize()), reader.GetDimension(), reader.GetNumberOfComponents()
                _check_size(size, uri)
        except RuntimeError as exc:
            raise InputError(f"{uri}: cannot read image ({_decoder_reason(exc, local, uri)})") from exc
    if dim == 3 and size[2] == 1 and not is_dir and extension_of(uri) in DICOM_EXTENSIONS:
        dim = 2  # one DICOM frame, as read_image takes it
    if dim == 2:
        return ImageHeader((size[1], size[0]), False)
    if dim != 3 or ncomp != 1:
        raise InputError(unsupported_image(uri, dim, ncomp))
    return ImageHeader((size[2], size[1], size[0]), True)


def read_image(uri: str) -> MedicalImage:
    """Read a 2D image, a volume or a DICOM series folder from a path or URI."""
    is_dir = _check_input(uri)
    ext = extension_of(uri)
    identity = ("", "")
    with storage.local_copy(uri) as local:
        try:
            if is_dir:
                image, identity = _read_dicom_series(local, uri)
            else:
                image = _read_file(local, uri)
                identity = _dicom_identity(image) if ext in DICOM_EXTENSIONS else identity
        except RuntimeError as exc:  # SimpleITK reports unreadable files as RuntimeError
            raise InputError(f"{uri}: cannot read image ({_decoder_reason(exc, local, uri)})") from exc
    result = _to_medical_image(
        image, uri, force_2d=ext in IMAGE_2D_EXTENSIONS and image.GetDimension() == 2,
        single_frame_is_2d=not is_dir and ext in DICOM_EXTENSIONS,
    )
    result.series_uid, result.frame_of_reference = identity
    # A few NaN/Inf voxels are left to the windowing, which ignores them; most of them is an error.
    values = result.array
    if check_finite(values, uri):
        values = values[np.isfinite(values)]
    if values.min() == values.max():
        raise InputError(f"{uri}: image is constant (every pixel is {values.flat[0]}); nothing to segment")
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


def read_mask(uri: str, like: MedicalImage | None = None, segment: int | str | None = None) -> MedicalImage:
    """Read a mask (any supported format) as a boolean array with its geometry.

    A DICOM SEG (``<case_id>.seg.dcm``) has no grid of its own beyond its frames: it is mapped onto
    ``like``, the image (or mask) it is compared with; ``segment`` picks one of several segments by
    number or label, and so does a ``#segment=`` ending of ``uri`` (``segment_uri``)."""
    path, part = storage.split_part(uri)
    if part.startswith(SEGMENT_PART) and is_seg_file(path):
        uri, segment = path, part.removeprefix(SEGMENT_PART)
    if not storage.exists(uri):
        raise InputError(f"{uri}: no such file or object")
    if is_seg_file(uri):
        from .seg_truth import read_seg_mask  # highdicom takes a second to import: only for a SEG

        return read_seg_mask(uri, like, segment)
    with storage.local_copy(uri) as local:
        try:
            image = _read_file(local, uri)
        except RuntimeError as exc:
            raise InputError(f"{uri}: cannot read mask ({_decoder_reason(exc, local, uri)})") from exc
    ext = extension_of(uri)
    result = _to_medical_image(image, uri, force_2d=ext in IMAGE_2D_EXTENSIONS,
                               single_frame_is_2d=ext in DICOM_EXTENSIONS)
    array = result.array
    if array.ndim == 3 and not result.is_volume:
        array = array.max(axis=-1)
    result.array = array > 0
    return result
