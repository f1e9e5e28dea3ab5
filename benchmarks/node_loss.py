"""A worker node lost in the middle of a labels-mode pseudolabel run on a two-node Ray cluster.

Two Ray nodes on this machine (``ray.cluster_utils.Cluster``: a head and a worker, each with its
own raylet, object store and ``--cpus`` CPUs) run ``medclipsam pseudolabel --prompt-source labels``
on the sample volumes (real MR and CT, real LiteMedSAM) through ``--address``, as a user joins a
cluster. The first run has no fault: its time is the baseline. The second run's worker node is
killed (its raylet and workers, no graceful drain) once ``--kill-after`` case records are written;
Ray Data retries the lost tasks and restarts the lost actors on the head. Then: every planned case
is in the manifest once (``lost``, ``duplicated``), and each mask equals the fault-free run's
voxel for voxel (``masks_equal``). ``slowdown`` is the fault run's time over the baseline's.

Both runs share the machine's disk, so this measures recovery, not remote storage.

Last line: ``nodes=<n> cases=<n> killed_at=<case> lost=<n> duplicated=<n> masks_equal=<0|1> slowdown=<v>``

    python benchmarks/node_loss.py [--volumes brain1 lung1 ...] [--cpus 2] [--kill-after 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOLUMES = ("brain1", "brain2", "breast1", "lung1", "lung2")


def cohort(root: Path, volumes: list[str]) -> Path:
    """The chosen sample volumes and their labels, linked into ``root``."""
    from medclipsam.storage.samples import fetch_samples

    samples = fetch_samples()
    for part in ("images", "labels"):
        (root / part).mkdir(parents=True)
        for name in volumes:
            (root / part / f"{name}.nrrd").symlink_to(samples / part / f"{name}.nrrd")
    return root


def pseudolabel(address: str, data: Path, output: Path, tracking: str, log) -> subprocess.Popen:
    """The user's command, joining the cluster at ``address``; its output goes to ``log``."""
    # Both nodes are on this machine, so its disk is shared: the config says so (a cluster of two
    # nodes refuses local paths otherwise).
    config = data.parent / "shared.yaml"
    config.write_text("task: node-loss\npipeline: {shared_filesystem: true}\n")
    command = [str(Path(sys.executable).parent / "medclipsam"), "pseudolabel", "--prompt-source", "labels",
               "--input", str(data / "images"), "--gt", str(data / "labels"), "--output", str(output),
               "--address", address, "--tracking-uri", tracking, "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def timed_run(cluster, worker, data: Path, output: Path, tracking: str, kill_after: int | None) -> tuple[float, int]:
    """Seconds the command took, and how many records were written when the worker was killed (-1: not)."""
    killed_at = -1
    with open(output.with_suffix(".log"), "w") as log:
        start = time.perf_counter()
        process = pseudolabel(cluster.address, data, output, tracking, log)
        while process.poll() is None:
            time.sleep(0.2)
            written = len(list((output / "records").glob("*.json"))) if (output / "records").is_dir() else 0
            if kill_after is not None and killed_at < 0 and written >= kill_after:
                cluster.remove_node(worker, allow_graceful=False)
                killed_at = written
        seconds = time.perf_counter() - start
    if process.returncode != 0:
        tail = "\n".join(output.with_suffix(".log").read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"pseudolabel failed ({process.returncode}); the end of {output.with_suffix('.log')}:\n{tail}")
    return seconds, killed_at


def compare(planned: list[str], base: Path, fault: Path) -> dict:
    """Cases lost or repeated in the fault run's manifest, and whether its masks equal the baseline's."""
    from medclipsam.domain.images import read_mask
    from medclipsam.domain.records import read_manifest

    def rows(run: Path) -> list[dict]:
        return read_manifest(str(run / "manifest.parquet")).select(["case_id", "mask_uri"]).to_pylist()

    fault_rows, base_rows = rows(fault), rows(base)
    ids = [r["case_id"] for r in fault_rows]
    fault_masks = {r["case_id"]: r["mask_uri"] for r in fault_rows}
    equal = len(base_rows) == len(planned) and all(
        r["case_id"] in fault_masks
        and np.array_equal(read_mask(r["mask_uri"]).array, read_mask(fault_masks[r["case_id"]]).array)
        for r in base_rows)
    return {"lost": len(set(planned) - set(ids)), "duplicated": len(ids) - len(set(ids)),
            "masks_equal": int(equal)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", nargs="*", default=list(VOLUMES), help="sample volumes [default: all five]")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of each node")
    parser.add_argument("--kill-after", type=int, default=2, help="kill the worker once this many records exist")
    args = parser.parse_args()
    if not 0 < args.kill_after < len(args.volumes):
        parser.error("--kill-after must be at least 1 and fewer than the volumes")

    from ray.cluster_utils import Cluster

    work = Path(tempfile.mkdtemp(prefix="node-loss-"))
    data = cohort(work / "cohort", args.volumes)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    figures = {}
    for name, kill_after in (("base", None), ("fault", args.kill_after)):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus})
        worker = cluster.add_node(num_cpus=args.cpus)
        cluster.wait_for_nodes()
        try:
            figures[name] = timed_run(cluster, worker, data, work / name, tracking, kill_after)
        finally:
            cluster.shutdown()
    found = compare(args.volumes, work / "base", work / "fault")
    (base_s, _), (fault_s, killed_at) = figures["base"], figures["fault"]
    print(f"base_s={base_s:.1f} fault_s={fault_s:.1f} work={work}")
    print(f"nodes=2 cases={len(args.volumes)} killed_at={killed_at} lost={found['lost']} "
          f"duplicated={found['duplicated']} masks_equal={found['masks_equal']} slowdown={fault_s / base_s:.3f}")


if __name__ == "__main__":
    main()
