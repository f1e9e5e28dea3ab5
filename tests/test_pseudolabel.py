"""Cohort pseudo-labelling on Ray Data: real Ray, real LiteMedSAM, moto S3, MLflow sqlite.

The Ray runner's masks are compared with the single-process runner over the same stage functions
(box prompts from a CSV of the label boxes, and text prompts with the small CLIP), case by case.
"""

from __future__ import annotations

import io
import json
import os

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from pipeline_cohort import CASES, make_cohort

from medclipsam.cli import main
from medclipsam.config import parse_config
from medclipsam.domain.images import read_image, read_mask
from medclipsam.errors import InputError
from medclipsam.eval.metrics import dice
from medclipsam.eval.overlays import MASK_COLOUR
from medclipsam.pipeline.job import Job
from medclipsam.pipeline.ray_runner import SamStage
from medclipsam.pipeline.run import run_job
from medclipsam.prompts.csv_prompts import oracle_boxes_csv

TIMING = ("seconds_read", "seconds_saliency", "seconds_embed", "seconds_decode", "seconds_write")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, samples_root):
    return make_cohort(samples_root, tmp_path_factory.mktemp("cohort"))


def _config(tracking_uri: str, clip_dir=None, **pipeline):
    return parse_config({
        "task": "test",
        "text": {"prompts": ["A brain MRI with a bright tumour."], "clip_model": str(clip_dir or "unused")},
        "saliency": {"layer": 9, "steps": 2, "copies": 2, "batch_size": 4},
        "sam": {"backend": "litemedsam", "batch_size": 4},
        "pipeline": {"overlays": 2, **pipeline},
        "tracking": {"uri": tracking_uri, "experiment": "pseudolabel-test"},
    })


def run_pseudolabel(job: Job, **options):
    return run_job(job, "ray", **options)


