"""Object-store faults during a cohort run: ``medclipsam pseudolabel`` on Ray (labels mode, real
LiteMedSAM) reading its cohort from, and writing its output to, the moto S3 server on loopback.

- The store answers 503 for a while in mid-run: every read and write rides it out (retried with
  backoff), the run completes, every mask equals the fault-free single-process run's.
- The store goes down in mid-run for longer than the retry budget: the run stops with one sentence
  and exit code 1; once the store is back, the same command resumes, skips the cases finished
  before the outage (their records untouched), and ends with every case ok, once, with the same
  masks as the fault-free run.

Runs in its own process (as ``make test`` runs it): the retry budget and one botocore attempt per
call are set before Ray starts, so that the workers inherit them.
"""

from __future__ import annotations

import os

os.environ["MEDCLIPSAM_STORAGE_RETRY_SECONDS"] = "8"  # before Ray starts: its workers inherit it
os.environ["AWS_MAX_ATTEMPTS"] = "1"  # botocore's own retries off: what rides out the outage is ours

import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from disc_cohort import disc_images

from medclipsam.cli import main
from medclipsam.cli.common import task_config
from medclipsam.domain.images import read_mask
from medclipsam.eval.metrics import dice
from medclipsam.pipeline.job import Job
from medclipsam.pipeline.run import run_job

N_CASES = 8


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return disc_images(tmp_path_factory.mktemp("store-faults"), N_CASES, size=64)


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    """The fault-free masks: the single-process runner, local files, the command's default config."""
    output = tmp_path_factory.mktemp("reference")
    job = Job(task_config(None), str(cohort / "images"), str(output), "labels", str(cohort / "labels"))
    run_job(job, "local", resume=False, track=False)
    return {f"c{i}": read_mask(str(output / "masks" / f"c{i}.png")).array for i in range(N_CASES)}


@pytest.fixture()
def on_s3(cohort, s3_switch, s3_bucket, ray_session):
    """The cohort uploaded to a fresh bucket; the workers must see this module's retry settings."""
    import fsspec
    import ray

    @ray.remote(num_cpus=0)
    def worker_env() -> tuple[str | None, str | None]:
        return os.environ.get("MEDCLIPSAM_STORAGE_RETRY_SECONDS"), os.environ.get("AWS_MAX_ATTEMPTS")

    if ray.get(worker_env.remote()) != ("8", "1"):
        pytest.fail("Ray started before this module set its retry budget: run this file in its own process")
    fsspec.filesystem("s3").put(str(cohort) + "/", f"{s3_bucket}/cohort/", recursive=True)
    yield s3_switch, s3_bucket
    s3_switch.unavailable_until = 0.0
    if s3_switch.is_refusing():
        s3_switch.start()


def _records(bucket: str, prefix: str, status: bool = False) -> dict[str, object]:
    """Record objects under ``prefix``/records: their LastModified (and status), read with a client of
    our own (not fsspec, whose listing cache the run shares)."""
    import json

    import boto3

    client = boto3.client("s3")
    name = bucket.removeprefix("s3://")
    found = [item for item in client.list_objects_v2(Bucket=name, Prefix=f"{prefix}/records/").get("Contents", [])
             if item["Key"].endswith(".json") and "/parts/" not in item["Key"]]  # the cases' own, not the parts
    if not status:
        return {item["Key"].rsplit("/", 1)[-1]: item["LastModified"] for item in found}
    return {item["Key"].rsplit("/", 1)[-1]: (item["LastModified"], json.loads(
        client.get_object(Bucket=name, Key=item["Key"])["Body"].read())["status"]) for item in found}


def _when_records(bucket: str, prefix: str, n: int, action) -> threading.Thread:
    """Run ``action`` once ``n`` cases of the run have their record."""

    def watch() -> None:
        while len(_records(bucket, prefix)) < n:
            time.sleep(0.2)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _pseudolabel(bucket: str, prefix: str, tracking_uri: str):
    return CliRunner().invoke(main, [
        "pseudolabel", "--input", f"{bucket}/cohort/images", "--gt", f"{bucket}/cohort/labels",
        "--prompt-source", "labels", "--output", f"{bucket}/{prefix}", "--tracking-uri", tracking_uri])


def _check_complete(bucket: str, prefix: str, reference: dict[str, np.ndarray]) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    with fs.open(f"{bucket}/{prefix}/manifest.parquet", "rb") as handle:
        rows = pq.read_table(handle).to_pylist()
    assert sorted(r["case_id"] for r in rows) == sorted(reference)  # every case, once
    assert {r["status"] for r in rows} == {"ok"}, [(r["case_id"], r["error"]) for r in rows if r["error"]]
    for row in rows:
        mask = read_mask(row["mask_uri"]).array
        assert mask.shape == reference[row["case_id"]].shape
        assert dice(mask, reference[row["case_id"]]) > 0.99, row["case_id"]
    leftovers = [p for p in fs.find(f"{bucket}/{prefix}") if "/.tmp-" in p or "/.staging/" in p]
    assert leftovers == []


def test_a_run_rides_out_503s(on_s3, reference, tracking_uri):
    server, bucket = on_s3
    before = server.answered_503
    storm = _when_records(bucket, "run-503", 2, lambda: server.unavailable(5.0))
    result = _pseudolabel(bucket, "run-503", tracking_uri)
    assert result.exit_code == 0, result.output
    storm.join(timeout=1)
    assert not storm.is_alive() and server.answered_503 - before >= 3, "the 503s never reached the run"
    _check_complete(bucket, "run-503", reference)


def test_an_outage_stops_the_run_and_the_rerun_resumes(on_s3, reference, tracking_uri):
    server, bucket = on_s3
    down_at: list[float] = []

    def outage() -> None:
        server.stop()
        down_at.append(time.monotonic())
        time.sleep(20.0)  # longer than the 8 s budget
        server.start()

    watcher = _when_records(bucket, "run-down", 2, outage)
    stopped = _pseudolabel(bucket, "run-down", tracking_uri)
    assert down_at, "the outage never began"
    assert stopped.exit_code == 1, stopped.output
    last = stopped.output.strip().splitlines()[-1]
    assert last.startswith("error: the run stopped: case ") and "the object store did not answer" in last
    assert "run the same command again to resume once the store answers" in last
    assert "Traceback" not in stopped.output
    watcher.join()
    recorded = _records(bucket, "run-down", status=True)
    kept = {name: modified for name, (modified, status) in recorded.items() if status == "ok"}
    assert 2 <= len(kept) < N_CASES, recorded

    resumed = _pseudolabel(bucket, "run-down", tracking_uri)
    assert resumed.exit_code == 0, resumed.output
    after = _records(bucket, "run-down")
    assert {name: after[name] for name in kept} == kept  # the finished cases were skipped, not redone
    _check_complete(bucket, "run-down", reference)
