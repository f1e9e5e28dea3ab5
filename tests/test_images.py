"""Reading images and writing masks: geometry round trips, formats, URIs, bad input."""

import numpy as np
import pytest
import SimpleITK as sitk

from medclipsam import storage
from medclipsam.domain.images import case_id_from_uri, read_image, read_mask, write_mask
from medclipsam.domain.inputs import list_cases
from medclipsam.errors import InputError

DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90 degree rotation about z


def make_volume(path, shape=(6, 20, 30), spacing=(0.7, 0.9, 3.5), origin=(-12.5, 40.0, 7.25)):
    rng = np.random.default_rng(1)
    array = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path))
    return array


@pytest.mark.parametrize("source_ext,mask_ext", [(".nii.gz", ".nii.gz"), (".nrrd", ".nii.gz"), (".nrrd", ".nrrd"),
                                                 (".mha", ".nii.gz")])
def test_volume_mask_round_trip_keeps_geometry(tmp_path, source_ext, mask_ext):
    array = make_volume(tmp_path / f"case{source_ext}")
    image = read_image(str(tmp_path / f"case{source_ext}"))
    assert image.is_volume and image.array.shape == (6, 20, 30)
    np.testing.assert_array_equal(image.array, array)
    mask = np.zeros(image.array.shape, np.uint8)
    mask[2:4, 5:9, 10:20] = 1
    out = tmp_path / f"mask{mask_ext}"
    write_mask(mask, image, str(out))
    back = sitk.ReadImage(str(out))
    np.testing.assert_allclose(back.GetSpacing(), (0.7, 0.9, 3.5), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), (-12.5, 40.0, 7.25), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), DIRECTION, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), mask)
    assert not list(tmp_path.glob(".tmp-*")), "temporary files left behind"


def test_png_grey_rgb_and_16bit(tmp_path):
    grey = np.arange(40 * 30, dtype=np.uint8).reshape(40, 30)
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(tmp_path / "g.png"))
    rgb = np.stack([grey, grey[::-1], 255 - grey], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "c.png"))
    wide = (np.arange(40 * 30).reshape(40, 30) * 50).astype(np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(wide), str(tmp_path / "w.tif"))
    g, c, w = (read_image(str(tmp_path / n)) for n in ("g.png", "c.png", "w.tif"))
    assert not g.is_volume and g.array.dtype == np.uint8
    np.testing.assert_array_equal(g.array, grey)
    np.testing.assert_array_equal(c.array, rgb)
    assert w.array.dtype == np.uint16
    np.testing.assert_array_equal(w.array, wide)


def test_png_mask_is_0_255(tmp_path):
    grey = np.random.default_rng(0).integers(0, 255, (12, 16)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(tmp_path / "g.png"))
    image = read_image(str(tmp_path / "g.png"))
    mask = np.zeros((12, 16), bool)
    mask[3:6, 4:9] = True
    write_mask(mask, image, str(tmp_path / "m.png"))
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m.png")))
    assert set(np.unique(raw)) == {0, 255}
    np.testing.assert_array_equal(raw == 255, mask)
    np.testing.assert_array_equal(read_mask(str(tmp_path / "m.png")).array, mask)


def test_dicom_series_folder(tmp_path):
    rng = np.random.default_rng(2)
    array = rng.integers(0, 2000, size=(4, 16, 16)).astype(np.int16)
    series = tmp_path / "patient7"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(4):
        image = sitk.GetImageFromArray(array[z])
        image.SetSpacing((0.8, 0.8))
        image.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.42")  # series instance UID
        image.SetMetaData("0020|0032", f"0\\0\\{z * 2.5}")  # image position (patient)
        image.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        image.SetMetaData("0020|0013", str(z + 1))
        image.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(series / f"slice{z}.dcm"))
        writer.Execute(image)
    assert list_cases(str(tmp_path)) == {"patient7": str(series)}
    volume = read_image(str(series))
    assert volume.is_volume and volume.array.shape == (4, 16, 16)
    np.testing.assert_array_equal(volume.array, array)
    assert volume.spacing[2] == pytest.approx(2.5)


def test_case_ids():
    assert case_id_from_uri("/a/b/brain1.nii.gz") == "brain1"
    assert case_id_from_uri("s3://bucket/x/case.v2.png") == "case.v2"
    assert case_id_from_uri("/data/series_12") == "series_12"


def test_s3_read_and_write(tmp_path, s3_bucket):
    make_volume(tmp_path / "vol.nrrd")
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(str(tmp_path / "vol.nrrd"), f"{s3_bucket}/cohort/vol.nrrd")
    cases = list_cases(f"{s3_bucket}/cohort/")
    assert cases == {"vol": f"{s3_bucket}/cohort/vol.nrrd"}
    image = read_image(cases["vol"])
    assert image.array.shape == (6, 20, 30)
    mask = np.zeros(image.array.shape, np.uint8)
    mask[1, 2:5, 3:7] = 1
    write_mask(mask, image, f"{s3_bucket}/out/masks/vol.nii.gz")
    back = read_mask(f"{s3_bucket}/out/masks/vol.nii.gz")
    np.testing.assert_array_equal(back.array, mask.astype(bool))
    np.testing.assert_allclose(back.spacing, image.spacing, atol=1e-5)
    assert storage.list_files(f"{s3_bucket}/out/masks") == [f"{s3_bucket}/out/masks/vol.nii.gz"]


# -- bad input -------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nothere\.nrrd: no such file"):
        read_image(str(tmp_path / "nothere.nrrd"))


def test_unsupported_extension(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt: unsupported extension '\.txt'"):
        read_image(str(tmp_path / "notes.txt"))
    with pytest.raises(InputError, match="unsupported extension"):
        list_cases(str(tmp_path / "notes.txt"))


def test_corrupt_file(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a nifti file")
    with pytest.raises(InputError, match=r"broken\.nii\.gz: cannot read image"):
        read_image(str(tmp_path / "broken.nii.gz"))


def test_constant_image(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.full((10, 10), 7, np.uint8)), str(tmp_path / "flat.png"))
    with pytest.raises(InputError, match=r"flat\.png: image is constant"):
        read_image(str(tmp_path / "flat.png"))


def test_empty_folder_and_duplicate_case_ids(tmp_path):
    with pytest.raises(InputError, match="no supported images"):
        list_cases(str(tmp_path))
    grey = np.arange(100, dtype=np.uint8).reshape(10, 10)
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(tmp_path / "a.png"))
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(tmp_path / "a.tif"))
    with pytest.raises(InputError, match="share case_id 'a'"):
        list_cases(str(tmp_path))