def _crash_once(marker):
    """A SAM stage whose actor process dies once (the marker file records that it happened)."""

    class CrashOnce(SamStage):
        def __call__(self, batch):
            if not os.path.exists(marker):
                with open(marker, "w") as handle:
                    handle.write(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    return CrashOnce


def _first_embed_fails(stage: type[SamStage], counter, message: str) -> type[SamStage]:
    """``stage`` whose SAM image encoder raises ``message`` on its 1st call, counted over all actors."""
    from ray_faults import tick

    class FirstEmbedFails(stage):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            embed = self.segmenter.embed

            def failing_embed(*a, **k):
                if tick(str(counter)) == 1:
                    raise RuntimeError(message)
                return embed(*a, **k)

            self.segmenter.embed = failing_embed

    return FirstEmbedFails


def _one_image_fails(stage: type[SamStage], noted, message: str) -> type[SamStage]:
    """``stage`` whose SAM image encoder raises ``message`` on every call that holds one image: the
    first any actor was given (its hash noted in the file ``noted``), as an image SAM cannot take."""
    import fcntl
    import hashlib

    class OneImageFails(stage):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            embed = self.segmenter.embed

            def failing_embed(images, *a, **k):
                digests = [hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() for image in images]
                with open(noted, "a+") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    handle.seek(0)
                    poisoned = handle.read().strip()
                    if not poisoned and digests:
                        poisoned = digests[0]
                        handle.write(poisoned)
                if poisoned in digests:
                    raise RuntimeError(message)
                return embed(images, *a, **k)

            self.segmenter.embed = failing_embed

    return OneImageFails


def _fail_after(n: int):
    """A progress callback that stops the driver after ``n`` cases, as a crash would."""

    def progress(number, total, record):
        if number >= n:
            raise RuntimeError(f"injected failure after {number} case(s)")

    return progress


def _same_mask(pred: np.ndarray, expected: np.ndarray, case: str) -> None:
    """Same stages, same model: equal masks up to float noise of other batch compositions."""
    assert pred.shape == expected.shape and expected.any(), case
    assert dice(pred, expected) > 0.99, case


@pytest.fixture(scope="module")
def oracle_reference(cohort, tmp_path_factory):
    """The single-process runner on the same cases with the same label boxes, from a CSV."""
    output = tmp_path_factory.mktemp("reference")
    boxes = output / "boxes.csv"
    boxes.write_text(oracle_boxes_csv(str(cohort / "labels"), axis=0, margin=2.0))
    config = parse_config({"task": "ref", "sam": {"backend": "litemedsam", "batch_size": 4}})
    run_job(Job(config, str(cohort / "images"), str(output), "files", boxes_csv=str(boxes)), "local",
            resume=False, track=False)
    return output


def _mask(uri: str) -> np.ndarray:
    return read_mask(uri).array


def _comparable(table) -> list[dict]:
    """Manifest rows without what legitimately differs between two runs (timings, output folder)."""
    rows = table.to_pylist()
    for row in rows:
        for key in TIMING:
            row.pop(key)
        row["mask_uri"] = row["mask_uri"].rsplit("/", 1)[-1]
        for key, value in row.items():  # NaN (e.g. no attribution, no uncertainty) never equals itself
            if isinstance(value, float) and value != value:
                row[key] = "nan"
    return rows


def test_labels_mode_from_and_to_s3(cohort, s3_bucket, ray_session, tracking_uri, oracle_reference):
    fs = fsspec.filesystem("s3")
    fs.put(str(cohort) + "/", f"{s3_bucket}/cohort/", recursive=True)
    output = f"{s3_bucket}/runs/oracle"
    job = Job(_config(tracking_uri), f"{s3_bucket}/cohort/images", output, "labels", f"{s3_bucket}/cohort/labels")
    result = run_pseudolabel(job)
    assert [r.case_id for r in result.records] == CASES
    assert all(r.status == "ok" for r in result.records), [r.error for r in result.records]
    assert result.n_processed == 4 and result.n_skipped == 0
    for record in result.records:
        assert record.mask_uri.startswith(output + "/masks/")
        name = record.mask_uri.rsplit("/", 1)[-1]
        pred = _mask(record.mask_uri)
        _same_mask(pred, _mask(str(oracle_reference / "masks" / name)), record.case_id)
        truth = read_mask(record.gt_uri)
        assert record.dsc == pytest.approx(dice(pred, truth.array), abs=1e-9)
    volume = next(r for r in result.records if r.case_id == "brain1")
    source, mask = read_image(volume.source_uri), read_mask(volume.mask_uri)
    assert volume.n_slices == 8 and volume.n_prompted_slices == int(source.array.shape[0] - 1)
    assert mask.spacing == pytest.approx(source.spacing) and mask.origin == pytest.approx(source.origin)
    assert mask.direction == pytest.approx(source.direction)
    prompts = json.loads(volume.prompts)
    assert sorted(prompts, key=int) == [str(k) for k in sorted(int(k) for k in prompts)]
    # Manifest on S3 equals the returned records; the staging area is gone; overlays for the first 2 cases.
    with fs.open(f"{output}/manifest.parquet", "rb") as handle:
        manifest = pq.read_table(handle)
    assert manifest.column("case_id").to_pylist() == CASES
    assert not fs.exists(f"{output}/.staging")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{output}/overlays")) == ["brain1.png", "brain2.png"]
    # brain1's strip: every prompted slice (7, under pipeline.strip_slices' 8)
    strips = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{output}/strips"))
    assert [s for s in strips if s.startswith("brain1.")] == [f"brain1.slice{int(k):04d}.png"
                                                               for k in sorted(prompts, key=int)]
    # MLflow: params, metrics that match the manifest, and the artifacts.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["source"] == "labels" and run.data.params["sam.backend"] == "litemedsam"
    assert run.data.params["input"] == f"{s3_bucket}/cohort/images"
    assert run.data.metrics["mean_dsc"] == pytest.approx(np.mean([r.dsc for r in result.records]))
    assert run.data.metrics["n_ok"] == 4 and run.data.metrics["cases_per_s"] > 0
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"manifest.parquet", "overlays"} <= artifacts
    assert {a.path for a in client.list_artifacts(result.run_id, "overlays")} == {
        "overlays/brain1.png", "overlays/brain2.png"}
    # The HTML report, written by the run and rewritten by `report`, read from and written to S3.
    assert result.report_uri == f"{output}/report.html"
    fs.rm(f"{output}/report.html")
    out = CliRunner().invoke(main, ["report", output])
    assert out.exit_code == 0, out.output
    page = fs.cat(f"{output}/report.html").decode()
    for case in CASES:
        assert f"<td data-value='{case}'>" in page
    pictured = {s.split(".slice")[0] for s in strips}
    overlays_only = [c for c in ("brain1", "brain2") if c not in pictured]
    assert page.count("data:image/png;base64,") == len(strips) + len(overlays_only)
    assert f"{np.mean([r.dsc for r in result.records]):.4f}" in page
    assert "id='oracle-banner'" in page  # the labels are the prompts
    overlay = np.asarray(Image.open(io.BytesIO(fs.cat(f"{output}/overlays/brain2.png"))))
    drawn = (overlay == MASK_COLOUR).all(axis=-1)
    brain2 = next(r for r in result.records if r.case_id == "brain2")
    assert drawn.any() and _mask(brain2.mask_uri)[drawn].all()  # the mask's contour lies on the mask


