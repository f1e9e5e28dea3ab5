"""Masks as DICOM SEG, on a real MR volume (the sample brain1) written as a DICOM series, axial and
oblique: the standard's own validator (dciodvfy) finds no error, highdicom reads back the voxels of
the NIfTI mask of the same volume, and every frame references the source slice it was computed on."""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_series import write_mr_series
from scipy import ndimage

from medclipsam import __version__
from medclipsam.domain.dicom_seg import Segment, write_dicom_seg
from medclipsam.domain.images import dicom_series_files, read_image, read_mask, write_mask
from medclipsam.domain.inputs import list_cases
from medclipsam.domain.mask_files import MaskOutput, check_dicom_sources, write_case_masks
from medclipsam.domain.mask_formats import AUTO, DICOM_SEG, FRACTIONAL_SEG, NIFTI
from medclipsam.errors import InputError


def dciodvfy(path: Path) -> str:
    """The validator's report; a missing dciodvfy fails (make test installs it), never skips."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy is not installed: `make test` installs it (apt-get install dicom3tools)", pytrace=False)
    run = subprocess.run([tool, str(path)], check=False, capture_output=True, text=True, timeout=120)
    return run.stdout + run.stderr


def _rotation(about_x: float, about_z: float) -> tuple[float, ...]:
    cx, sx, cz, sz = math.cos(about_x), math.sin(about_x), math.cos(about_z), math.sin(about_z)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return tuple((rz @ rx).ravel())


@pytest.fixture(scope="module", params=["axial", "oblique"])
def series(request, samples_root, tmp_path_factory):
    """brain1 and its tumour label, the volume as a DICOM MR series; oblique: both turned 20 and 10 degrees."""
    volume = sitk.ReadImage(str(samples_root / "images" / "brain1.nrrd"))
    label = sitk.ReadImage(str(samples_root / "labels" / "brain1.nrrd"))
    if request.param == "oblique":
        for image in (volume, label):
            image.SetDirection(_rotation(math.radians(20), math.radians(10)))
    folder = tmp_path_factory.mktemp(request.param) / "series"
    uids = write_mr_series(volume, folder)
    return request.param, folder, uids, label


def _on_grid(label: sitk.Image, image) -> np.ndarray:
    """The label resampled (nearest) onto the grid ``read_image`` gave the series: the mask a run computes."""
    grid = sitk.Image(*reversed(image.array.shape), sitk.sitkUInt8)
    grid.SetSpacing(image.spacing)
    grid.SetOrigin(image.origin)
    grid.SetDirection(image.direction)
    return sitk.GetArrayFromImage(sitk.Resample(label, grid, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0


def test_seg_is_valid_and_gives_back_the_nifti_voxels_slice_by_source_slice(series, tmp_path):
    kind, folder, uids, label = series
    image = read_image(str(folder))
    mask = _on_grid(label, image)
    truth = sitk.GetArrayFromImage(label) > 0  # in the order the series was written (uids)
    assert mask.sum() == truth.sum() > 500  # the grid is the label's own, in the reader's slice order
    seg_path, nifti_path = tmp_path / "brain1.seg.dcm", tmp_path / "brain1.nii.gz"
    tumour = Segment("brain tumour", ("49755003", "SCT", "Morphologically Abnormal Structure"),
                     ("108369006", "SCT", "Neoplasm"))
    write_dicom_seg(mask, str(folder), str(seg_path), tumour, "medclipsam brain_tumor: labels")
    write_mask(mask, image, str(nifti_path))

    report = dciodvfy(seg_path)
    assert "Segmentation" in report and not [line for line in report.splitlines() if line.startswith("Error")], report

    seg = hd.seg.segread(seg_path)
    assert seg.NumberOfFrames == int(truth.any(axis=(1, 2)).sum())  # empty slices left out
    by_source = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], combine_segments=True,
                                                  assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(by_source > 0, truth)
    reader_order = [pydicom.dcmread(name, stop_before_pixels=True).SOPInstanceUID
                    for name in dicom_series_files(str(folder), str(folder))]
    nifti = read_mask(str(nifti_path)).array
    np.testing.assert_array_equal(seg.get_pixels_by_source_instance(
        reader_order, segment_numbers=[1], combine_segments=True, assert_missing_frames_are_empty=True) > 0, nifti)

    sources = {uid: pydicom.dcmread(path, stop_before_pixels=True)
               for path in folder.iterdir() for uid in [pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID]}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        referenced = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[referenced].ImagePositionPatient], atol=1e-4)
    source = next(iter(sources.values()))
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert getattr(seg, keyword) == getattr(source, keyword), keyword
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.SOPInstanceUID not in sources
    assert (seg.Manufacturer, seg.SoftwareVersions, seg.SeriesDescription) == (
        "medclipsam", __version__, "medclipsam brain_tumor: labels")
    described = seg.SegmentSequence[0]
    assert (described.SegmentLabel, described.SegmentAlgorithmType) == ("brain tumour", "AUTOMATIC")
    assert described.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # SNOMED CT neoplasm
    algorithm = described.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("medclipsam", __version__)
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    if kind == "oblique":
        orientation = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                       .ImageOrientationPatient]
        assert min(abs(v) for v in orientation if abs(v) > 1e-6) < 0.99  # truly oblique, not axial


def test_single_frame_image_gets_a_one_frame_seg(tmp_path):
    source = Path(pydicom.data.get_testdata_file("MR_small.dcm"))
    image = read_image(str(source))
    assert not image.is_volume and image.array.shape[:2] == (64, 64)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True
    write_dicom_seg(mask, str(source), str(tmp_path / "one.seg.dcm"), Segment("mass"), "medclipsam one")
    report = dciodvfy(tmp_path / "one.seg.dcm")
    assert not [line for line in report.splitlines() if line.startswith("Error")], report
    seg = hd.seg.segread(tmp_path / "one.seg.dcm")
    uid = pydicom.dcmread(source).SOPInstanceUID
    back = seg.get_pixels_by_source_instance([uid], segment_numbers=[1], combine_segments=True)
    np.testing.assert_array_equal(back[0] > 0, mask)


def test_a_mask_that_does_not_fit_its_source_or_a_source_that_is_not_dicom_is_a_sentence(series, tmp_path):
    _, folder, uids, _ = series
    with pytest.raises(ValueError, match=rf"mask shape \(3, 8, 8\) does not fit {len(uids)} slice\(s\) of 256 x 256"):
        write_dicom_seg(np.zeros((3, 8, 8), bool), str(folder), str(tmp_path / "x.dcm"), Segment("m"), "d")
    not_dicom = tmp_path / "scan.dcm"
    not_dicom.write_bytes(b"not a DICOM file at all")
    with pytest.raises(InputError, match=r"scan.dcm: cannot read the DICOM source of the mask \("):
        write_dicom_seg(np.zeros((8, 8), bool), str(not_dicom), str(tmp_path / "y.dcm"), Segment("m"), "d")
    assert not (tmp_path / "x.dcm").exists() and not (tmp_path / "y.dcm").exists()


def test_a_probability_seg_holds_the_probabilities_within_its_quantisation(series, tmp_path, caplog):
    """``fractional-seg`` beside the binary SEG, as weak predict writes them: each voxel's stored value is
    round(255 p), so reading it back gives p within 1/510; frames whose p all round to 0 are left out."""
    _, folder, _, label = series
    image = read_image(str(folder))
    mask = _on_grid(label, image)
    distance = ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)
    p = (1.0 / (1.0 + np.exp(distance / 2.0))).astype(np.float32)  # a soft tumour: 1/2 on its boundary
    p[p < 1e-3] = 0.0
    p[~mask.any(axis=(1, 2))] = 0.0  # slices without tumour: no frame
    settings = MaskOutput((NIFTI, DICOM_SEG, FRACTIONAL_SEG), Segment("tumour"), "medclipsam weak ensemble")
    written = write_case_masks(p > 0.5, image, str(folder), str(tmp_path), "brain1", settings, p)
    assert written.formats == ["nifti", "dicom-seg", "fractional-seg"] and not written.warnings
    path = tmp_path / "masks" / "brain1.prob.seg.dcm"
    report = dciodvfy(path)
    assert "Segmentation" in report and not [line for line in report.splitlines() if line.startswith("Error")], report

    seg = hd.seg.segread(path)
    assert (seg.SegmentationType, seg.SegmentationFractionalType, seg.MaximumFractionalValue) == (
        "FRACTIONAL", "PROBABILITY", 255)
    assert seg.SeriesDescription == "medclipsam weak ensemble (probability)" and seg.SeriesNumber == 902
    order = [pydicom.dcmread(name, stop_before_pixels=True).SOPInstanceUID
             for name in dicom_series_files(str(folder), str(folder))]
    back = seg.get_pixels_by_source_instance(order, segment_numbers=[1], assert_missing_frames_are_empty=True)[..., 0]
    assert back.dtype.kind == "f" and 0.0 < np.abs(back - p).max() <= 1 / 510 + 1e-6
    stored = seg.get_pixels_by_source_instance(order, segment_numbers=[1], rescale_fractional=False)[..., 0]
    np.testing.assert_array_equal(stored, np.round(p * 255))
    binary = hd.seg.segread(tmp_path / "masks" / "brain1.seg.dcm")
    assert seg.NumberOfFrames == binary.NumberOfFrames == int(mask.any(axis=(1, 2)).sum()) < len(order)
    assert binary.SegmentationType == "BINARY" and binary.SeriesInstanceUID != seg.SeriesInstanceUID
    with caplog.at_level(logging.WARNING, logger="medclipsam.domain.inputs"):  # a run's own objects: no warning
        assert list_cases(str(tmp_path / "masks")) == {"brain1": str(tmp_path / "masks" / "brain1.nii.gz")}
    assert "skipped" not in caplog.text


def test_only_a_run_with_probabilities_takes_the_probability_format(series, tmp_path):
    _, folder, _, _ = series
    settings = MaskOutput((AUTO, FRACTIONAL_SEG))
    with pytest.raises(InputError, match=r"^--mask-format fractional-seg writes the probabilities of weak "
                                         r"predict's ensemble, and SAM's masks \(segment, pseudolabel\) have none"):
        check_dicom_sources(settings, [str(folder)])
    check_dicom_sources(settings, [str(folder)], probabilities=True)
