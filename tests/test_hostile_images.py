"""Hostile image inputs: each ends as one clear InputError (or a documented warning), never garbage or a traceback.

Small synthetic files only: NaN voxels, a header that claims a huge size, a zero-size dimension,
unreadable files, symlinked inputs, and DICOM series with a missing slice or mixed geometry.
"""

from __future__ import annotations

import logging
import resource
import time

import numpy as np
import pytest
import SimpleITK as sitk

from medclipsam.config import ImageConfig
from medclipsam.domain.images import read_image, read_mask
from medclipsam.domain.inputs import list_cases
from medclipsam.errors import InputError
from medclipsam.pipeline.slices import CaseTask, case_slices

AXIAL = "1\\0\\0\\0\\1\\0"


def float_volume(shape=(4, 12, 10)) -> np.ndarray:
    return np.random.default_rng(3).normal(100.0, 30.0, size=shape).astype(np.float32)


def write_dicom_series(folder, positions, sizes=None, orientations=None) -> None:
    """One single-frame DICOM file per z position, all of one series (as test_images writes them)."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i, z in enumerate(positions):
        cols, rows = sizes[i] if sizes else (16, 16)
        pixels = (np.arange(rows * cols).reshape(rows, cols) % 1500 + 10 * i).astype(np.int16)
        image = sitk.GetImageFromArray(pixels)
        image.SetSpacing((0.8, 0.8))
        image.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.77")  # series instance UID
        image.SetMetaData("0020|0032", f"0\\0\\{z}")  # image position (patient)
        image.SetMetaData("0020|0037", orientations[i] if orientations else AXIAL)
        image.SetMetaData("0020|0013", str(i + 1))
        image.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(folder / f"slice{i}.dcm"))
        writer.Execute(image)


# -- NaN and infinite voxels ---------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".mha", ".nrrd", ".tif"])
def test_a_few_nan_voxels_are_ignored_by_the_window(tmp_path, ext):
    array = float_volume()[0] if ext == ".tif" else float_volume()
    array.flat[5] = np.nan
    array.flat[17] = np.inf
    path = tmp_path / f"scan{ext}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    rows = case_slices(CaseTask("scan", str(path)), ImageConfig(), "text")
    assert all(r.error == "" for r in rows)
    for row in rows:  # every slice is a real picture, not the all-black one a NaN window gives
        assert row.image.max() == 255 and row.image.min() == 0
    assert rows[0].image.reshape(-1, 3)[5].tolist() == [0, 0, 0]  # a NaN voxel is the low end


@pytest.mark.parametrize("ext", [".mha", ".nrrd", ".tif"])
def test_a_mostly_nan_image_is_an_error_row(tmp_path, ext):
    array = float_volume()[0] if ext == ".tif" else float_volume()
    array.reshape(-1)[: array.size * 3 // 4] = np.nan
    path = tmp_path / f"holes{ext}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    rows = case_slices(CaseTask("holes", str(path)), ImageConfig(), "text")
    assert len(rows) == 1
    assert rows[0].error == (f"{path}: {array.size * 3 // 4} of {array.size} voxels are NaN or infinite "
                                "(more than half), so there is nothing to segment")


def test_a_mostly_nan_slice_fails_its_case(tmp_path):
    array = float_volume()
    array[2] = np.nan  # one of 4 slices: the volume as a whole is mostly finite
    path = tmp_path / "slab.mha"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    rows = case_slices(CaseTask("slab", str(path)), ImageConfig(), "text")
    assert len(rows) == 1
    assert rows[0].error == (f"{path}: 120 of 120 voxels of slice 2 (axis 0) are NaN or infinite "
                                "(more than half), so there is nothing to segment")


# -- size limits ----------------------------------------------------------------------------------
def test_a_header_claiming_a_huge_image_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.nrrd"
    header = b"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 100000 100000\nencoding: raw\n\n"
    path.write_bytes(header + bytes(64))  # 10 GB claimed, 64 bytes there
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(InputError) as caught:
        read_image(str(path))
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # kB: no 10 GB buffer
    assert str(caught.value) == (f"{path}: image of 100000 x 100000 = 10000000000 voxels is over the limit of "
                                 "1500000000 voxels (MEDCLIPSAM_MAX_VOXELS)")
    with pytest.raises(InputError, match=r"huge\.nrrd: image of 100000 x 100000 .* over the limit"):
        read_mask(str(path))


def test_the_voxel_limit_comes_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "small.mha"
    sitk.WriteImage(sitk.GetImageFromArray(float_volume()), str(path))
    monkeypatch.setenv("MEDCLIPSAM_MAX_VOXELS", "400")
    with pytest.raises(InputError, match=r"small\.mha: image of 10 x 12 x 4 = 480 voxels is over the limit of 400"):
        read_image(str(path))
    monkeypatch.setenv("MEDCLIPSAM_MAX_VOXELS", "480")
    assert read_image(str(path)).array.shape == (4, 12, 10)
    monkeypatch.setenv("MEDCLIPSAM_MAX_VOXELS", "lots")
    with pytest.raises(InputError, match="MEDCLIPSAM_MAX_VOXELS must be a number of voxels of at least 1, got 'lots'"):
        read_image(str(path))


@pytest.mark.parametrize("name,header", [
    ("zero.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 10 0 10\nElementType = MET_FLOAT\n"
                 b"ElementDataFile = LOCAL\n"),
    ("zero.nrrd", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 10 0 10\nencoding: raw\nendian: little\n\n"),
])
def test_a_zero_size_dimension_is_a_clear_error(tmp_path, name, header):
    (tmp_path / name).write_bytes(header)
    with pytest.raises(InputError) as caught:
        read_image(str(tmp_path / name))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / name}: ")
    assert "zero" in message and ".cxx" not in message and "\n" not in message


# -- read errors keep their reason ---------------------------------------------------------------
def test_read_errors_give_the_readers_reason_without_cpp_locations(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a nifti file")
    with pytest.raises(InputError) as caught:
        read_image(str(tmp_path / "broken.nii.gz"))
    assert str(caught.value) == (f"{tmp_path}/broken.nii.gz: cannot read image "
                                 '(Unable to determine ImageIO reader for "broken.nii.gz")')
    header = b"NRRD0004\ntype: float\ndimension: 3\nsizes: 10 10 10\nencoding: raw\nendian: little\n\n"
    (tmp_path / "short.nrrd").write_bytes(header + bytes(100))
    with pytest.raises(InputError) as caught:
        read_image(str(tmp_path / "short.nrrd"))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path}/short.nrrd: cannot read image (")
    assert "fread got only 25 4-sized things, not 1000" in message
    assert ".cxx" not in message and "\n" not in message and "0x" not in message
    with pytest.raises(InputError) as caught:
        read_mask(str(tmp_path / "broken.nii.gz"))
    assert "cannot read mask (Unable to determine ImageIO reader" in str(caught.value)


# -- symlinked inputs ------------------------------------------------------------------------------
def test_symlinks_are_followed_and_broken_ones_reported(tmp_path, caplog):
    store, cohort = tmp_path / "store", tmp_path / "cohort"
    store.mkdir()
    cohort.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(float_volume()), str(store / "real.mha"))
    write_dicom_series(store / "series", [0.0, 2.5, 5.0])
    (cohort / "linked.mha").symlink_to(store / "real.mha")
    (cohort / "patient3").symlink_to(store / "series", target_is_directory=True)
    (cohort / "gone.nii.gz").symlink_to(store / "deleted.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(float_volume()), str(cohort / "plain.nrrd"))
    with caplog.at_level(logging.WARNING, logger="medclipsam.domain.inputs"):
        cases = list_cases(str(cohort))
    assert cases == {"linked": str(cohort / "linked.mha"), "patient3": str(cohort / "patient3"),
                     "plain": str(cohort / "plain.nrrd")}
    assert f"{cohort / 'gone.nii.gz'} (broken link)" in caplog.text
    assert read_image(cases["linked"]).array.shape == (4, 12, 10)
    assert read_image(cases["patient3"]).array.shape == (3, 16, 16)
    assert list_cases(str(cohort / "patient3")) == {"patient3": str(cohort / "patient3")}


# -- DICOM series with a gap or mixed geometry -----------------------------------------------------
def test_a_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    write_dicom_series(tmp_path / "gap", [0.0, 2.5, 7.5, 10.0])
    with pytest.raises(InputError) as caught:
        read_image(str(tmp_path / "gap"))
    assert str(caught.value) == (f"{tmp_path / 'gap'}: DICOM slice positions are not evenly spaced (steps from "
                                 "2.5 to 5 mm), so a slice is missing or misplaced")


def test_a_dicom_series_of_mixed_sizes_is_refused(tmp_path):
    write_dicom_series(tmp_path / "sizes", [0.0, 2.5, 5.0], sizes=[(16, 16), (20, 16), (16, 16)])
    with pytest.raises(InputError) as caught:
        read_image(str(tmp_path / "sizes"))
    assert str(caught.value) == (f"{tmp_path / 'sizes'}: DICOM series mixes slice sizes (16 x 16 and 20 x 16), "
                                 "so it is not one volume")


def test_a_dicom_series_of_mixed_orientations_is_refused(tmp_path):
    sagittal = "0\\1\\0\\0\\0\\-1"
    write_dicom_series(tmp_path / "tilted", [0.0, 2.5, 5.0], orientations=[AXIAL, sagittal, AXIAL])
    with pytest.raises(InputError) as caught:
        read_image(str(tmp_path / "tilted"))
    assert str(caught.value) == (f"{tmp_path / 'tilted'}: DICOM series mixes slice orientations, "
                                 "so it is not one volume")


def test_an_even_dicom_series_still_reads(tmp_path):
    write_dicom_series(tmp_path / "even", [5.0, 0.0, 2.5, 7.5])  # file order need not be position order
    volume = read_image(str(tmp_path / "even"))
    assert volume.array.shape == (4, 16, 16) and volume.spacing[2] == pytest.approx(2.5)