def test_text_mode_matches_the_single_process_runner(cohort, tmp_path, ray_session, tracking_uri, tiny_clip_dir,
                                                     clip, oracle_reference):
    """Per-case prompts from a manifest; saliency is saved; masks equal the single-process runner's;
    stage attribution: its oracle column is the labels-mode mask's DSC, in both runners."""
    manifest = tmp_path / "cohort.csv"
    other = "An ultrasound image of the breast with a dark mass."
    files = {"brain1": "brain1.nii.gz", "brain2": "brain2.png", "lung2": "lung2.png"}  # 10 slices in all
    rows = ["uri,gt_uri,prompt"] + [
        f"{cohort}/images/{f},{cohort}/labels/{f}," + (f'"{other}"' if c == "brain2" else "") for c, f in files.items()]
    manifest.write_text("\n".join(rows) + "\n")
    config = _config(tracking_uri, tiny_clip_dir, save_saliency=True)
    result = run_pseudolabel(Job(config, str(manifest), str(tmp_path / "run"), "text", attribution=True))
    records = {r.case_id: r for r in result.records}
    assert set(records) == set(files) and all(r.status == "ok" for r in records.values())
    assert json.loads(records["brain2"].text_prompt) == [other]
    assert json.loads(records["brain1"].text_prompt) == config.text.prompts
    assert records["brain1"].clip_sha256 == clip.sha256 and records["brain1"].n_target_slices > 0

    reference = {r.case_id: r for r in run_job(Job(config, str(manifest), str(tmp_path / "ref"), "text",
                                                   attribution=True), "local", resume=False, track=False).records}
    for case in files:
        pred = _mask(records[case].mask_uri)
        _same_mask(pred, _mask(reference[case].mask_uri), case)
        assert records[case].n_target_slices == reference[case].n_target_slices > 0
        assert records[case].prompts == reference[case].prompts
        saliency = np.load(tmp_path / "run" / "saliency" / f"{case}.npy")
        assert saliency.shape == pred.shape and 0.0 <= saliency.min() and saliency.max() <= 1.0
        # SAM prompted with the truth's boxes, from the text run's own embeddings, is the oracle run's mask
        truth = _mask(f"{cohort}/labels/{files[case]}")
        oracle = _mask(str(oracle_reference / "masks" / records[case].mask_uri.rsplit("/", 1)[-1]))
        assert records[case].dsc_oracle == pytest.approx(dice(oracle, truth), abs=0.01), case
        assert records[case].dsc_oracle == pytest.approx(reference[case].dsc_oracle, abs=0.01), case
        coarse = _mask(str(tmp_path / "run" / "coarse" / records[case].mask_uri.rsplit("/", 1)[-1]))
        assert records[case].dsc_coarse == pytest.approx(dice(coarse, truth)), case
    assert result.metrics["mean_dsc_oracle"] == pytest.approx(np.mean([r.dsc_oracle for r in records.values()]))


