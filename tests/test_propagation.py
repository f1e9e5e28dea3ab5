"""Volumes segmented from one prompted slice (``--propagate``): synthetic volumes with a known truth and
the real LiteMedSAM, the stop rule and carried prompts against hand-worked cases, the 3D clean-up
against a brute-force flood fill, and the single-process run end to end (files, geometry, records)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from scipy import ndimage

from medclipsam.cli import main
from medclipsam.config import PropagationConfig, SamConfig, parse_config
from medclipsam.domain.images import MedicalImage
from medclipsam.domain.records import read_manifest
from medclipsam.eval.metrics import dice
from medclipsam.ops.postprocess import clean_volume
from medclipsam.pipeline.job import Job
from medclipsam.pipeline.run import run_job
from medclipsam.prompts.from_mask import label_boxes
from medclipsam.prompts.types import SlicePrompts
from medclipsam.segment.propagate import Decoded, carried_prompts, owners, propagate, stop_reason

SETTINGS = PropagationConfig(enabled=True)
SAM = SamConfig()


def ellipsoids(shape, blobs, seed=0):
    """A grey volume (bright ellipsoids on a dark, slightly noisy background) and its truth; ``blobs``:
    (centre z, y, x), (semi-axes z, y, x)."""
    z, y, x = np.indices(shape)
    truth = np.zeros(shape, bool)
    for (cz, cy, cx), (az, ay, ax) in blobs:
        truth |= ((z - cz) / az) ** 2 + ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2 <= 1.0
    noise = np.random.default_rng(seed).normal(0.0, 6.0, shape)
    grey = np.clip(np.where(truth, 190.0, 40.0) + noise, 0, 255)
    return grey, truth


def slices(grey: np.ndarray) -> list[np.ndarray]:
    """The volume's axial slices as SAM's ``H x W x 3`` uint8 inputs."""
    return [np.repeat(plane[..., None], 3, axis=2).astype(np.uint8) for plane in grey]


def box_of(plane: np.ndarray) -> SlicePrompts:
    ys, xs = np.nonzero(plane)
    return SlicePrompts(boxes=np.array([[xs.min() - 2.0, ys.min() - 2.0, xs.max() + 2.0, ys.max() + 2.0]]))


def stacked(result, n: int, plane_shape) -> np.ndarray:
    return np.stack([result.masks.get(k, np.zeros(plane_shape, bool)) for k in range(n)])


def extent(mask: np.ndarray) -> tuple[int, int]:
    present = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
    return int(present[0]), int(present[-1])


@pytest.fixture(scope="module")
def ellipsoid():
    return ellipsoids((24, 96, 96), [((12, 48, 46), (8.6, 26, 20))])


def test_ellipsoid_from_its_central_slice(litemedsam_auto, ellipsoid):
    """One box on the central slice: 3D DSC > 0.9, each chain ends within one slice of the
    ellipsoid's end, nothing beyond it, and SAM ran on the target's slices plus at most one a side."""
    grey, truth = ellipsoid
    result = propagate(litemedsam_auto, slices(grey), {12: box_of(truth[12])}, SAM, SETTINGS)
    mask = stacked(result, len(grey), grey.shape[1:])
    first, last = extent(truth)
    got_first, got_last = extent(mask)
    print("propagated ellipsoid", dice(mask, truth), (first, last), (got_first, got_last), result.ends)
    assert dice(mask, truth) > 0.9
    assert abs(got_first - first) <= 1 and abs(got_last - last) <= 1
    assert not mask[: first - 1].any() and not mask[last + 2:].any()
    assert set(result.ends) == {(12, -1), (12, 1)} and "" not in result.ends.values()
    assert sorted(result.visited) == list(range(got_first - 1, got_last + 2))  # each slice embedded once


def test_the_chain_does_not_jump_to_a_second_blob(litemedsam_auto):
    """Two blobs along the axis with empty slices between them: a chain from the first stays on it."""
    grey, truth = ellipsoids((26, 80, 80), [((6, 40, 40), (4.5, 18, 16)), ((19, 40, 40), (4.5, 18, 16))])
    labels, _ = ndimage.label(truth)
    result = propagate(litemedsam_auto, slices(grey), {6: box_of(truth[6])}, SAM, SETTINGS)
    mask = stacked(result, len(grey), grey.shape[1:])
    assert dice(mask, labels == 1) > 0.85
    assert not mask[13:].any(), "the chain crossed the gap"
    assert result.ends[(6, 1)] in {"empty", "score", "overlap", "contrast", "growth"}


def test_a_target_that_touches_the_first_slice(litemedsam_auto):
    grey, truth = ellipsoids((16, 80, 80), [((1, 40, 40), (6.5, 20, 18))])
    result = propagate(litemedsam_auto, slices(grey), {2: box_of(truth[2])}, SAM, SETTINGS)
    mask = stacked(result, len(grey), grey.shape[1:])
    assert result.ends[(2, -1)] == "edge" and mask[0].any()
    assert dice(mask, truth) > 0.88
    assert abs(extent(mask)[1] - extent(truth)[1]) <= 1


def test_each_slice_follows_the_nearest_prompted_slice_and_a_correction_restarts_the_chain(litemedsam_auto, ellipsoid):
    """Prompts on slices 5 and 9: each slice is decided by its nearest key's chain, exactly as the chain
    from that key alone decides it; a deliberately bad prompt on 5 (a box on a corner of the target)
    is corrected on 9's side and no further."""
    grey, truth = ellipsoids((14, 96, 96), [((7, 48, 46), (5.6, 26, 20))], seed=1)
    images = slices(grey)
    corner = SlicePrompts(boxes=np.array([[30.0, 26.0, 44.0, 40.0]]))
    keys = {5: corner, 9: box_of(truth[9])}
    both = propagate(litemedsam_auto, images, keys, SAM, SETTINGS)
    alone = {k: propagate(litemedsam_auto, images, {k: p}, SAM, SETTINGS) for k, p in keys.items()}
    owner = owners(len(images), list(keys))
    assert list(owner[:8]) == [5] * 8 and list(owner[8:]) == [9] * 6  # 7 is as near to both: the lower
    empty = np.zeros(grey.shape[1:], bool)
    for k in range(len(images)):
        expected = alone[int(owner[k])].masks.get(k, empty)
        assert np.array_equal(both.masks.get(k, empty), expected), k
    corrected = stacked(both, len(images), grey.shape[1:])
    assert dice(corrected[8:], truth[8:]) > 0.9
    assert dice(corrected[:8], truth[:8]) < 0.7  # the bad prompt's side is left as it was given
    assert both.ends[(9, -1)] == "territory"  # the chain from 9 ran down to 5's territory


