"""Stage attribution (``pseudolabel --attribution``) in the single-process runner: with the saliency
forced to a known map, the three DSC columns equal the ones computed by hand from the same pieces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from medclipsam.config import parse_config
from medclipsam.domain.images import read_image, read_mask
from medclipsam.eval.metrics import dice
from medclipsam.ops.slicing import model_inputs, slice_keys
from medclipsam.pipeline.job import Job
from medclipsam.pipeline.run import run_job
from medclipsam.prompts.from_mask import label_boxes
from medclipsam.prompts.from_saliency import prompts_from_saliency
from medclipsam.saliency.maps import SaliencyMap
from medclipsam.segment.sam import segment_images

SHIFT = 7  # the forced saliency is the bright disc, blurred and moved this many pixels right


def forced_saliency(clip, images, text, settings):
    """Stands in for M2IB: a map that a k-means coarse mask turns into a shifted disc."""
    maps = []
    for image in images:
        bright = image[..., 0] > 160
        blurred = ndimage.gaussian_filter(np.roll(bright, SHIFT, axis=1).astype(float), 2)
        maps.append(SaliencyMap((blurred / max(blurred.max(), 1e-9)).astype(np.float32), not bright.any()))
    return maps


def _cohort(root):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    yy, xx = np.mgrid[:96, :96]
    for case, (cy, cx, r) in {"a": (40, 40, 14), "b": (55, 50, 18)}.items():
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        pixels = np.clip(rng.normal(70, 15, disc.shape) + 130 * disc, 0, 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(pixels), str(root / "images" / f"{case}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(disc.astype(np.uint8) * 255), str(root / "labels" / f"{case}.png"))
    volume = np.clip(rng.normal(70, 15, (3, 96, 96)), 0, 255)
    label = np.zeros((3, 96, 96), np.uint8)
    label[1] = (yy - 48) ** 2 + (xx - 45) ** 2 < 15 ** 2  # only the middle slice has a target
    volume[label > 0] += 130
    for kind, array in (("images", np.clip(volume, 0, 255).astype(np.uint8)), ("labels", label)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.9, 0.9, 3.0))
        sitk.WriteImage(image, str(root / kind / "vol.nii.gz"))
    return root


def _stack(planes: list[np.ndarray], is_volume: bool) -> np.ndarray:
    return np.stack(planes) if is_volume else planes[0]


def test_attribution_columns_equal_hand_computed(tmp_path, tiny_clip_dir, litemedsam, monkeypatch):
    monkeypatch.setattr("medclipsam.pipeline.stages.saliency_maps", forced_saliency)
    data = _cohort(tmp_path / "data")
    config = parse_config({"task": "t", "text": {"prompts": ["a bright disc"], "clip_model": str(tiny_clip_dir)},
                           "image": {"window": {"preset": None}}, "sam": {"backend": "litemedsam"}})
    job = Job(config, str(data / "images"), str(tmp_path / "run"), "text", str(data / "labels"), attribution=True)
    records = {r.case_id: r for r in run_job(job, "local", resume=False, track=False).records}
    assert sorted(records) == ["a", "b", "vol"]
    for case, record in records.items():
        image = read_image(record.source_uri)
        truth = read_mask(record.gt_uri)
        keys = slice_keys(image, 0)
        inputs = model_inputs(image, keys, config.image)
        boxes = label_boxes(truth, 0, config.oracle.box_margin)
        coarse, oracle = [], []
        for key, pixels in zip(keys, inputs, strict=True):
            saliency = forced_saliency(None, [pixels], "", None)[0]
            mask, _ = prompts_from_saliency(pixels, None if saliency.constant else saliency.values, config.coarse,
                                            config.visual_prompts)
            coarse.append(mask)
            box = boxes.get(key)
            oracle.append(segment_images(litemedsam, [pixels], [box], config.sam)[0][0] if box else
                          np.zeros(pixels.shape[:2], bool))
        assert record.dsc_coarse == pytest.approx(dice(_stack(coarse, image.is_volume), truth.array)), case
        assert record.dsc_oracle == pytest.approx(dice(_stack(oracle, image.is_volume), truth.array)), case
        assert record.dsc == pytest.approx(dice(read_mask(record.mask_uri).array, truth.array)), case
        # the forced map is off by 7 pixels; the truth's boxes are not: the oracle column is the best
        assert record.dsc_oracle > record.dsc_coarse and record.dsc_oracle > 0.8, (case, record)
        assert json.loads(record.prompts)  # the run's own prompts came from the forced map