def test_resume_after_a_failure_skips_completed_cases(cohort, tmp_path, ray_session, tracking_uri, oracle_reference):
    config = _config(tracking_uri)
    output = tmp_path / "run"
    job = Job(config, str(cohort / "images"), str(output), "labels", str(cohort / "labels"))
    with pytest.raises(RuntimeError, match="injected failure"):
        run_pseudolabel(job, progress=_fail_after(2))
    done = sorted(p.stem for p in (output / "records").glob("*.json"))
    assert len(done) >= 2 and not (output / "manifest.parquet").exists()
    stamps = {c: (output / "masks" / next(p.name for p in (output / "masks").iterdir() if p.name.startswith(c + ".")))
              .stat().st_mtime_ns for c in done}
    resumed = run_pseudolabel(job)
    assert resumed.n_skipped == len(done) and resumed.n_processed == len(CASES) - len(done)
    for case, stamp in stamps.items():  # completed cases were not recomputed
        mask = next(p for p in (output / "masks").iterdir() if p.name.startswith(case + "."))
        assert mask.stat().st_mtime_ns == stamp
    # The uninterrupted run also loses its SAM actor once: Ray restarts it and retries the batch.
    marker = tmp_path / "crashed"
    uninterrupted = run_pseudolabel(Job(config, str(cohort / "images"), str(tmp_path / "whole"), "labels",
                                        str(cohort / "labels")), sam_stage=_crash_once(str(marker)))
    assert marker.exists()  # the actor process did die once
    assert [r.status for r in uninterrupted.records] == ["ok"] * len(CASES)
    import ray  # one node: every record names it, the node this driver is on

    assert {r.node for r in uninterrupted.records} == {ray.get_runtime_context().get_node_id()}
    assert _comparable(pq.read_table(output / "manifest.parquet")) == _comparable(
        pq.read_table(tmp_path / "whole" / "manifest.parquet"))
    from manifest_check import assert_manifest_is_the_records  # resumed or not, the records in plan order

    assert_manifest_is_the_records(output, CASES)
    assert_manifest_is_the_records(tmp_path / "whole", CASES)
    for record in uninterrupted.records:
        name = record.mask_uri.rsplit("/", 1)[-1]
        assert np.array_equal(_mask(str(output / "masks" / name)), _mask(record.mask_uri))
        _same_mask(_mask(record.mask_uri), _mask(str(oracle_reference / "masks" / name)), record.case_id)
    from mlflow import MlflowClient

    runs = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("pseudolabel-test").experiment_id])
    assert len(runs) == 2  # the resumed output kept its MLflow run; the uninterrupted one has its own
    # Changed settings on the same output are refused rather than mixed into one manifest.
    changed = parse_config({**config.model_dump(), "sam": {**config.sam.model_dump(), "threshold": 0.6}})
    with pytest.raises(InputError, match=r"run\.json: this output was written with other settings"):
        run_pseudolabel(Job(changed, str(cohort / "images"), str(output), "labels", str(cohort / "labels")))


def test_corrupt_and_missing_objects_are_error_rows(cohort, s3_bucket, ray_session, tracking_uri, tmp_path):
    """Through the CLI, from a manifest on S3: the other cases complete and the exit code is 0."""
    fs = fsspec.filesystem("s3")
    fs.put(str(cohort) + "/", f"{s3_bucket}/cohort/", recursive=True)
    fs.pipe(f"{s3_bucket}/cohort/images/corrupt.nii.gz", b"\x1f\x8b this is not a volume")
    lines = ["case_id,uri,gt_uri", "brain2,images/brain2.png,labels/brain2.png", "corrupt,images/corrupt.nii.gz,",
             f"missing,{s3_bucket}/cohort/images/missing.png,", "lung2,images/lung2.png,labels/lung2.png"]
    fs.pipe(f"{s3_bucket}/cohort/manifest.csv", ("\n".join(lines) + "\n").encode())
    config = tmp_path / "task.yaml"
    config.write_text(f"task: t\ntracking: {{uri: '{tracking_uri}'}}\npipeline: {{overlays: 0}}\n")
    output = f"{s3_bucket}/runs/cli"
    result = CliRunner().invoke(main, ["pseudolabel", "--config", str(config), "--input",
                                       f"{s3_bucket}/cohort/manifest.csv", "--output", output,
                                       "--prompt-source", "labels"])
    assert result.exit_code == 0, result.output
    assert "4 case(s): error=2, ok=2 (0 done earlier, 4 now" in result.output
    with fs.open(f"{output}/manifest.parquet", "rb") as handle:
        rows = {r["case_id"]: r for r in pq.read_table(handle).to_pylist()}
    assert rows["brain2"]["status"] == rows["lung2"]["status"] == "ok"
    assert rows["corrupt"]["status"] == "error" and "corrupt.nii.gz: cannot read image" in rows["corrupt"]["error"]
    assert rows["missing"]["status"] == "error" and "missing.png: no such file or object" in rows["missing"]["error"]
    assert rows["lung2"]["gt_uri"] == f"{s3_bucket}/cohort/labels/lung2.png" and rows["lung2"]["dsc"] > 0.5