def test_owners_is_the_nearest_key_by_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        keys = sorted(set(rng.integers(0, n, size=int(rng.integers(1, 5))).tolist()))
        expected = [min(keys, key=lambda k, i=i: (abs(i - k), k)) for i in range(n)]
        assert owners(n, keys).tolist() == expected


def test_carried_prompts_widen_each_component_and_point_inside_it():
    previous = np.zeros((40, 50), bool)
    previous[10:20, 5:25] = True  # 20 wide, 10 high
    previous[30:40, 40:50] = True  # touches the bottom-right corner: its widened box is clipped
    previous[2, 45] = True  # a speck under min_component: no prompt of its own
    settings = PropagationConfig(box_margin=0.1, points=True, min_component=4)
    boxes, points = carried_prompts(previous, settings)
    # the tight box (5, 10, 24, 19) is 19 x 9 px between its extreme pixels; each side moves out 10% of it
    np.testing.assert_allclose(boxes[0], [5 - 1.9, 10 - 0.9, 24 + 1.9, 19 + 0.9])
    np.testing.assert_allclose(boxes[1], [40 - 0.9, 30 - 0.9, 49, 39])
    assert len(boxes) == 2 and points.shape == (2, 1, 2)
    assert all(previous[int(y), int(x)] for x, y in points[:, 0]) and points[1, 0, 1] >= 30
    x, y = points[0, 0]
    assert 10 <= y <= 19 and 5 <= x <= 24 and abs(y - 14.5) <= 0.5  # the innermost row of the first block
    assert carried_prompts(np.zeros((8, 8), bool), settings) is None
    assert carried_prompts(previous, PropagationConfig())[1] is None  # no points unless asked for


