"""Command-line options that override the task config change what is computed, not just what is recorded."""

from __future__ import annotations

import io
import json

import numpy as np
import SimpleITK as sitk
from click.testing import CliRunner
from PIL import Image

from medclipsam.cli import main
from medclipsam.config import WindowConfig
from medclipsam.domain.records import read_manifest
from medclipsam.eval.overlays import MASK_COLOUR, PROMPT_COLOUR
from medclipsam.ops.slicing import window_to_uint8

SHAPE = (5, 48, 64)  # z, y, x
DRAWN = {MASK_COLOUR, PROMPT_COLOUR}  # the contour and the prompt box


def _volume(folder):
    """A CT-like int16 volume: air (-800 HU) with a soft-tissue block (60 HU) in every slice."""
    rng = np.random.default_rng(0)
    volume = np.full(SHAPE, -800, np.int16) + rng.integers(-30, 30, SHAPE).astype(np.int16)
    volume[:, 14:34, 20:44] = 60 + rng.integers(-10, 10, (SHAPE[0], 20, 24))
    folder.mkdir(exist_ok=True)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(image, str(folder / "vol.nii.gz"))
    return volume


def _segment(tmp_path, name, boxes, *options):
    csv = tmp_path / f"{name}.csv"
    csv.write_text("case_id,slice,x0,y0,x1,y1\n" + boxes)
    out = tmp_path / name
    result = CliRunner().invoke(main, ["segment", "--input", str(tmp_path / "in"), "--boxes", str(csv),
                                       "--output", str(out), *options])
    assert result.exit_code == 0, result.output
    assert "1 case(s): ok=1" in result.output, result.output
    return out


def _mask(out, name="vol.nii.gz"):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "masks" / name))) > 0


def _planes(mask, axis):
    return [i for i in range(mask.shape[axis]) if np.take(mask, i, axis=axis).any()]


def test_axis_option_slices_along_that_axis(tmp_path):
    _volume(tmp_path / "in")
    default = _mask(_segment(tmp_path, "axis0", "vol,2,18,12,46,36\n"))
    assert _planes(default, 0) == [2]
    # axis 1: slice 24 is the z x x plane at y = 24 (rows z, columns x)
    along_y = _mask(_segment(tmp_path, "axis1", "vol,24,18,0,46,4\n", "--axis", "1"))
    assert _planes(along_y, 1) == [24] and along_y[:, 24, 20:44].mean() > 0.5
    # axis 2: slice 32 is the z x y plane at x = 32 (rows z, columns y)
    along_x = _mask(_segment(tmp_path, "axis2", "vol,32,12,0,36,4\n", "--axis", "2"))
    assert _planes(along_x, 2) == [32] and along_x[:, 14:34, 32].mean() > 0.5
    rows = read_manifest(str(tmp_path / "axis2" / "manifest.parquet")).to_pylist()
    assert json.loads(rows[0]["parameters"])["image"]["axis"] == 2


def _overlay_greys(out):
    """The overlay's picture (the windowed slice SAM saw) where no contour is drawn."""
    picture = np.asarray(Image.open(io.BytesIO((out / "overlays" / "vol.png").read_bytes())))
    grey = (picture[..., 0] == picture[..., 1]) & (picture[..., 1] == picture[..., 2])
    assert grey.mean() > 0.9 and {tuple(int(v) for v in p) for p in picture[~grey]} <= DRAWN
    return picture[..., 0], grey


def test_window_options_change_the_model_input(tmp_path):
    volume = _volume(tmp_path / "in")
    lung = _segment(tmp_path, "lung", "vol,2,18,12,46,36\n", "--window-preset", "lung")
    seen, grey = _overlay_greys(lung)
    expected = window_to_uint8(volume[2], WindowConfig(preset="lung"))
    np.testing.assert_array_equal(seen[grey], expected[grey])
    narrow = _segment(tmp_path, "narrow", "vol,2,18,12,46,36\n", "--percentiles", "40", "60")
    seen, grey = _overlay_greys(narrow)
    expected = window_to_uint8(volume[2], WindowConfig(lower_percentile=40, upper_percentile=60))
    np.testing.assert_array_equal(seen[grey], expected[grey])
    assert not np.array_equal(expected, window_to_uint8(volume[2], WindowConfig(preset="lung")))
    params = json.loads(read_manifest(str(lung / "manifest.parquet")).to_pylist()[0]["parameters"])
    assert params["image"]["window"]["preset"] == "lung"


def test_threshold_option_moves_the_mask_boundary(tmp_path):
    yy, xx = np.mgrid[:80, :100]
    disk = (yy - 40) ** 2 + (xx - 50) ** 2 <= 15**2
    image = np.clip(np.where(disk, 190, 60) + np.random.default_rng(3).normal(0, 8, disk.shape), 0, 255)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.uint8)), str(tmp_path / "in" / "disk.png"))
    low = _mask(_segment(tmp_path, "low", "disk,,30,20,70,60\n", "--threshold", "0.05"), "disk.png")
    high = _mask(_segment(tmp_path, "high", "disk,,30,20,70,60\n", "--threshold", "0.95"), "disk.png")
    assert high.any() and (high <= low).all() and high.sum() < low.sum()  # higher threshold: a smaller mask
