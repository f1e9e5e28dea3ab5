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
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def head_node(tmp_path):
    """A one-node Ray cluster on loopback; ``--block`` ties its processes to ours, so stopping it stops them.

    Ray 2.60 enables token authentication on ``ray start``. The node and the ``ray job`` commands
    share a fresh token through their environment only: this process may hold a Ray session of
    its own, which must not see it. Yields the dashboard address and that environment.
    """
    # The job agent's HTTP port is fixed by default (52365): another Ray on this machine (make test's
    # other lane) may hold it, and then the agent never serves, so every submission is refused.
    gcs, dashboard, agent = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning"}
    env.pop("RAY_ADDRESS", None)
    command = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
               "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(agent), "--disable-usage-stats"]
    log = open(tmp_path / "ray-start.log", "w")  # closed after the node stops
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 180
    while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True,
                         check=False).returncode != 0:
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            tail = (tmp_path / "ray-start.log").read_text()[-2000:]
            raise RuntimeError(f"head node did not come up: {tail}")
        time.sleep(3)
    yield address, env
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
    address, env = head_node
    cohort = make_cohort(samples_root, tmp_path / "cohort")
    config = tmp_path / "task.yaml"
    config.write_text(f"task: submitted\ntracking: {{uri: '{tracking_uri}'}}\n")
    output = tmp_path / "run"
    # `ray job submit` waits for the job and prints its logs; its exit code is the job's. The
    # dashboard answers before its job agent is up, which it reports as "No available agent".
    command = [RAY, "job", "submit", "--address", address, "--", sys.executable, str(REPO / "jobs" / "pseudolabel.py"),
               "--config", str(config), "--input", str(cohort / "images"), "--gt", str(cohort / "labels"),
               "--output", str(output), "--prompt-source", "labels"]
    for _attempt in range(30):
        submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480, check=False)
        logs = submitted.stdout + submitted.stderr
        if "No available agent" not in logs:
            break
        time.sleep(3)
    assert submitted.returncode == 0, logs[-3000:]
    assert "4 case(s): ok=4" in logs and "succeeded" in logs
    rows = pq.read_table(output / "manifest.parquet").to_pylist()
    assert [r["case_id"] for r in rows] == CASES and all(r["status"] == "ok" for r in rows)
    assert all(r["dsc"] > 0.5 for r in rows)
    assert all((output / "masks" / r["mask_uri"].rsplit("/", 1)[-1]).is_file() for r in rows)
