"""``ray job submit`` of jobs/pseudolabel.py to a real head node started with ``ray start --head``."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pipeline_cohort import CASES, make_cohort

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def head_node(tmp_path, monkeypatch):
    """A one-node Ray cluster on loopback; ``--block`` ties its processes to ours, so stopping it stops them.

    Ray 2.60 enables token authentication on ``ray start``: the node and this client share a fresh token.
    """
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    gcs, dashboard = _free_port(), _free_port()
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address",
               "127.0.0.1", "--port", str(gcs), "--num-cpus", "2", "--include-dashboard", "true",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--disable-usage-stats"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning"}
    log = open(tmp_path / "ray-start.log", "w")  # closed after the node stops
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    from ray.job_submission import JobSubmissionClient

    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    client = None
    while client is None:
        try:
            client = JobSubmissionClient(address)
        except Exception:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                tail = (tmp_path / "ray-start.log").read_text()[-2000:]
                raise RuntimeError(f"head node did not come up: {tail}") from None
            time.sleep(2)
    yield client
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
    log.close()
    # Without `ray stop`, the node's address stays in the file that a bare ray.init() would join.
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.is_file() and current.read_text().strip().endswith(f":{gcs}"):
        current.unlink()


def test_submitted_job_labels_the_cohort(head_node, tmp_path, samples_root, tracking_uri):
    from ray.job_submission import JobStatus

    cohort = make_cohort(samples_root, tmp_path / "cohort")
    config = tmp_path / "task.yaml"
    config.write_text(f"task: submitted\ntracking: {{uri: '{tracking_uri}'}}\n")
    output = tmp_path / "run"
    entrypoint = (f"{sys.executable} {REPO / 'jobs' / 'pseudolabel.py'} --config {config} "
                  f"--input {cohort / 'images'} --gt {cohort / 'labels'} --output {output} --prompt-source labels")
    job_id = head_node.submit_job(entrypoint=entrypoint)
    deadline = time.monotonic() + 420
    while (status := head_node.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                JobStatus.STOPPED}:
        assert time.monotonic() < deadline, head_node.get_job_logs(job_id)[-3000:]
        time.sleep(3)
    logs = head_node.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "4 case(s): ok=4" in logs
    rows = pq.read_table(output / "manifest.parquet").to_pylist()
    assert [r["case_id"] for r in rows] == CASES and all(r["status"] == "ok" for r in rows)
    assert all(r["dsc"] > 0.5 for r in rows)
    assert all((output / "masks" / r["mask_uri"].rsplit("/", 1)[-1]).is_file() for r in rows)