def test_read_and_write_tasks_load_no_model_code(cohort, ray_session, tmp_path):
    """In a fresh Ray worker, the CPU stages read a volume, stage and assemble it, and score it
    against its truth without torch or MONAI ever being imported."""
    import ray

    def read_then_write(task: dict, output: str) -> tuple[list[dict], list[str]]:
        import sys

        import numpy as np

        from medclipsam.config import parse_config
        from medclipsam.domain.images import read_mask
        from medclipsam.pipeline.assembly import AssemblySettings
        from medclipsam.pipeline.cpu_tasks import read_case, write_slice
        from medclipsam.pipeline.job import Job

        job = Job(parse_config({"task": "probe"}), "unused", output, "labels")
        truth = read_mask(task["gt_uri"]).array > 0
        records = []
        for row in read_case(task, job):
            row["mask"] = np.roll(truth[row["slice"]], 2, axis=1)  # a prediction two pixels off
            records += write_slice(row, AssemblySettings(output, "labels"))
        heavy = ("torch", "torchvision", "monai", "open_clip", "timm", "transformers", "segment_anything")
        return records, [name for name in heavy if name in sys.modules]

    task = {"case_id": "brain1", "uri": str(cohort / "images" / "brain1.nii.gz"),
            "gt_uri": str(cohort / "labels" / "brain1.nii.gz")}
    fresh = {"env_vars": {"HF_HUB_OFFLINE": "1", "MEDCLIPSAM_FRESH_WORKER": "writer-probe"}}
    records, loaded = ray.get(ray.remote(read_then_write).options(runtime_env=fresh).remote(task, str(tmp_path)))
    assert loaded == []
    truth = read_mask(task["gt_uri"])
    expected = np.roll(truth.array > 0, 2, axis=2)
    assert [r["status"] for r in records] == ["ok"] and records[0]["n_slices"] == truth.array.shape[0]
    assert np.array_equal(read_mask(records[0]["mask_uri"]).array > 0, expected)
    assert records[0]["dsc"] == pytest.approx(dice(expected, truth.array > 0))
    # A shift of 2 pixels (spacing < 1 mm in-plane) keeps every boundary voxel within 2 mm.
    assert 0.0 < records[0]["hd95"] <= 2 * max(truth.spacing[:2]) + 1e-6


