"""Prompts that cannot work are usage errors found by the plan, from the images' headers, before any
model loads: each case below is exit 2 with one sentence that names the file, the row and what is
supported, and SAM's builder is never called."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from PIL import Image

from medclipsam.cli import main
from medclipsam.domain.images import read_header, read_image

BOX_HEADER = "case_id,slice,x0,y0,x1,y1\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    images = root / "images"
    images.mkdir()
    Image.fromarray((np.arange(48 * 64).reshape(48, 64) % 200).astype(np.uint8)).save(images / "disc.png")
    volume = sitk.GetImageFromArray((np.arange(6 * 32 * 40).reshape(6, 32, 40) % 97).astype(np.int16))
    sitk.WriteImage(volume, str(images / "scan.nii.gz"))
    series = sitk.JoinSeries([volume, volume])  # 4D: two time points of the scan
    sitk.WriteImage(series, str(root / "series4d.nii.gz"))
    return root


@pytest.fixture()
def no_model(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the prompts were checked")

    monkeypatch.setattr("medclipsam.pipeline.local.segmenter_for", refuse)


def _segment(inputs, tmp_path, csv_text: str, kind: str = "--boxes", image: str | None = None):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(csv_text)
    target = image or str(inputs / "images")
    return CliRunner().invoke(main, ["segment", "--input", target, kind, str(prompts), "--output", str(tmp_path / "o")])


CASES = {
    "box outside a 2D image": (BOX_HEADER + "disc,,10,10,70,20\n", "line 2: prompt (10.0, 10.0, 70.0, 20.0) lies "
                                                                    "outside the image (x in 0..63, y in 0..47)"),
    "slice beyond the volume": (BOX_HEADER + "scan,6,1,1,9,9\n", "line 2: slice 6 outside 0..5 along axis 0"),
    "volume row without a slice": (BOX_HEADER + "scan,,1,1,9,9\n",
                                   "line 2: case 'scan' is a volume; give the slice index"),
    "slice on a 2D image": (BOX_HEADER + "disc,0,1,1,9,9\n", "line 2: case 'disc' is a 2D image; leave slice empty"),
    "unknown case": (BOX_HEADER + "scna,0,1,1,9,9\n",
                     "line 2: case_id 'scna' (nearest: scan); the input's cases are disc, scan"),
    "header only": (BOX_HEADER, "no prompt rows, only the header"),
}


@pytest.mark.parametrize("name", CASES)
def test_a_prompt_that_cannot_fit_is_exit_2_before_any_model(inputs, tmp_path, no_model, name):
    csv_text, expected = CASES[name]
    result = _segment(inputs, tmp_path, csv_text)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o" / "manifest.parquet").exists()


def test_an_empty_points_file_is_exit_2(inputs, tmp_path, no_model):
    result = _segment(inputs, tmp_path, "case_id,slice,x,y,label\n", kind="--points")
    assert result.exit_code == 2 and "no prompt rows, only the header" in result.output


def test_a_4d_image_says_what_is_supported(inputs, tmp_path, no_model):
    result = _segment(inputs, tmp_path, BOX_HEADER + "series4d,0,1,1,9,9\n", image=str(inputs / "series4d.nii.gz"))
    assert result.exit_code == 2, result.output
    assert "unsupported image: 4D with 1 component(s) per pixel; supported are 2D images" in result.output
    assert "split a 4D series" in result.output


def test_the_header_gives_the_shape_read_image_gives(inputs):
    for name in ("disc.png", "scan.nii.gz"):
        uri = str(inputs / "images" / name)
        header, image = read_header(uri), read_image(uri)
        assert header.shape == image.array.shape and header.is_volume == image.is_volume