@pytest.mark.parametrize(("mask_area", "score", "shift", "contrast", "expected"), [
    (100, 0.9, 0, 1.0, ""),
    (3, 0.9, 0, 1.0, "empty"),  # under min_area (4)
    (100, 0.2, 0, 1.0, "score"),  # under min_score (0.3)
    (100, 0.9, 8, 1.0, "overlap"),  # 20 of 100 pixels shared: under min_overlap (0.5)
    (400, 0.9, 0, 1.0, "growth"),  # four times the previous area: over max_growth (2)
    (100, 0.9, 0, 0.2, "contrast"),  # a fifth of the key slice's contrast: under min_contrast (0.35)
])
def test_stop_reason(mask_area, score, shift, contrast, expected):
    previous = np.zeros((40, 40), bool)
    previous[10:20, 10:20] = True  # 100 pixels
    mask = np.zeros((40, 40), bool)
    side = round(np.sqrt(mask_area))
    if mask_area < 10:
        mask[10, 10:10 + mask_area] = True
    else:
        mask[10 + shift:10 + shift + side, 10:10 + side] = True
    assert stop_reason(Decoded(mask, score, None), previous, SETTINGS, contrast) == expected


def flood_fill_holes(mask: np.ndarray) -> np.ndarray:
    """Brute force: background reachable from the border (6-connected, breadth first) stays; the rest fills."""
    outside = np.zeros_like(mask)
    stack = [idx for idx in np.ndindex(mask.shape) if not mask[idx] and any(
        i in (0, s - 1) for i, s in zip(idx, mask.shape, strict=True))]
    for idx in stack:
        outside[idx] = True
    while stack:
        z, y, x = stack.pop()
        for dz, dy, dx in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
            n = (z + dz, y + dy, x + dx)
            if all(0 <= v < s for v, s in zip(n, mask.shape, strict=True)) and not mask[n] and not outside[n]:
                outside[n] = True
                stack.append(n)
    return ~outside


def test_clean_volume_keeps_the_largest_3d_component_and_fills_3d_holes():
    mask = np.zeros((12, 14, 14), bool)
    mask[2:10, 2:10, 2:10] = True
    mask[4:8, 4:8, 4:8] = False  # a cavity closed in 3D
    mask[5:7, 5:7, 2] = False  # a dent open to the outside on one face
    mask[0:2, 12:14, 12:14] = True  # a small separate component
    cleaned = clean_volume(mask, keep_components=1, fill_holes=True)
    largest = mask.copy()
    largest[0:2, 12:14, 12:14] = False
    assert np.array_equal(cleaned, flood_fill_holes(largest))
    assert cleaned[5, 5, 5] and not cleaned[5, 5, 2] and not cleaned[0, 12, 12]
    # per slice, the cavity is a 2D hole on slices 4-7 too; in 3D it is what is enclosed that fills
    assert np.array_equal(clean_volume(mask, 0, False), mask)


