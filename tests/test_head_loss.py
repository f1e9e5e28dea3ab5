"""The head node of a joined cluster lost in the middle of a run: the command ends with one sentence
(not Ray's 60 s of reconnect logging and abort), and the same command, once the head is back,
resumes the run without redoing the cases it had finished.

The head is a ``ray start --head --block`` process on loopback (token auth, as Ray 2.60 starts
one); ``medclipsam pseudolabel --address`` joins it from a subprocess, as a user's command does.
Once two case records are written, the head's process group is killed (SIGKILL: its GCS, raylet,
dashboard and workers).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from disc_cohort import disc_images
from ray_nodes import RAY, free_port, listed_nodes, start_node, stop_node

CASES = 6
WAIT_S = 5  # MEDCLIPSAM_HEAD_WAIT_S: how long the head may not answer before the command ends
RAY_GIVES_UP_S = 60  # Ray's own reconnect timeout (gcs_rpc_server_reconnect_timeout_s), then its abort


def _head(root: Path, env: dict, gcs: int, name: str) -> subprocess.Popen:
    dashboard = free_port()
    head = start_node([RAY, "start", "--head", "--block", "--port", str(gcs), "--node-ip-address", "127.0.0.1",
                       "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                       "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(free_port()),
                       "--disable-usage-stats"], env, root / f"{name}.log")
    deadline = time.monotonic() + 120
    try:
        while not [n for n in listed_nodes(f"http://127.0.0.1:{dashboard}", env) if n.get("state") == "ALIVE"]:
            if time.monotonic() > deadline or head.poll() is not None:
                raise RuntimeError(f"the head did not come up: {(root / f'{name}.log').read_text()[-1500:]}")
            time.sleep(1)
    except BaseException:
        stop_node(head)  # a head left running would outlive the test
        raise
    return head


def _records(output: Path) -> dict[str, int]:
    """Each written case record and the time it was last written."""
    folder = output / "records"
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")} if folder.is_dir() else {}


def test_a_lost_head_ends_the_run_with_a_sentence_and_the_same_command_resumes(tmp_path):
    data = disc_images(tmp_path / "data", CASES)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                "MEDCLIPSAM_HEAD_WAIT_S": str(WAIT_S),
                "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning"})
    gcs = free_port()
    output = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "medclipsam"), "pseudolabel", "--prompt-source", "labels",
               "--input", str(data / "images"), "--gt", str(data / "labels"), "--output", str(output),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--address", f"127.0.0.1:{gcs}"]

    head = _head(tmp_path, env, gcs, "head")
    try:
        with open(tmp_path / "first.log", "w") as log:
            run = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 300
            while len(_records(output)) < 2 and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert run.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            os.killpg(head.pid, signal.SIGKILL)
            killed = time.monotonic()
            done = _records(output)
            code = run.wait(timeout=RAY_GIVES_UP_S + 60)
            ended = time.monotonic() - killed
    finally:
        stop_node(head)
    said = (tmp_path / "first.log").read_text()
    assert code == 1, said[-3000:]
    assert WAIT_S <= ended < RAY_GIVES_UP_S, (ended, said[-3000:])  # the sentence came first, not Ray's abort
    last = [line for line in said.splitlines() if line.strip()][-1]
    # the GCS address as Ray reports it (this machine's address, not necessarily the loopback one)
    assert re.fullmatch(rf"error: the Ray cluster's head node at [0-9.]+:{gcs} has not answered for {WAIT_S} s, so "
                        "this run stopped; what it finished is kept: run the same command again once the cluster "
                        "is back, and it resumes", last), last
    assert "Traceback" not in said
    assert 2 <= len(done) < CASES and not (output / "manifest.parquet").exists()

    # The head back at the same address: the same command resumes and finishes the run.
    head = _head(tmp_path, env, gcs, "head-again")
    try:
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480, check=False)
    finally:
        stop_node(head)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = pq.read_table(output / "manifest.parquet").to_pylist()
    assert sorted(r["case_id"] for r in rows) == sorted(p.stem for p in (data / "images").iterdir())
    assert all(r["status"] == "ok" and r["dsc"] > 0.5 for r in rows)
    after = _records(output)
    assert all(after[name] == written for name, written in done.items())  # finished cases were not redone
