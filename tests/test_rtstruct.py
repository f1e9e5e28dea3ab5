"""Masks as RT Structure Sets: the standard's validator (dciodvfy) finds no error, and the contours,
filled back onto the series through SimpleITK's geometry (not the attributes the writer used), give
the mask's voxels exactly, on brain1 as an axial series and as an oblique series of anisotropic
pixels (where rt-utils' swapped spacing would misplace them), on a mask with holes and diagonal
neighbours, and on a single-frame image."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_series import rasterise_rtstruct, write_mr_series
from test_dicom_seg import _on_grid, _rotation, dciodvfy

from medclipsam import __version__
from medclipsam.domain.images import read_image
from medclipsam.domain.mask_formats import Segment
from medclipsam.domain.rtstruct import slice_contours, write_rtstruct
from medclipsam.errors import InputError

TUMOUR = Segment("brain tumour", ("49755003", "SCT", "Morphologically Abnormal Structure"),
                 ("108369006", "SCT", "Neoplasm"))


def _errors(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module", params=["axial", "oblique-anisotropic"])
def brain(request, samples_root, tmp_path_factory):
    volume = sitk.ReadImage(str(samples_root / "images" / "brain1.nrrd"))
    label = sitk.ReadImage(str(samples_root / "labels" / "brain1.nrrd"))
    if request.param != "axial":
        for image in (volume, label):
            image.SetSpacing((0.6, 1.1, 6.5))  # columns 0.6 mm apart, rows 1.1 mm
            image.SetDirection(_rotation(math.radians(20), math.radians(10)))
    folder = tmp_path_factory.mktemp(request.param) / "series"
    uids = write_mr_series(volume, folder)
    return folder, uids, label


def test_rtstruct_is_valid_and_its_contours_fill_back_to_the_mask(brain, tmp_path):
    folder, uids, label = brain
    image = read_image(str(folder))
    mask = _on_grid(label, image)
    assert mask.sum() > 500
    path = tmp_path / "brain1.rtstruct.dcm"
    write_rtstruct(mask, str(folder), str(path), TUMOUR, "medclipsam brain_tumor_mri: labels prompts")

    report = dciodvfy(path)
    assert "RTStructureSet" in report and not _errors(report), report
    filled, off_plane = rasterise_rtstruct(path, folder)
    np.testing.assert_array_equal(filled, mask)  # exact: the contours run half-way between pixel centres
    assert off_plane < 1e-3  # each contour lies in the plane of the slice it references

    ds, source = pydicom.dcmread(path), pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    for name in ("PatientName", "PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert ds[name].value == source[name].value, name
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.Modality == "RTSTRUCT"
    roi = ds.StructureSetROISequence[0]
    assert (roi.ROIName, roi.ROIGenerationAlgorithm) == ("brain tumour", "AUTOMATIC")
    assert ds.SoftwareVersions == __version__ and ds.SeriesDescription.endswith("labels prompts")
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in series.ContourImageSequence} == set(uids)
    contoured = {c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in ds.ROIContourSequence[0].ContourSequence}
    truth = sitk.GetArrayFromImage(label) > 0  # in the writer's slice order: uids[z] is slice z
    assert contoured == {uids[z] for z in np.flatnonzero(truth.any(axis=(1, 2)))}


def test_holes_and_diagonal_neighbours_come_back_exactly(tmp_path):
    mask = np.zeros((3, 40, 50), bool)
    mask[0, 5:30, 5:30] = True
    mask[0, 12:20, 12:20] = False  # a hole: an inner contour, filled even-odd
    mask[0, 14:16, 14:16] = True  # an island in the hole
    mask[1, 10, 10] = mask[1, 11, 11] = True  # touching only at a corner: two contours
    mask[1, 0:6, 44:50] = True  # against the image's edge
    volume = sitk.GetImageFromArray((mask * 100).astype(np.int16))
    volume.SetSpacing((0.5, 1.5, 3.0))
    folder = tmp_path / "series"
    write_mr_series(volume, folder)
    write_rtstruct(read_image(str(folder)).array > 50, str(folder), str(tmp_path / "rt.dcm"), Segment("x"), "d")
    assert not _errors(dciodvfy(tmp_path / "rt.dcm"))
    filled, _ = rasterise_rtstruct(tmp_path / "rt.dcm", folder)
    np.testing.assert_array_equal(filled, mask)
    assert [len(slice_contours(frame)) for frame in mask] == [3, 3, 0]


def test_a_single_frame_image_gets_its_contour(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm"), folder / "MR_small.dcm")
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True
    write_rtstruct(mask, str(folder / "MR_small.dcm"), str(tmp_path / "rt.dcm"), Segment("mass"), "one")
    assert not _errors(dciodvfy(tmp_path / "rt.dcm"))
    filled, off_plane = rasterise_rtstruct(tmp_path / "rt.dcm", folder)
    np.testing.assert_array_equal(filled[0], mask)
    assert off_plane < 1e-3


def test_a_source_without_geometry_or_with_two_frames_of_reference_is_a_sentence(brain, tmp_path):
    flat = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    del flat.ImagePositionPatient
    flat.save_as(tmp_path / "flat.dcm")
    with pytest.raises(InputError, match=r"flat.dcm: no RTSTRUCT, since the source has no patient geometry "
                                         r"\(ImagePositionPatient missing\): use dicom-seg or nifti"):
        write_rtstruct(np.ones((64, 64), bool), str(tmp_path / "flat.dcm"), str(tmp_path / "a.dcm"),
                       Segment("m"), "d")
    folder, _, _ = brain
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    odd = sorted(mixed.iterdir())[3]
    ds = pydicom.dcmread(odd)
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    ds.save_as(odd)
    with pytest.raises(InputError, match=r"mixed: DICOM series mixes 2 frames of reference"):
        read_image(str(mixed))
    with pytest.raises(InputError, match=r"mixed: DICOM series mixes 2 frames of reference"):
        write_rtstruct(np.ones((25, 256, 256), bool), str(mixed), str(tmp_path / "b.dcm"), Segment("m"), "d")
    assert not (tmp_path / "a.dcm").exists() and not (tmp_path / "b.dcm").exists()