def test_registered_pipeline_reproduces_its_run(tmp_path, ray_session, tracking_uri, tiny_clip_dir):
    """``models register-pipeline`` pins the CLIP alias to its version; ``pseudolabel --pipeline`` then
    reproduces the run's masks exactly, even after the CLIP alias has moved to other weights, and
    refuses to run once a pinned weights file has changed."""
    import shutil

    import yaml
    from disc_cohort import disc_images
    from mlflow import MlflowClient
    from registry_models import register_clip
    from tiny_clip import save_tiny_biomedclip

    from medclipsam.registry import gate

    client = MlflowClient(tracking_uri)
    sam = tmp_path / "litemedsam.pth"  # a copy of the SAM weights, so that the test can change them
    from medclipsam.models.sam_backends import BACKENDS

    shutil.copy(BACKENDS["litemedsam"].default_checkpoint(), sam)
    assert register_clip(tiny_clip_dir, "discs-clip", tracking_uri) == "1"
    gate.promote(client, gate.Request("discs-clip", "1", force=True, reason="test"), None)
    data = disc_images(tmp_path / "data", 3, size=64, seed=5)
    task = tmp_path / "task.yaml"
    task.write_text(yaml.safe_dump({"task": "discs", "saliency": {"steps": 2, "copies": 2},
                                    "sam": {"backend": "litemedsam", "checkpoint": str(sam)},
                                    "text": {"prompts": ["a bright round disc"],
                                             "clip_model": "models:/discs-clip@champion"}}))
    common = ["--input", str(data / "images"), "--tracking-uri", tracking_uri]
    first = CliRunner().invoke(main, ["pseudolabel", "--config", str(task), "--output", str(tmp_path / "a"), *common])
    assert first.exit_code == 0, first.output
    registered = CliRunner().invoke(main, ["models", "register-pipeline", "discs-pipeline", "--config", str(task),
                                           "--tracking-uri", tracking_uri])
    assert registered.exit_code == 0, registered.output
    assert "CLIP: models:/discs-clip/1" in registered.output
    assert "registered models:/discs-pipeline/1" in registered.output
    gate.promote(client, gate.Request("discs-pipeline", "1", force=True, reason="test"), None)

    # The CLIP alias moves on to other weights: the pipeline still runs version 1
    assert register_clip(save_tiny_biomedclip(tmp_path / "other-clip", seed=7), "discs-clip", tracking_uri) == "2"
    gate.promote(client, gate.Request("discs-clip", "2", force=True, reason="test"), None)
    second = CliRunner().invoke(main, ["pseudolabel", "--pipeline", "models:/discs-pipeline@champion",
                                       "--output", str(tmp_path / "b"), *common])
    assert second.exit_code == 0, second.output
    rows = {o: {r["case_id"]: r for r in pq.read_table(tmp_path / o / "manifest.parquet").to_pylist()}
            for o in ("a", "b")}
    assert sorted(rows["a"]) == sorted(rows["b"]) == ["c0", "c1", "c2"]
    for case, row in rows["b"].items():
        assert row["status"] == rows["a"][case]["status"] == "ok"
        assert row["clip_model"] == "models:/discs-clip/1" and row["clip_sha256"] == rows["a"][case]["clip_sha256"]
        assert np.array_equal(read_mask(row["mask_uri"]).array, read_mask(rows["a"][case]["mask_uri"]).array)
    pins = json.loads((tmp_path / "b" / "run.json").read_text())["models"]
    assert [(p["role"], p["uri"], p["version"]) for p in pins] == [
        ("pipeline", "models:/discs-pipeline/1", "1"), ("clip", "models:/discs-clip/1", "1")]

    # Options that would change the pipeline are refused; changed weights stop it before any work
    mixed = CliRunner().invoke(main, ["pseudolabel", "--pipeline", "models:/discs-pipeline/1", "--config", str(task),
                                      "--output", str(tmp_path / "c"), *common])
    assert mixed.exit_code == 2 and "--pipeline brings its own config and models: drop --config" in mixed.output
    sam.write_bytes(sam.read_bytes()[:-8] + b"\0" * 8)
    changed = CliRunner().invoke(main, ["pseudolabel", "--pipeline", "models:/discs-pipeline/1",
                                        "--output", str(tmp_path / "d"), *common])
    assert changed.exit_code == 2 and "cannot be reproduced" in changed.output, changed.output
    assert not (tmp_path / "d").exists()


def test_read_sam_and_write_faults_lose_nothing(cohort, tmp_path, ray_session, tracking_uri, oracle_reference):
    """The 1st read and the 3rd write fail (counted over every worker process), and SAM's encoder fails
    on every call holding one image (the first it was given: a SAM call of several slices is then
    tried slice by slice, and only that one fails). The run goes on and records those cases as
    errors with their cause; one resume completes them, with the fault-free run's masks; no case is
    missing from the manifest or twice."""
    from ray_faults import FailNth

    from medclipsam.pipeline.cpu_tasks import read_case, write_slice

    FlakySam = _one_image_fails(SamStage, tmp_path / "poisoned-image", "injected SAM failure")

    config = _config(tracking_uri)
    output = tmp_path / "run"
    job = Job(config, str(cohort / "images"), str(output), "labels", str(cohort / "labels"))
    first = run_pseudolabel(job, sam_stage=FlakySam, read=FailNth(read_case, 1, tmp_path / "reads", "read"),
                            write=FailNth(write_slice, 3, tmp_path / "writes", "write"))
    failed = {r.case_id: r.error for r in first.records if r.status == "error"}
    assert all("injected" in error for error in failed.values()), failed  # each failure names its cause
    causes = " | ".join(failed.values())
    assert "injected read failure" in causes and "SAM: injected SAM failure" in causes, failed
    assert sum("SAM: injected SAM failure" in error for error in failed.values()) == 1  # the poisoned slice's case
    assert sorted(r.case_id for r in first.records) == sorted(CASES)
    resumed = run_pseudolabel(job)
    assert resumed.n_processed == len(failed) and resumed.n_skipped == len(CASES) - len(failed)
    rows = pq.read_table(output / "manifest.parquet").to_pylist()
    assert sorted(r["case_id"] for r in rows) == sorted(CASES)  # each case once
    assert [r["status"] for r in rows] == ["ok"] * len(CASES)
    for row in rows:
        name = row["mask_uri"].rsplit("/", 1)[-1]
        _same_mask(_mask(row["mask_uri"]), _mask(str(oracle_reference / "masks" / name)), row["case_id"])


