"""The pieces of the pseudo-labelling pipeline, without Ray: cohort manifests, rows and batches,
slice staging and case assembly, overlays."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medclipsam.domain.cohort import parse_prompt, read_cohort
from medclipsam.domain.images import read_mask
from medclipsam.domain.records import read_records
from medclipsam.errors import InputError
from medclipsam.eval.overlays import contour, overlay_slice
from medclipsam.pipeline.assembly import AssemblySettings, _stage_bytes, _unstage, collect_slice
from medclipsam.pipeline.ray_runner import batch_to_rows, rows_to_batch
from medclipsam.pipeline.slices import ARRAY_FIELDS, Geometry, SliceRow
from medclipsam.prompts.types import SlicePrompts


def test_cohort_manifest_resolves_relative_uris_and_prompt_lists(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "manifest.csv").write_text(
        "uri,prompt,gt_uri\n"
        "scans/b.nii.gz,\"[\"\"one\"\", \"\"two\"\"]\",labels/b.nii.gz\n"
        "a.png,a single sentence,\n"
        "s3://bucket/c.png,,s3://bucket/c_gt.png\n")
    cases = {c.case_id: c for c in read_cohort(str(tmp_path / "manifest.csv"))}
    assert list(cases) == ["a", "b", "c"]  # sorted by case_id
    assert cases["b"].uri == f"{tmp_path}/scans/b.nii.gz" and cases["b"].gt_uri == f"{tmp_path}/labels/b.nii.gz"
    assert cases["b"].prompts == ("one", "two") and cases["a"].prompts == ("a single sentence",)
    assert cases["c"].uri == "s3://bucket/c.png" and cases["c"].prompts == () and cases["a"].gt_uri == ""


@pytest.mark.parametrize(("text", "message"), [
    ("path,prompt\nx.png,\n", r"manifest\.csv: manifest needs a column named one of uri"),
    ("uri\nx.png\ny/x.png\n", r"manifest\.csv line 3: case_id 'x' appears twice"),
    ("uri,prompt\nx.png,\"[1, 2]\"\n", r"manifest\.csv line 2: prompt must be a sentence or a JSON list"),
    ("uri\n", r"manifest\.csv: manifest has no rows"),
])
def test_bad_cohort_manifests_name_the_file_and_line(tmp_path, text, message):
    (tmp_path / "manifest.csv").write_text(text)
    with pytest.raises(InputError, match=message):
        read_cohort(str(tmp_path / "manifest.csv"))


def test_prompt_parsing():
    assert parse_prompt("  ", "x") == ()
    with pytest.raises(InputError, match="not valid JSON"):
        parse_prompt('["unterminated', "where")


def test_gt_prefix_pairs_by_case_id(tmp_path):
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for name in ("b", "a"):
        sitk.WriteImage(sitk.GetImageFromArray(np.arange(16, dtype=np.uint8).reshape(4, 4)),
                        str(tmp_path / "images" / f"{name}.png"))
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 4), np.uint8)), str(tmp_path / "labels" / "b.png"))
    cases = read_cohort(str(tmp_path / "images"), str(tmp_path / "labels"))
    assert [(c.case_id, c.gt_uri.rsplit("/", 1)[-1]) for c in cases] == [("a", ""), ("b", "b.png")]


def test_rows_and_batches_round_trip_with_ragged_images():
    rows = [SliceRow("x", "", slice=i, image=np.full((3 + i, 5, 3), i, np.uint8), seconds_read=0.5 * i,
                     overlay=i == 1) for i in range(3)]
    batch = rows_to_batch(rows)
    assert batch["image"].dtype == object and batch["slice"].tolist() == [0, 1, 2]
    back = batch_to_rows(batch)
    for row, original in zip(back, rows, strict=True):
        assert type(row.slice) is int and type(row.overlay) is bool
        assert np.array_equal(row.image, original.image) and row.seconds_read == original.seconds_read
    same = rows_to_batch([SliceRow("x", "", mask=np.zeros((2, 2), bool)),
                          SliceRow("y", "", mask=np.ones((2, 2), bool))])
    assert same["mask"].shape == (2, 2, 2)  # equal shapes stack into one tensor column


def test_geometry_and_prompts_cross_the_ray_boundary_exactly():
    geometry = Geometry(True, (3, 4, 5), 0, (0.7, 0.8, 2.5), (1.0, -2.0, 30.0), (0, 1, 0, 1, 0, 0, 0, 0, 1))
    prompts = SlicePrompts(np.array([[0.1 + 0.2, 1 / 3, 2.0, 3.5]]), np.array([[1e-17, 2.675]]), np.array([1]))
    row = SliceRow("v", "/in/v.nii.gz", sentences=("a", "b"), slice=2, n_slices=3, geometry=geometry,
                   prompts=prompts)
    (back,) = batch_to_rows(rows_to_batch([row]))
    assert back.geometry == geometry and back.geometry.reference_image().array.shape == (3, 4, 5)
    assert back.sentences == ("a", "b") and back.oracle_prompts is None
    for name in ("boxes", "points", "labels"):
        sent, got = getattr(prompts, name), getattr(back.prompts, name)
        assert got.dtype == sent.dtype and got.tobytes() == sent.tobytes()


def _slice_row(case_id: str, k: int, n: int, mask: np.ndarray, geometry: str, **extra) -> SliceRow:
    return SliceRow(case_id, f"/in/{case_id}.nii.gz", slice=k, n_slices=n, geometry=Geometry.from_json(geometry),
                    seconds_read=0.1, prompts=SlicePrompts(np.array([[1.0, 1, 4, 4]])) if mask.any() else None,
                    mask=mask, seconds_embed=0.2, seconds_decode=0.05, backend="litemedsam", checkpoint="ck",
                    checkpoint_sha256="ab", **extra)


PLANE = json.dumps({"is_volume": False, "shape": [7, 9], "axis": 0, "spacing": [1, 1], "origin": [0, 0],
                    "direction": [1, 0, 0, 1]})


def test_staged_slice_round_trip():
    mask = np.random.default_rng(0).random((7, 9)) > 0.5
    coarse = np.random.default_rng(1).random((7, 9)) > 0.7
    oracle = ~coarse
    row = _slice_row("c", 3, 10, mask, PLANE, image=np.full((7, 9, 3), 9, np.uint8),
                     saliency=np.linspace(0, 1, 63, dtype=np.float32).reshape(7, 9), coarse=coarse,
                     oracle_mask=oracle, m2ib_ran=True, presence=0.42)
    back = _unstage(_stage_bytes(row))
    assert np.array_equal(back.mask, mask) and np.array_equal(back.image, row.image)
    assert np.array_equal(back.coarse, coarse) and back.coarse.dtype == bool
    assert np.array_equal(back.oracle_mask, oracle) and back.oracle_mask.dtype == bool
    assert np.allclose(back.saliency, row.saliency, atol=1e-3)  # stored as float16

    def fields(r: SliceRow) -> dict:
        return {k: v for k, v in r.to_columns().items() if k not in ARRAY_FIELDS}

    assert fields(back) == fields(row)
    plain = _unstage(_stage_bytes(_slice_row("c", 3, 10, mask, PLANE)))  # no picture, map or coarse mask
    assert plain.image.size == plain.saliency.size == plain.coarse.size == plain.oracle_mask.size == 0
    assert math.isnan(plain.presence) and not plain.m2ib_ran  # an unsampled slice stays unseen


def test_volume_is_assembled_once_whatever_the_slice_order(tmp_path):
    """Slices arrive shuffled; only the last one yields the record; the mask has the source geometry."""
    n = 6
    volume = np.zeros((n, 8, 10), bool)
    volume[2:5, 2:6, 3:8] = True
    geometry = json.dumps({"is_volume": True, "shape": [n, 8, 10], "axis": 0, "spacing": [0.7, 0.8, 2.5],
                           "origin": [1.0, -2.0, 30.0], "direction": [0, 1, 0, 1, 0, 0, 0, 0, 1]})
    settings = AssemblySettings(str(tmp_path), "labels", '{"x": 1}')
    order = list(range(n))
    random.Random(3).shuffle(order)
    results = [collect_slice(_slice_row("vol", k, n, volume[k], geometry), settings) for k in order]
    assert all(r is None for r in results[:-1])
    record = results[-1]
    assert record.status == "ok" and record.n_slices == n and record.n_prompted_slices == 3
    assert sorted(json.loads(record.prompts)) == ["2", "3", "4"]
    assert record.seconds_read == pytest.approx(0.1 * n) and record.seconds_embed == pytest.approx(0.2 * n)
    written = read_mask(record.mask_uri)
    assert np.array_equal(written.array, volume)
    assert written.spacing == pytest.approx((0.7, 0.8, 2.5)) and written.origin == pytest.approx((1.0, -2.0, 30.0))
    assert written.direction == pytest.approx((0, 1, 0, 1, 0, 0, 0, 0, 1))
    from dataclasses import asdict

    back = asdict(read_records(str(tmp_path))["vol"])
    unscored = ("dsc", "nsd", "hd95", "dsc_coarse", "dsc_oracle", "uncertainty")
    assert {k: v for k, v in back.items() if k not in unscored} == {
        k: v for k, v in asdict(record).items() if k not in unscored}
    assert all(np.isnan(back[k]) for k in unscored)  # no ground truth: NaN survives the JSON


def test_an_error_in_one_slice_fails_the_case_with_its_message(tmp_path):
    geometry = json.dumps({"is_volume": True, "shape": [2, 4, 4], "axis": 0, "spacing": [1, 1, 1],
                           "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]})
    settings = AssemblySettings(str(tmp_path), "text")
    assert collect_slice(_slice_row("v", 0, 2, np.zeros((4, 4), bool), geometry), settings) is None
    record = collect_slice(_slice_row("v", 1, 2, np.zeros((0, 0), bool), geometry, error="SAM: out of memory"),
                           settings)
    assert record.status == "error" and record.error == "slice 1: SAM: out of memory" and record.mask_uri == ""


def test_a_write_that_fails_keeps_the_slices_earlier_cause(tmp_path):
    """A slice SAM failed on whose write then fails too: the case's error still names SAM first (the
    cause a rerun must know); a clean slice whose write fails names the write alone."""
    from medclipsam.pipeline.cpu_tasks import Contained

    def refuse(row, settings):
        raise OSError("store refused")

    write = Contained(refuse, "write")
    settings = AssemblySettings(str(tmp_path), "text")
    failed = _slice_row("p", -1, 1, np.zeros((0, 0), bool), PLANE, error="SAM: bad image").to_columns()
    clean = _slice_row("q", -1, 1, np.zeros((7, 9), bool), PLANE).to_columns()
    [first] = write(failed, settings=settings)
    [second] = write(clean, settings=settings)
    assert first["status"] == second["status"] == "error"
    assert first["error"] == "SAM: bad image; then slice -1 could not be written: OSError: store refused"
    assert second["error"] == "slice -1 could not be written: OSError: store refused"


def test_a_truth_lost_to_an_outage_fails_the_case_and_a_bad_truth_does_not(tmp_path, monkeypatch):
    """A ground truth the store did not deliver must not leave an 'ok' case that a resume skips
    unscored; a truth that is itself unusable costs only the scores."""
    import medclipsam.pipeline.assembly as assembly
    from medclipsam.errors import InputError, StorageUnavailable

    geometry = json.dumps({"is_volume": False, "shape": [8, 8], "axis": 0, "spacing": [1, 1], "origin": [0, 0],
                           "direction": [1, 0, 0, 1]})
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    settings = AssemblySettings(str(tmp_path), "labels")

    def truth_from(error):
        def read(uri, like=None):
            raise error
        return read

    monkeypatch.setattr(assembly, "read_mask", truth_from(StorageUnavailable("s3://b/gt/c.png: the object store "
                                                                              "did not answer (5 tries over 120 s)")))
    record = collect_slice(_slice_row("c", -1, 1, mask, geometry, gt_uri="s3://b/gt/c.png"), settings)
    assert record.status == "error" and "the object store did not answer" in record.error
    monkeypatch.setattr(assembly, "read_mask", truth_from(InputError("gt/d.png: cannot read image (truncated)")))
    record = collect_slice(_slice_row("d", -1, 1, mask, geometry, gt_uri="gt/d.png"), settings)
    assert record.status == "ok" and record.error == "ground truth: gt/d.png: cannot read image (truncated)"
    assert np.isnan(record.dsc)


def test_contour_and_overlay_slice():
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    ring = contour(mask)
    assert ring.sum() == 16 and not ring[3:6, 3:6].any() and (ring <= mask).all()
    assert contour(mask, 2).sum() == 25 - 1
    masks = {0: np.zeros((4, 4), bool), 1: np.ones((4, 4), bool), 2: np.eye(4, dtype=bool)}
    assert overlay_slice(masks) == 1
    empty = {k: np.zeros((4, 4), bool) for k in range(5)}
    assert overlay_slice(empty, {3: np.ones((4, 4), bool)}) == 3 and overlay_slice(empty) == 2


# -- actor pools sized to the cluster ------------------------------------------------------------------
@pytest.mark.parametrize(("pools", "text", "cpus", "gpus", "expected"), [
    ({}, False, 2, 0, {"sam": 2}),  # labels mode on 2 cores: 1.75 CPUs left after a task -> 2 x 0.75
    ({}, True, 2, 0, {"saliency": 1, "sam": 1}),  # text mode: the two pools share them
    ({}, False, 16, 0, {"sam": 21}),  # (16 - 0.25) / 0.75
    ({}, True, 16, 0, {"saliency": 10, "sam": 10}),
    ({"sam": {"num_gpus": 1, "num_cpus": 1}}, False, 16, 4, {"sam": 4}),  # GPUs bound a GPU pool
    ({"saliency": {"num_gpus": 0.5}, "sam": {"num_gpus": 0.5}}, True, 16, 1, {"saliency": 1, "sam": 1}),
    ({"sam": {"actors": 3}}, True, 4, 0, {"saliency": 2, "sam": 3}),  # explicit wins; auto gets the rest
    ({"sam": {"actors": 3}}, True, 2, 0, {"saliency": 1, "sam": 3}),  # never fewer than one actor
    ({}, False, 0.5, 0, {"sam": 1}),
    # custom resources: two nodes offer sam_node 1 each, so 16 CPUs hold 21 actors but only 2 fit
    ({"sam": {"resources": {"sam_node": 1}}}, False, 16, 0, {"sam": 2}),
    ({"sam": {"resources": {"sam_node": 0.5}}}, False, 16, 0, {"sam": 4}),
    ({"sam": {"resources": {"sam_node": 1}}}, False, 1.0, 0, {"sam": 1}),  # CPUs bind first here
    ({"sam": {"resources": {"absent": 1}}}, False, 16, 0, {"sam": 1}),  # none offered: one, which Ray waits for
])
def test_auto_pool_sizes(pools, text, cpus, gpus, expected):
    from medclipsam.config import PipelineConfig
    from medclipsam.pipeline.pools import pool_sizes

    totals = {"CPU": cpus, "GPU": gpus, "sam_node": 2.0}
    assert pool_sizes(PipelineConfig.model_validate(pools), text, cpus, gpus, totals) == expected


def test_pool_resources_name_custom_resources_only():
    from pydantic import ValidationError

    from medclipsam.config import ActorPoolConfig

    assert ActorPoolConfig.model_validate({"resources": {"sam_node": 1}}).resources == {"sam_node": 1.0}
    with pytest.raises(ValidationError, match="GPU: set num_cpus / num_gpus instead"):
        ActorPoolConfig.model_validate({"resources": {"GPU": 1}})
    with pytest.raises(ValidationError, match="greater than 0"):
        ActorPoolConfig.model_validate({"resources": {"sam_node": 0}})


def test_pools_ask_ray_for_their_placement():
    """What ``map_batches`` is given per actor: CPUs, GPUs, and the custom resources only when set."""
    from medclipsam.config import ActorPoolConfig
    from medclipsam.pipeline.ray_runner import _placement

    assert _placement(ActorPoolConfig()) == {"num_cpus": 0.75, "num_gpus": 0.0}
    gpu = ActorPoolConfig.model_validate({"num_gpus": 1, "num_cpus": 2, "resources": {"sam_node": 1}})
    assert _placement(gpu) == {"num_cpus": 2.0, "num_gpus": 1.0, "resources": {"sam_node": 1.0}}


# -- attempts in tracking ---------------------------------------------------------------------------
def test_reruns_are_attempts_that_keep_earlier_figures(tmp_path, tracking_uri):
    """First run, a no-op rerun that needs no Ray, and a rerun after one record was deleted."""
    from mlflow import MlflowClient

    from medclipsam.config import parse_config
    from medclipsam.pipeline.job import Job
    from medclipsam.pipeline.run import run_job

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(3):
        image = np.full((40, 48), 40, np.uint8)
        image[10 + i : 25 + i, 12:30] = 200
        Image.fromarray(image).save(images / f"c{i}.png")
        Image.fromarray(((image > 100) * 255).astype(np.uint8)).save(labels / f"c{i}.png")
    config = parse_config({"task": "t", "pipeline": {"overlays": 0},
                           "tracking": {"uri": tracking_uri, "experiment": "attempts"}})
    job = Job(config, str(images), str(tmp_path / "out"), "labels", str(labels))

    def no_ray():
        raise AssertionError("a rerun with nothing to do must not start Ray")

    first = run_job(job, "local")
    assert first.n_processed == 3 and first.counts == {"ok": 3}
    again = run_job(job, "ray", connect=no_ray)  # every case has its record: nothing to run
    assert again.n_processed == 0 and again.n_skipped == 3 and again.counts == {"ok": 3}
    (tmp_path / "out" / "records" / "c1.json").unlink()
    third = run_job(job, "local")
    assert third.n_processed == 1 and third.n_skipped == 2 and third.run_id == first.run_id
    from manifest_check import assert_manifest_is_the_records

    assert_manifest_is_the_records(tmp_path / "out", ["c0", "c1", "c2"])

    client = MlflowClient(tracking_uri)
    history = {m.step: m.value for m in client.get_metric_history(first.run_id, "attempt_cases_per_s")}
    assert sorted(history) == [1, 2, 3]
    assert history[1] == pytest.approx(first.metrics["attempt_cases_per_s"]) and history[1] > 0  # kept
    assert history[2] == 0.0 and history[3] == pytest.approx(third.metrics["attempt_cases_per_s"])
    processed = {m.step: m.value for m in client.get_metric_history(first.run_id, "attempt_n_processed")}
    assert processed == {1: 3.0, 2: 0.0, 3: 1.0}
    latest = client.get_run(first.run_id).data.metrics  # the latest step: the whole output
    assert latest["n_cases"] == 3 and latest["n_ok"] == 3 and latest["attempts"] == 3
    assert latest["n_processed"] == 4  # the attempts that processed cases: 3 + 1
    seconds = first.metrics["attempt_wall_seconds"] + third.metrics["attempt_wall_seconds"]
    assert latest["cases_per_s"] == pytest.approx(4 / seconds)
    run_file = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [a["n_processed"] for a in run_file["attempts"]] == [3, 0, 1]


def test_cases_are_read_a_few_to_a_block():
    import math

    from medclipsam.pipeline.pools import CASES_PER_BLOCK, MAX_BLOCKS, read_blocks

    for cases in (1, 2, 7, 8, 9, 40, 400, 10_000, 1_000_000):
        for cpus in (1.0, 2.0, 16.0, 500.0):
            blocks = read_blocks(cases, cpus)
            assert 1 <= blocks <= min(cases, MAX_BLOCKS)
            if blocks < min(cases, MAX_BLOCKS):  # not capped: a few cases each, and every CPU kept reading
                assert blocks >= math.ceil(cases / CASES_PER_BLOCK) and blocks >= 2 * math.ceil(cpus)
    assert read_blocks(400, 2.0) == 50 and read_blocks(10, 16.0) == 10 and read_blocks(3, 2.0) == 3


def test_a_slice_sam_cannot_take_fails_alone_in_its_call():
    """A SAM call may take several slices (sam.batch_size, at least pipeline.sam_rows_per_call); when
    the encoder fails on one image, the call is tried row by row: that slice records the error, the
    others get the masks they get without it."""
    from medclipsam.config import PipelineConfig, SamConfig
    from medclipsam.models.sam_backends import build_segmenter
    from medclipsam.pipeline.ray_runner import sam_rows_per_call
    from medclipsam.pipeline.stages import add_masks

    assert sam_rows_per_call(SamConfig(), PipelineConfig(), "cpu") == 1  # the CPU encoder's default
    assert sam_rows_per_call(SamConfig(), PipelineConfig(sam_rows_per_call=8), "cpu") == 8  # bundled
    assert sam_rows_per_call(SamConfig(batch_size=16), PipelineConfig(sam_rows_per_call=8), "cuda") == 16
    images = []
    for k in range(4):
        image = np.full((64, 64, 3), 20, np.uint8)
        image[10 + 4 * k : 40 + 2 * k, 12:44 - k] = 200
        images.append(image)
    geometry = json.dumps({"is_volume": False, "shape": [64, 64], "axis": 0, "spacing": [1, 1], "origin": [0, 0],
                           "direction": [1, 0, 0, 1]})

    def rows(indices):
        return [SliceRow("c", "/in/c.nii.gz", slice=k, n_slices=4, geometry=Geometry.from_json(geometry),
                         image=images[k].copy(), prompts=SlicePrompts(np.array([[10.0, 8, 46, 44]])))
                for k in indices]

    segmenter = build_segmenter("litemedsam")
    embed = segmenter.embed

    def embed_but_not_the_third(batch, *args, **kwargs):
        if any(np.array_equal(image, images[2]) for image in batch):
            raise RuntimeError("cannot take it")
        return embed(batch, *args, **kwargs)

    alone = add_masks(segmenter, rows([0, 1, 3]), SamConfig())
    segmenter.embed = embed_but_not_the_third
    together = add_masks(segmenter, rows([0, 1, 2, 3]), SamConfig())
    assert [r.slice for r in together] == [0, 1, 2, 3]
    assert together[2].error == "SAM: cannot take it" and not together[2].sam_ran
    for want, got in zip(alone, [together[0], together[1], together[3]], strict=True):
        assert not got.error and got.sam_ran and got.mask.any()
        np.testing.assert_array_equal(got.mask, want.mask)
