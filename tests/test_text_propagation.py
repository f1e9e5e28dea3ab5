"""Text mode with ``--propagate`` (key-slice text prompting): M2IB on a sampled subset of a volume's
slices only, the presence check, the strongest sampled slice as the chain's seed, and a chain that
ends before a sampled slice without the target. The tiny CLIP runs for real; where a test needs
saliency with a known answer, its maps are replaced after the real call (the calls are counted)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from test_propagation import SAM, box_of, ellipsoids, extent, slices, stacked

import medclipsam.pipeline.stages as stages
from medclipsam.config import PropagationConfig, parse_config
from medclipsam.domain.records import read_manifest
from medclipsam.eval.metrics import dice
from medclipsam.pipeline.job import Job
from medclipsam.pipeline.run import run_job
from medclipsam.pipeline.slices import CaseTask, case_slices
from medclipsam.prompts.key_slices import presence, sampled_slices, strongest
from medclipsam.saliency.maps import SaliencyMap
from medclipsam.segment.propagate import propagate

SENTENCE = "A bright oval blob."


def _config(clip_dir, **propagation):
    return parse_config({"task": "blob", "text": {"prompts": [SENTENCE], "clip_model": str(clip_dir)},
                         "saliency": {"steps": 2, "copies": 2},
                         "propagation": {"enabled": True, **propagation}})


def _write_volume(path, grey):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(grey.astype(np.int16)), str(path))
    return path


@pytest.mark.parametrize(("n", "every"), [(24, 4), (24, 5), (48, 5), (7, 1), (3, 8), (1, 5), (90, 5), (91, 5)])
def test_sampled_slices_are_evenly_spaced_and_centred(n, every):
    """At most one slice in ``every`` (at least one), ``every`` apart, the margins before the first and
    after the last equal to within a slice; a volume shorter than ``every``: its middle slice."""
    got = sampled_slices(n, every)
    assert len(got) == max(1, n // every) and len(got) <= max(1, n / every)
    assert all(b - a == every for a, b in itertools.pairwise(got)) and 0 <= got[0] and got[-1] < n
    assert abs(got[0] - (n - 1 - got[-1])) <= 1
    if n < every:
        assert got == [(n - 1) // 2]


def test_presence_is_the_mean_inside_less_the_mean_outside():
    values = np.zeros((4, 4), np.float32)
    values[:2, :2] = 0.8
    values[3, 3] = 0.4
    inside = np.zeros((4, 4), bool)
    inside[:2, :2] = True
    assert presence(values, inside) == pytest.approx(0.8 - 0.4 / 12)
    assert presence(None, inside) == 0.0 and presence(values, np.zeros((4, 4), bool)) == 0.0
    assert presence(values, np.ones((4, 4), bool)) == 0.0


def test_strongest_takes_the_highest_present_slices_ties_to_the_lower():
    scores = {2: 0.3, 6: 0.7, 10: 0.9, 14: 0.9, 18: 0.05}
    assert strongest(scores, 1, 0.0) == [10]
    assert strongest(scores, 3, 0.0) == [6, 10, 14]  # in slice order
    assert strongest(scores, 9, 0.1) == [2, 6, 10, 14]  # 18 is under min_presence
    assert strongest(scores, 2, 0.95) == [] and strongest({}, 1, 0.0) == []


def test_m2ib_runs_on_the_sampled_slices_and_the_strongest_seeds_a_chain_that_stops_at_absence(
        tmp_path, clip, tiny_clip_dir, litemedsam_auto, monkeypatch):
    """A 24-slice ellipsoid (slices 4-20), M2IB on every 4th slice, centred (1, 5, ..., 21): the real
    tiny CLIP runs on exactly those six, in one batch. Their maps are then forced: the truth's plane
    scaled by its area (the middle slices stand out most), nothing on 1 and 21 (outside the target) and
    on 17 (inside it, so the stop at absence is what ends the upward chain). The key is the sampled
    slice of largest presence, the chain covers the target from 4 up to 16, and SAM never runs on 17
    or beyond."""
    grey, truth = ellipsoids((24, 96, 96), [((12, 48, 46), (8.6, 26, 20))])
    config = _config(tiny_clip_dir, text_every=4)
    task = CaseTask("blob", str(_write_volume(tmp_path / "blob.nii.gz", grey)), prompt=json.dumps([SENTENCE]))
    rows = case_slices(task, config.image, "text")
    slice_of = {row.image.tobytes(): row.slice for row in rows}
    areas = truth.sum(axis=(1, 2))
    real, calls = stages.saliency_maps, []

    def forced(model, images, sentences, settings):
        maps = real(model, images, sentences, settings)  # the real M2IB, counted
        assert len(maps) == len(images) and all(m.values.shape == truth.shape[1:] for m in maps)
        calls.append([slice_of[image.tobytes()] for image in images])
        return [SaliencyMap(np.zeros(truth.shape[1:], np.float32), True) if k == 17 or not areas[k] else
                SaliencyMap((truth[k] * areas[k] / areas.max()).astype(np.float32), False) for k in calls[-1]]

    monkeypatch.setattr(stages, "saliency_maps", forced)
    rows = stages.add_key_slice_prompts(clip, rows, config.saliency, config.coarse, config.visual_prompts,
                                        config.propagation)
    sampled = [1, 5, 9, 13, 17, 21]
    assert calls == [sampled] and [r.slice for r in rows if r.m2ib_ran] == sampled
    scores = {r.slice: r.presence for r in rows if not math.isnan(r.presence)}
    assert sorted(scores) == [5, 9, 13]  # 1, 17 and 21 gave no prompts
    assert scores[13] > scores[9] > scores[5] > 0.2  # 13 is nearest the ellipsoid's middle, 12
    key = max(scores, key=lambda k: (scores[k], -k))  # brute force: the highest, a tie to the lower
    assert [r.slice for r in rows if r.prompts is not None] == [key] == [13]
    assert all(r.saliency.size == 0 and r.coarse.size == 0 for r in rows)  # not kept unless asked

    rows = stages.add_propagated_masks(litemedsam_auto, rows, config.sam, config.propagation)
    mask = np.stack([r.mask for r in rows])
    ran = [r.slice for r in rows if r.sam_ran]
    print("text-propagated", dice(mask[:17], truth[:17]), extent(mask), ran)
    assert max(ran) == 16 and not mask[17:].any()  # stopped before the absent slice, without embedding it
    assert abs(extent(mask)[0] - extent(truth)[0]) <= 1 and dice(mask[:17], truth[:17]) > 0.9


def test_stop_at_absent_off_lets_the_chain_run_through_an_absent_slice(litemedsam_auto):
    grey, truth = ellipsoids((12, 80, 80), [((6, 40, 40), (4.6, 20, 18))])
    images, keys = slices(grey), {6: box_of(truth[6])}
    stopped = propagate(litemedsam_auto, images, keys, SAM, PropagationConfig(enabled=True), frozenset({8}))
    through = propagate(litemedsam_auto, images, keys, SAM, PropagationConfig(enabled=True, stop_at_absent=False),
                        frozenset({8}))
    assert stopped.ends[(6, 1)] == "absent" and max(stopped.visited) == 7
    assert 8 in through.masks and through.ends[(6, 1)] != "absent"
    assert dice(stacked(through, 12, grey.shape[1:]), truth) > 0.9


def test_a_text_propagated_run_records_its_m2ib_and_sam_slices(tmp_path, tiny_clip_dir):
    """End to end on the single-process runner with the tiny CLIP's own maps, a volume and a 2D image:
    the volume's record and manifest row say M2IB ran on its sampled slices only and SAM on no more
    than its slices, with one key slice; the 2D image runs M2IB once, as slice-wise text mode does."""
    grey, _ = ellipsoids((12, 64, 64), [((6, 32, 32), (4.6, 16, 14))])
    _write_volume(tmp_path / "images" / "blob.nii.gz", grey)
    plane = np.repeat(grey[6][..., None], 3, axis=2).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(plane, isVector=True), str(tmp_path / "images" / "flat.png"))
    config = _config(tiny_clip_dir, text_every=3)
    job = Job(config, str(tmp_path / "images"), str(tmp_path / "run"), "text")
    records = {r.case_id: r for r in run_job(job, "local", track=False).records}
    volume, flat = records["blob"], records["flat"]
    print("text-propagated run", volume.status, volume.n_m2ib_slices, volume.n_target_slices, volume.n_sam_slices)
    assert volume.status in {"ok", "no_target"}, volume.error
    assert volume.n_m2ib_slices == len(sampled_slices(12, 3)) == 4 and volume.n_slices == 12
    assert volume.n_prompted_slices <= 1 and volume.n_target_slices <= 4 and volume.n_sam_slices <= 12
    assert (volume.n_sam_slices > 0) == (volume.n_prompted_slices == 1)
    assert flat.n_m2ib_slices == 1 and flat.n_slices == 1
    rows = {row["case_id"]: row for row in read_manifest(str(tmp_path / "run" / "manifest.parquet")).to_pylist()}
    assert rows["blob"]["n_m2ib_slices"] == 4 and rows["flat"]["n_m2ib_slices"] == 1
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert settings["propagation"]["text_every"] == 3 and settings["text"]["prompts"] == [SENTENCE]