def test_label_boxes_on_the_key_slices_with_the_largest_truth():
    array = np.zeros((6, 20, 20), np.uint8)
    array[1, 2:5, 2:5] = 1  # 9 px
    array[2, 2:8, 2:8] = 1  # 36
    array[3, 2:8, 2:8] = 1  # 36: a tie, to the lower slice first
    array[4, 1:4, 3:9] = 1  # 18
    label = MedicalImage(array, True, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert sorted(label_boxes(label, 0, 0.0, key_slices=1)) == [2]
    assert sorted(label_boxes(label, 0, 0.0, key_slices=3)) == [2, 3, 4]
    assert sorted(label_boxes(label, 0, 0.0, key_slices=10)) == [1, 2, 3, 4]
    assert sorted(label_boxes(label, 0, 0.0)) == [1, 2, 3, 4]
    np.testing.assert_allclose(label_boxes(label, 0, 0.0, key_slices=1)[2].boxes, [[2, 2, 7, 7]])


def _write_case(folder, grey, truth, spacing, origin, direction):
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for array, kind in ((grey.astype(np.int16), "images"), (truth.astype(np.uint8), "labels")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        sitk.WriteImage(image, str(folder / kind / "blob.nii.gz"))


@pytest.mark.parametrize("axis", [0, 2])
def test_a_propagated_run_end_to_end_keeps_geometry_and_records_its_sam_slices(tmp_path, axis):
    """The labels source with one key slice, single-process runner, slicing along axis 0 or 2 (the
    ellipsoid's long axis along it): the mask file has the source geometry, scores DSC > 0.9 against the
    truth, and the record says SAM ran on about the target's slices, not the volume's."""
    grey, truth = ellipsoids((24, 96, 96), [((12, 48, 46), (8.6, 26, 20))])
    if axis == 2:  # numpy (z, y, x): the long axis moves to x, slices are taken along it
        grey, truth = np.ascontiguousarray(np.moveaxis(grey, 0, 2)), np.ascontiguousarray(np.moveaxis(truth, 0, 2))
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    _write_case(tmp_path, grey, truth, (0.8, 0.9, 2.5), (-12.5, 40.0, 3.25), direction)
    config = parse_config({"task": "blob", "image": {"axis": axis}, "oracle": {"key_slices": 1},
                           "propagation": {"enabled": True}})
    output = tmp_path / "run"
    job = Job(config, str(tmp_path / "images"), str(output), "labels", str(tmp_path / "labels"))
    record = run_job(job, "local", track=False).records[0]
    assert record.status == "ok", record.error
    written = sitk.ReadImage(str(output / "masks" / "blob.nii.gz"))
    assert written.GetSpacing() == pytest.approx((0.8, 0.9, 2.5)) and written.GetOrigin() == pytest.approx(
        (-12.5, 40.0, 3.25)) and written.GetDirection() == pytest.approx(direction)
    mask = sitk.GetArrayFromImage(written) > 0
    assert dice(mask, truth) > 0.9 and record.dsc == pytest.approx(dice(mask, truth), abs=1e-6)
    target = int(np.count_nonzero(np.moveaxis(truth, axis, 0).any(axis=(1, 2))))
    assert record.n_prompted_slices == 1 and target <= record.n_sam_slices <= target + 2
    row = read_manifest(str(output / "manifest.parquet")).to_pylist()[0]
    assert row["n_sam_slices"] == record.n_sam_slices and len(json.loads(row["prompts"])) == 1
    settings = json.loads((output / "run.json").read_text())["settings"]
    assert settings["propagation"]["enabled"] is True and settings["labels"]["key_slices"] == 1
    strips = sorted(p.name for p in (output / "strips").iterdir())
    assert len(strips) == config.pipeline.strip_slices  # the chain's slices, not only its one key slice


def test_a_failing_propagation_is_an_error_row_and_the_run_goes_on(tmp_path, monkeypatch):
    grey, truth = ellipsoids((12, 64, 64), [((6, 32, 32), (4.5, 16, 14))])
    _write_case(tmp_path, grey, truth, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    for kind in ("images", "labels"):  # a second case: the same volume under another name
        (tmp_path / kind / "other.nii.gz").write_bytes((tmp_path / kind / "blob.nii.gz").read_bytes())
    import medclipsam.pipeline.stages as stages

    real = stages.propagate
    calls = []

    def first_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected propagation failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "propagate", first_fails)
    config = parse_config({"task": "blob", "oracle": {"key_slices": 1}, "propagation": {"enabled": True}})
    job = Job(config, str(tmp_path / "images"), str(tmp_path / "run"), "labels", str(tmp_path / "labels"))
    records = {r.case_id: r for r in run_job(job, "local", track=False).records}
    assert records["blob"].status == "error" and "injected propagation failure" in records["blob"].error
    assert records["other"].status == "ok" and records["other"].dsc > 0.85
    again = run_job(job, "local", track=False)  # the resume completes the failed case
    assert again.n_processed == 1 and all(r.status == "ok" for r in again.records)


def test_propagate_options_refused_where_they_cannot_apply(tmp_path):
    (tmp_path / "images").mkdir()
    runner = CliRunner()
    result = runner.invoke(main, ["pseudolabel", "--input", str(tmp_path / "images"), "--output",
                                  str(tmp_path / "o"), "--key-slices", "1"])
    assert result.exit_code == 2 and "--key-slices" in result.output and "--prompt-source labels" in result.output
    result = runner.invoke(main, ["pseudolabel", "--input", str(tmp_path / "images"), "--output",
                                  str(tmp_path / "o"), "--propagate", "--prompt", "a tumour", "--attribution"])
    assert result.exit_code == 2 and "--propagate" in result.output and "attribution" in result.output
    assert not (tmp_path / "o").exists()
