"""A DICOM SEG as a ground-truth mask: a truth exported from a PACS scores as it is.

A SEG holds frames at patient-space positions, often only those with foreground, so it has no full
grid of its own. It is laid onto the grid of the image it labels (or the mask it is compared with)
through its geometry: each voxel of that grid takes the SEG's value at its centre (nearest). When
the image is itself DICOM, the SEG must reference that image's series and share its frame of
reference, or its positions would mean nothing there.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk

from .. import storage
from ..errors import InputError, describe
from .images import MedicalImage, mask_to_sitk


def _read(uri: str, local: str) -> hd.seg.Segmentation:
    try:
        return hd.seg.segread(local)
    except (pydicom.errors.InvalidDicomError, AttributeError, ValueError, OSError) as exc:
        raise InputError(f"{uri}: not a DICOM SEG ({describe(exc)})") from exc


def choose_segment(seg: hd.seg.Segmentation, uri: str, segment: int | str | None) -> int:
    """The segment number asked for (a number or a label), or the only one."""
    described = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    listing = ", ".join(f"{number} '{label}'" for number, label in sorted(described.items()))
    if segment is None or segment == "":
        if len(described) == 1:
            return next(iter(described))
        raise InputError(f"{uri}: the SEG holds {len(described)} segments ({listing}); choose one by number or "
                         "label with --gt-segment")
    if str(segment).isdigit() and int(segment) in described:
        return int(segment)
    matches = [number for number, label in described.items() if label.lower() == str(segment).lower()]
    if len(matches) != 1:
        raise InputError(f"{uri}: no segment '{segment}' in the SEG (it holds {listing})")
    return matches[0]


def _check_references(seg: hd.seg.Segmentation, uri: str, like: MedicalImage) -> None:
    if like.series_uid:
        referenced = {series for _, series, _ in seg.get_source_image_uids()}
        if like.series_uid not in referenced:
            raise InputError(f"{uri}: the SEG references series {', '.join(sorted(referenced)) or '(none)'}, not "
                             f"the series of {like.uri} ({like.series_uid}), so it labels another scan")
    frame = str(seg.get("FrameOfReferenceUID", ""))
    if like.frame_of_reference and frame and frame != like.frame_of_reference:
        raise InputError(f"{uri}: the SEG's frame of reference {frame} is not that of {like.uri} "
                         f"({like.frame_of_reference}), so its positions cannot be placed on it")


def _on_grid(seg: hd.seg.Segmentation, number: int, like: MedicalImage) -> np.ndarray:
    if not like.is_volume:  # one frame: the SEG's frame over the image's single source instance
        (_, _, instance), *more = seg.get_source_image_uids()
        frame = seg.get_pixels_by_source_instance([instance], segment_numbers=[number], combine_segments=True)[0]
        if more or frame.shape != like.array.shape[:2]:
            raise InputError(f"{like.uri}: the SEG's frames ({1 + len(more)} of {frame.shape}) do not fit this "
                             f"2D image of {like.array.shape[:2]}")
        return frame > 0
    volume = seg.get_volume(segment_numbers=[number], combine_segments=True)
    grid = mask_to_sitk(np.zeros(like.array.shape, np.uint8), like)
    placed = sitk.Resample(volume.to_simpleitk(), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(placed) > 0


def read_seg_mask(uri: str, like: MedicalImage | None, segment: int | str | None = None) -> MedicalImage:
    """Segment ``segment`` of the SEG at ``uri`` on ``like``'s grid, as ``read_mask`` returns a mask."""
    if like is None:
        raise InputError(f"{uri}: a DICOM SEG is read onto the image it labels, and there is none here; "
                         "give the truth as NIfTI, NRRD or PNG")
    with storage.local_copy(uri) as local:
        seg = _read(uri, local)
    number = choose_segment(seg, uri, segment)
    _check_references(seg, uri, like)
    try:
        array = _on_grid(seg, number, like)
    except (ValueError, RuntimeError) as exc:  # highdicom: frames that make no regular volume
        raise InputError(f"{uri}: cannot lay the SEG onto {like.uri} ({describe(exc)})") from exc
    return MedicalImage(array, like.is_volume, like.spacing, like.origin, like.direction, uri,
                        like.series_uid, like.frame_of_reference)
