"""A real volume written as a DICOM MR series with pydicom: every attribute of the MR Image IOD that
dciodvfy checks, the slices' positions along the volume's own direction (axial or oblique), and the
files named in a shuffled order, so that nothing downstream may rely on file names for slice order;
and an RTSTRUCT read back onto such a series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from skimage.draw import polygon2mask

ORG_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root for generated UIDs


def _decimal(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") or "0"


def write_mr_series(volume: sitk.Image, folder: Path, *, patient: str = "ANON^TEST", seed: int = 0) -> list[str]:
    """Write ``volume`` (z slices of int16 range) as one file per slice; the SOP instance UIDs in z order."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = sitk.GetArrayFromImage(volume)
    pixels = np.clip(pixels, 0, 32767).astype(np.uint16)
    direction = np.array(volume.GetDirection()).reshape(3, 3)  # columns: the x, y, z axes in patient space
    spacing, origin = np.array(volume.GetSpacing()), np.array(volume.GetOrigin())
    study, series, frame_of_reference = (generate_uid(ORG_ROOT) for _ in range(3))
    order = np.random.default_rng(seed).permutation(pixels.shape[0])
    uids = [generate_uid(ORG_ROOT) for _ in range(pixels.shape[0])]
    for z in range(pixels.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = uids[z]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = ORG_ROOT + "1"
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, uids[z]
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient, "TEST0001", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20260101", "120000", "1"
        ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series, 3, "MR"
        ds.SeriesDescription, ds.PatientPosition = "T1 test series", "HFS"
        ds.Laterality = ""  # type 2C: dciodvfy asks for it, and warns that empty means unknown
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.Manufacturer = "test"
        ds.InstanceNumber = z + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "15", "1"
        ds.ImagePositionPatient = [_decimal(v) for v in origin + direction[:, 2] * spacing[2] * z]
        ds.ImageOrientationPatient = [_decimal(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [_decimal(spacing[1]), _decimal(spacing[0])]  # row spacing (y), then column (x)
        ds.SliceThickness = _decimal(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels[z].tobytes()
        ds.save_as(folder / f"IM{order[z]:04d}.dcm", enforce_file_format=True)
    return uids


def rasterise_rtstruct(path: Path, series_folder: Path) -> tuple[np.ndarray, float]:
    """An RTSTRUCT's first ROI filled back onto the series, even-odd per slice, by a route of its own:
    SimpleITK's geometry of the series (not the Image Plane attributes the writer used) takes each
    contour point to a voxel index. Also the largest distance, in slices, of a point off its slice."""
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    volume = reader.Execute()
    slice_of = {pydicom.dcmread(name, stop_before_pixels=True).SOPInstanceUID: z for z, name in enumerate(names)}
    filled = np.zeros(sitk.GetArrayViewFromImage(volume).shape, bool)
    off_plane = 0.0
    for contour in pydicom.dcmread(path).ROIContourSequence[0].ContourSequence:
        points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
        index = np.array([volume.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points])
        z = slice_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        off_plane = max(off_plane, float(np.abs(index[:, 2] - z).max()))
        filled[z] ^= polygon2mask(filled.shape[1:], index[:, [1, 0]])  # (row, column) vertices
    return filled, off_plane
