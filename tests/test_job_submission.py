"""``ray job submit`` of jobs/pseudolabel.py to a real two-node Ray cluster on loopback: a head
started with ``ray start --head`` and a worker node joined to it with ``ray start --address``,
each its own raylet, object store and CPUs. Inputs and outputs are on the moto S3 server and the
MLflow store is a tracking server, as on a real cluster, where no node shares another's disk.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from pipeline_cohort import CASES, make_cohort
from ray_nodes import RAY, free_port, listed_nodes, start_node, stop_node

REPO = Path(__file__).resolve().parents[1]
# One SAM actor per node: each node offers one `sam_node` and every actor of the pool asks for it
# (pipeline.sam.resources), so both nodes must do SAM's work.
NODE_RESOURCES = json.dumps({"sam_node": 1})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server, mlflow_server):
    """Two Ray nodes on loopback, 2 CPUs and one ``sam_node`` each; yields the dashboard address, the
    GCS address, the environment the ``ray`` commands share, and the two node IDs.

    Ray 2.60 enables token authentication on ``ray start``. The nodes and the ``ray job`` commands
    share a fresh token through their environment only: this process may hold a Ray session of
    its own, which must not see it. The nodes are started after the S3 and MLflow servers, so their
    workers inherit the endpoint and the credentials, as the nodes of a real cluster hold them.
    """
    root = tmp_path_factory.mktemp("cluster")
    # The job agent's HTTP port is fixed by default (52365): another Ray on this machine (make test's
    # other lane, or the other node here) may hold it, and then the agent never serves.
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning"}
    env.pop("RAY_ADDRESS", None)
    # Ray Data starts a pool's actors asynchronously and gives work to those that are up; a job of
    # four cases may be done by the head's actor before the worker's has loaded SAM. The job waits
    # for the whole pool here, so each node's actor gets its share and the records can show it.
    env["RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S"] = "300"
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--resources", NODE_RESOURCES,
              "--disable-usage-stats"]
    head = start_node([RAY, "start", "--head", "--port", str(gcs), "--include-dashboard", "true", "--dashboard-host",
                   "127.0.0.1", "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(free_port()),
                   *common], env, root / "head.log")
    address = f"http://127.0.0.1:{dashboard}"
    worker = None
    deadline = time.monotonic() + 180
    try:
        while len(nodes := [n for n in listed_nodes(address, env) if n.get("state") == "ALIVE"]) < 2:
            if worker is None and nodes:  # the head answers: join the worker to it
                worker = start_node([RAY, "start", "--address", f"127.0.0.1:{gcs}", "--dashboard-agent-listen-port",
                                 str(free_port()), *common], env, root / "worker.log")
            if time.monotonic() > deadline or head.poll() is not None or (worker and worker.poll() is not None):
                logs = "".join(p.read_text()[-1500:] for p in root.glob("*.log"))
                raise RuntimeError(f"the two-node cluster did not come up: {logs}")
            time.sleep(2)
        yield address, f"127.0.0.1:{gcs}", env, sorted(n["node_id"] for n in nodes)
    finally:
        for process in (worker, head):
            if process is not None:
                stop_node(process)
        # Without `ray stop`, the head's address stays in the file that a bare ray.init() would join.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{gcs}"):
            current.unlink()


def _submit(address: str, env: dict, working_dir: Path, arguments: list[str]) -> tuple[int, str]:
    """``ray job submit`` with ``working_dir`` as the job's runtime environment: it waits for the job
    and prints its logs, and its exit code is the job's. The dashboard answers before its job agent
    is up, which it reports as "No available agent"."""
    command = [RAY, "job", "submit", "--address", address, "--working-dir", str(working_dir), "--",
               sys.executable, *arguments]
    for _attempt in range(30):
        submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480, check=False)
        logs = submitted.stdout + submitted.stderr
        if "No available agent" not in logs:
            break
        time.sleep(3)
    return submitted.returncode, logs


def test_a_submitted_job_spreads_the_cohort_over_both_nodes(cluster, tmp_path, samples_root, s3_bucket,
                                                            mlflow_server):
    address, _gcs, env, node_ids = cluster
    tracking_uri = mlflow_server[0]
    cohort = make_cohort(samples_root, tmp_path / "cohort")
    fs = fsspec.filesystem("s3")
    fs.put(str(cohort) + "/", f"{s3_bucket}/cohort/", recursive=True)
    # The job's files travel to the head as its working_dir: the entry point and its config.
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    shutil.copy(REPO / "jobs" / "pseudolabel.py", job_dir)
    (job_dir / "task.yaml").write_text("task: submitted\npipeline: {sam: {resources: {sam_node: 1}}}\n")
    output = f"{s3_bucket}/runs/two-nodes"
    code, logs = _submit(address, env, job_dir, [
        "pseudolabel.py", "--config", "task.yaml", "--input", f"{s3_bucket}/cohort/images",
        "--gt", f"{s3_bucket}/cohort/labels", "--output", output, "--prompt-source", "labels",
        "--tracking-uri", tracking_uri])
    assert code == 0, logs[-3000:]
    assert "4 case(s): ok=4" in logs and "succeeded" in logs
    fs.invalidate_cache()
    with fs.open(f"{output}/manifest.parquet", "rb") as handle:
        rows = pq.read_table(handle).to_pylist()
    assert [r["case_id"] for r in rows] == CASES and all(r["status"] == "ok" for r in rows)
    assert all(r["dsc"] > 0.5 for r in rows)
    assert all(fs.exists(r["mask_uri"]) for r in rows)
    # Every record names the node(s) whose SAM actor ran on it; between them, both nodes worked.
    named = [set(r["node"].split(",")) for r in rows]
    assert all(names <= set(node_ids) for names in named) and set().union(*named) == set(node_ids), named
    # The run is on the tracking server, its manifest among its artifacts.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run_id = json.loads(fs.cat(f"{output}/run.json"))["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "manifest.parquet" in [a.path for a in client.list_artifacts(run_id)]


def test_a_local_output_on_a_two_node_cluster_is_refused_before_any_work(cluster, tmp_path, samples_root):
    """The worker node cannot write this machine's disk: exit 2 and a sentence, nothing written."""
    gcs, env = cluster[1], cluster[2]
    cohort = make_cohort(samples_root, tmp_path / "cohort")
    output = tmp_path / "run"
    config = tmp_path / "task.yaml"
    config.write_text(f"task: local\ntracking: {{uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\n")
    command = [str(Path(sys.executable).parent / "medclipsam"), "pseudolabel", "--config", str(config), "--input",
               str(cohort / "images"), "--gt", str(cohort / "labels"), "--output", str(output),
               "--prompt-source", "labels", "--address", gcs]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"error: --input {cohort / 'images'} is a local path, but the Ray cluster has 2 nodes" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not output.exists() or not any(output.iterdir())  # no run.json, no MLflow run: nothing began
    # Declared shared (every node mounts it), the run goes ahead: here the two nodes share a disk.
    for case in ("brain1", "breast1"):  # the two 2D cases are enough to show it
        for path in (cohort / "images").glob(f"{case}.*"):
            path.unlink()
    config.write_text(config.read_text() + "pipeline: {shared_filesystem: true, sam: {resources: {sam_node: 1}}}\n")
    shared = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480, check=False)
    assert shared.returncode == 0, shared.stderr[-3000:]
    rows = pq.read_table(output / "manifest.parquet").to_pylist()
    assert [r["case_id"] for r in rows] == ["brain2", "lung2"] and all(r["status"] == "ok" for r in rows)
