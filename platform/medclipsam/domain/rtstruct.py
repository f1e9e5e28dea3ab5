"""Masks as DICOM RT Structure Sets, for the treatment-planning systems that read only RTSTRUCT.

One ROI (the task's segment) holds, for every source slice with foreground, the closed planar
contours of that slice's mask: the iso-line at 0.5 between foreground and background pixel centres
(scikit-image), with collinear points dropped, so a reader that fills each slice's contours even-odd
(an inner contour is a hole) gets the mask's pixels back. Each contour is placed in patient space
through its own slice's Image Plane attributes (position, orientation, pixel spacing: rows, then
columns), so anisotropic pixels and oblique or unevenly spaced series need no volume-wide affine.

pydicom writes the object: rt-utils, the usual library, maps the column index with the row spacing
(its issue 92, open), which distorts every structure on anisotropic pixels.
"""

from __future__ import annotations

import datetime

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, RTStructureSetStorage, generate_uid
from skimage.measure import approximate_polygon, find_contours

from .. import __version__, storage
from ..errors import InputError
from .dicom_sources import save_dataset, source_datasets
from .mask_formats import Segment

MANUFACTURER = "medclipsam"
RTSTRUCT_SERIES_NUMBER = 901  # beside the SEG's 900
ROI_COLOUR = (230, 159, 0)  # Okabe-Ito orange, as the report draws masks
# Copied from the source when it has them; type 2 (present, maybe empty) in the RT Structure Set IOD.
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                 "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription")
PLANE = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "FrameOfReferenceUID")


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """A 2D mask's closed contours as (row, column) pixel coordinates, last point not repeated."""
    padded = np.pad(mask > 0, 1)  # so that contours touching the border close
    contours = []
    for contour in find_contours(padded.astype(np.float32), 0.5):
        points = approximate_polygon(contour, tolerance=0)[:-1] - 1  # lossless: collinear points only
        if len(points) >= 3:
            contours.append(points)
    return contours


def to_patient(points: np.ndarray, source: pydicom.Dataset) -> np.ndarray:
    """(row, column) pixel coordinates of ``source`` as patient-space millimetres (x, y, z)."""
    position = np.asarray(source.ImagePositionPatient, dtype=float)
    orientation = np.asarray(source.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in source.PixelSpacing)
    along_row, along_column = orientation[:3], orientation[3:]  # the directions of increasing column, row
    return (position + np.outer(points[:, 1] * column_spacing, along_row)
            + np.outer(points[:, 0] * row_spacing, along_column))


def _check_plane(sources: list[pydicom.Dataset], uri: str) -> None:
    """Contours live in patient space: every slice needs its plane and frame of reference."""
    missing = sorted({name for ds in sources for name in PLANE if name not in ds})
    if missing:
        raise InputError(f"{uri}: no RTSTRUCT, since the source has no patient geometry "
                         f"({', '.join(missing)} missing): use dicom-seg or nifti")


def _image_reference(source: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    return item


def _contour(points: np.ndarray, source: pydicom.Dataset, number: int) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ContourImageSequence = Sequence([_image_reference(source)])
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(points)
    item.ContourNumber = number
    item.ContourData = [round(float(v), 4) for v in to_patient(points, source).ravel()]
    return item


def _frames(mask: np.ndarray, sources: list[pydicom.Dataset], uri: str) -> np.ndarray:
    frames = mask[np.newaxis] if mask.ndim == 2 else mask
    if frames.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise ValueError(f"{uri}: mask shape {mask.shape} does not fit {len(sources)} slice(s) of "
                         f"{sources[0].Rows} x {sources[0].Columns}")
    return frames


def _roi_contours(frames: np.ndarray, sources: list[pydicom.Dataset]) -> pydicom.Dataset:
    contours = [(points, source) for frame, source in zip(frames, sources, strict=True)
                for points in slice_contours(frame)]
    roi = pydicom.Dataset()
    roi.ReferencedROINumber = 1
    roi.ROIDisplayColor = list(ROI_COLOUR)
    roi.ContourSequence = Sequence([_contour(points, source, number)
                                    for number, (points, source) in enumerate(contours, start=1)])
    return roi


def _header(sources: list[pydicom.Dataset], description: str) -> pydicom.Dataset:
    """Patient, study and frame of reference of the source; series, equipment and SOP of a new RT Structure Set."""
    first, now = sources[0], datetime.datetime.now()
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for name in PATIENT_STUDY:
        setattr(ds, name, first.get(name, ""))
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), RTSTRUCT_SERIES_NUMBER
    ds.SeriesDescription, ds.OperatorsName = description[:64], ""
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = MANUFACTURER, MANUFACTURER, __version__
    ds.StructureSetLabel, ds.StructureSetName = MANUFACTURER, description[:64]
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    return ds


def _references(sources: list[pydicom.Dataset]) -> pydicom.Dataset:
    """The frame of reference, and in it the study, series and every slice the contours lie on."""
    first = sources[0]
    series = pydicom.Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = Sequence([_image_reference(source) for source in sources])
    study = pydicom.Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management, as the standard asks
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = pydicom.Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = Sequence([study])
    return frame


def _roi(segment: Segment, frame_of_reference: str) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    roi = pydicom.Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID = 1, frame_of_reference
    roi.ROIName = segment.label[:64]
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = f"{MANUFACTURER} {__version__}"[:64]
    observation = pydicom.Dataset()
    observation.ObservationNumber, observation.ReferencedROINumber = 1, 1
    observation.RTROIInterpretedType, observation.ROIInterpreter = "", ""  # an algorithm's, not a clinician's
    return roi, observation


def structure_set(mask: np.ndarray, sources: list[pydicom.Dataset], segment: Segment, description: str,
                  uri: str = "") -> pydicom.FileDataset:
    """The RTSTRUCT of ``mask`` (``sources``' slices, in order) with one ROI named for ``segment``."""
    _check_plane(sources, uri)
    frames = _frames(mask, sources, uri)
    ds = _header(sources, description)
    ds.ReferencedFrameOfReferenceSequence = Sequence([_references(sources)])
    roi, observation = _roi(segment, sources[0].FrameOfReferenceUID)
    ds.StructureSetROISequence = Sequence([roi])
    ds.ROIContourSequence = Sequence([_roi_contours(frames, sources)])
    ds.RTROIObservationsSequence = Sequence([observation])
    ds.ApprovalStatus = "UNAPPROVED"  # a machine's structures, for a person to review
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian  # long contours outgrow explicit VR's 64 KiB DS values
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    return pydicom.FileDataset(None, ds, file_meta=meta, preamble=b"\0" * 128)


def write_rtstruct(mask: np.ndarray, source_uri: str, uri: str, segment: Segment, description: str) -> None:
    """Write ``mask`` (``read_image(source_uri)``'s shape) as an RTSTRUCT at ``uri``, atomically."""
    with storage.local_copy(source_uri) as local:
        rtstruct = structure_set(mask, source_datasets(local, source_uri), segment, description, source_uri)
    save_dataset(rtstruct, uri)