def test_propagated_volumes_on_ray_match_the_single_process_runner(cohort, tmp_path, ray_session, tracking_uri):
    """``--propagate`` from one key slice per volume (the truth's largest): Ray's one-volume-per-call SAM
    stage gives the single-process runner's masks exactly. Its first call fails: that case is an error
    row naming the cause, the others finish, and a resume completes it with the same mask."""
    from medclipsam.pipeline.ray_runner import PropagationStage

    FailsFirst = _first_embed_fails(PropagationStage, tmp_path / "propagation-calls", "injected propagation failure")

    config = _config(tracking_uri)
    config = config.model_copy(update={
        "propagation": config.propagation.model_copy(update={"enabled": True}),
        "oracle": config.oracle.model_copy(update={"key_slices": 1})})
    local = {r.case_id: r for r in run_job(Job(config, str(cohort / "images"), str(tmp_path / "local"), "labels",
                                               str(cohort / "labels")), "local", track=False).records}
    job = Job(config, str(cohort / "images"), str(tmp_path / "ray"), "labels", str(cohort / "labels"))
    first = {r.case_id: r for r in run_job(job, "ray", propagation_stage=FailsFirst).records}
    failed = [case for case, r in first.items() if r.status == "error"]
    assert len(failed) == 1 and "injected propagation failure" in first[failed[0]].error
    assert sorted(first) == sorted(CASES) and all(r.status == "ok" for c, r in first.items() if c not in failed)
    resumed = run_job(job, "ray", propagation_stage=FailsFirst)
    assert resumed.n_processed == 1 and all(r.status == "ok" for r in resumed.records)
    for record in resumed.records:
        expected = _mask(local[record.case_id].mask_uri)
        assert np.array_equal(_mask(record.mask_uri), expected), record.case_id
        assert record.n_sam_slices == local[record.case_id].n_sam_slices
    volume = next(r for r in resumed.records if r.case_id == "brain1")
    assert volume.n_prompted_slices == 1 and 1 < volume.n_sam_slices <= 8


def test_text_propagated_volumes_on_ray_match_the_single_process_runner(cohort, tmp_path, ray_session,
                                                                        tracking_uri, tiny_clip_dir):
    """Text mode with ``--propagate``: Ray's propagation actor, holding CLIP and SAM, runs M2IB on the
    same sampled slices and gives the single-process runner's masks; a 2D image runs M2IB once."""
    manifest = tmp_path / "cohort.csv"
    files = {"brain1": "brain1.nii.gz", "brain2": "brain2.png"}
    manifest.write_text("uri\n" + "".join(f"{cohort}/images/{f}\n" for f in files.values()))
    config = _config(tracking_uri, tiny_clip_dir)
    config = config.model_copy(update={
        "propagation": config.propagation.model_copy(update={"enabled": True, "text_every": 2})})
    local = {r.case_id: r for r in run_job(Job(config, str(manifest), str(tmp_path / "local"), "text"), "local",
                                           track=False).records}
    remote = {r.case_id: r for r in run_job(Job(config, str(manifest), str(tmp_path / "ray"), "text"),
                                            "ray").records}
    assert set(remote) == set(files) and all(r.status in {"ok", "no_target"} for r in remote.values())
    assert remote["brain1"].n_slices == 8 and remote["brain1"].n_m2ib_slices == 4 == local["brain1"].n_m2ib_slices
    assert remote["brain2"].n_m2ib_slices == 1 == local["brain2"].n_m2ib_slices
    for case, record in remote.items():
        assert record.status == local[case].status, case
        assert record.n_sam_slices == local[case].n_sam_slices and record.prompts == local[case].prompts, case
        pred, expected = _mask(record.mask_uri), _mask(local[case].mask_uri)
        if expected.any():
            _same_mask(pred, expected, case)
        else:
            assert pred.shape == expected.shape and not pred.any(), case
    # the tiny CLIP's maps do find a key slice here: the volume's chain ran, so the comparison is not of empties
    assert remote["brain1"].n_prompted_slices == 1 and 1 < remote["brain1"].n_sam_slices <= 8
