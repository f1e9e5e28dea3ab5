"""The driver as the cohort grows: its peak memory at 10,000 and at 100,000 cases, the time to the
first case, and a no-op rerun's time per case.

What runs: ``--cases`` tiny synthetic 2D cases (``--size`` square grey PNGs with a bright square,
and its label under ``labels/``) on local disk, through ``run_job`` on a local Ray of ``--cpus``
CPUs in labels mode, as ``medclipsam pseudolabel --prompt-source labels`` runs them (tracked in an
MLflow sqlite store, overlays off, the report written). SAM is ``benchmarks/overhead.py``'s
zero-cost stage (each prompt box is the mask), ``--batch-size`` as ``sam.batch_size`` (8: what a GPU
pool takes by default, as on a cluster), so what is left is the pipeline's own cost: the
driver plans the cases, streams the records into parts, assembles the manifest and writes the
report. Each run is a fresh driver process, so its peak RSS (``ru_maxrss``) is its own: the first
``--small`` cases of the cohort (a cohort of their own), then all ``--cases``, then the same
command again over the finished large output, which has nothing left to do.

``ratio`` is the large run's peak over the small one's (goal: at most 1.2, a driver that keeps
nothing per case); ``first_case_s`` the large run's seconds from the start of ``run_job`` to its
first record (planning every case, starting the stream); ``rerun_ms_per_case`` the no-op rerun's
wall time over the cases (reading the parts, assembling and writing the manifest and report).

Last line: ``rss_10k_mb=<v> rss_100k_mb=<v> ratio=<v> first_case_s=<v> rerun_ms_per_case=<v>``
(the names say 10k and 100k whatever ``--small`` and ``--cases`` are).

Ray Data keeps some bookkeeping per block in the driver, and a SAM call's output is a block:
``--rows-per-call 8`` (``pipeline.sam_rows_per_call``: at least 8 slices a call whatever
``--batch-size``) took the driver's growth at ``--batch-size 1`` from 4.5 to 2.8 KB a case
(``docs/benchmarks.md``).

    python benchmarks/scale.py [--cases 100000] [--small 10000] [--size 32] [--cpus 2] [--batch-size 8]
        [--rows-per-call 0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def cohort(root: Path, n: int, size: int) -> Path:
    """``n`` grey PNGs with one bright square each, and its label under ``labels/``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        y, x = rng.integers(2, size // 2, 2)
        side = int(rng.integers(4, size // 3))
        label = np.zeros((size, size), np.uint8)
        label[y:y + side, x:x + side] = 255
        picture = (rng.normal(60, 15, (size, size)) + (label > 0) * 120).clip(0, 255).astype(np.uint8)
        Image.fromarray(picture).save(root / "images" / f"c{i:06d}.png")
        Image.fromarray(label).save(root / "labels" / f"c{i:06d}.png")
    return root


def _subset(cohort_root: Path, root: Path, n: int) -> Path:
    """The first ``n`` cases of the cohort, linked into a cohort of their own."""
    for part in ("images", "labels"):
        (root / part).mkdir(parents=True)
        for name in sorted(os.listdir(cohort_root / part))[:n]:
            os.symlink(cohort_root / part / name, root / part / name)
    return root


def drive(data: Path, output: Path, tracking: str, cpus: int, batch: int, rows: int) -> None:
    """One driver (this process): the run, then its figures as JSON on the last line."""
    from overhead import BoxSam
    from pipeline import _start_ray

    from medclipsam.cli.common import task_config
    from medclipsam.pipeline.job import Job
    from medclipsam.pipeline.run import run_job

    config = task_config(None, batch_size=batch, pipeline={"overlays": 0, "sam_rows_per_call": rows or None},
                         tracking={"uri": tracking, "experiment": "scale"})
    job = Job(config, str(data / "images"), str(output), "labels", str(data / "labels"))
    first: list[float] = []

    def progress(number, total, record) -> None:
        if not first:
            first.append(time.perf_counter())

    start = time.perf_counter()
    result = run_job(job, "ray", progress, connect=lambda: _start_ray(cpus), sam_stage=BoxSam)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "first_s": (first[0] - start) if first else 0.0,
                      "processed": result.n_processed, "skipped": result.n_skipped, "counts": result.counts,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _driver(data: Path, output: Path, tracking: str, cpus: int, batch: int, rows: int) -> dict:
    command = [sys.executable, __file__, "--drive", str(data), str(output), tracking, str(cpus), str(batch),
               str(rows)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the driver failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--drive"]:
        drive(Path(argv[1]), Path(argv[2]), argv[3], int(argv[4]), int(argv[5]), int(argv[6]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000, help="cases of the large run")
    parser.add_argument("--small", type=int, default=10_000, help="cases of the small run")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for Ray")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="sam.batch_size, images per encoder call (8 a GPU pool's default, 1 a CPU one's); "
                             "a SAM actor call takes at least --rows-per-call slices")
    parser.add_argument("--rows-per-call", type=int, default=0,
                        help="pipeline.sam_rows_per_call: slices per SAM actor call at least (0: as --batch-size)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if not 1 <= args.small < args.cases or args.size < 16 or args.batch_size < 1:
        parser.error("need 1 <= --small < --cases, --size at least 16 and --batch-size at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="medclipsam-scale-"))
    from mlflow import MlflowClient

    try:
        start = time.perf_counter()
        data = cohort(work / "cohort", args.cases, args.size)
        small = _subset(data, work / "small-cohort", args.small)
        print(f"cohort of {args.cases} cases in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        tracking = f"sqlite:///{work / 'mlflow.db'}"
        MlflowClient(tracking).search_experiments()  # the store's schema, before any driver
        runs = {}
        for name, folder in (("small", small), ("large", data)):
            runs[name] = _driver(folder, work / name, tracking, args.cpus, args.batch_size, args.rows_per_call)
            print(f"{name}: {runs[name]}", file=sys.stderr)
            expected = args.small if name == "small" else args.cases
            assert runs[name]["counts"] == {"ok": expected}, runs[name]
        rerun = _driver(data, work / "large", tracking, args.cpus, args.batch_size, args.rows_per_call)
        print(f"rerun: {rerun}", file=sys.stderr)
        assert rerun["processed"] == 0 and rerun["skipped"] == args.cases, rerun
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ratio = runs["large"]["rss_mb"] / runs["small"]["rss_mb"]
    print(f"small_s={runs['small']['seconds']:.1f} large_s={runs['large']['seconds']:.1f} "
          f"large_cases_per_s={args.cases / runs['large']['seconds']:.1f} rerun_s={rerun['seconds']:.2f} "
          f"rerun_rss_mb={rerun['rss_mb']:.0f} workdir={work if args.keep else '-'}")
    print(f"rss_10k_mb={runs['small']['rss_mb']:.1f} rss_100k_mb={runs['large']['rss_mb']:.1f} ratio={ratio:.3f} "
          f"first_case_s={runs['large']['first_s']:.2f} rerun_ms_per_case={1000 * rerun['seconds'] / args.cases:.3f}")


if __name__ == "__main__":
    main()
