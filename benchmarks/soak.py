"""Soak test: the Ray pseudo-labelling pipeline over many small cases, for drift, memory and losses.

What runs: ``--cases`` synthetic 2D cases (``--size`` square grey PNGs, noise with one bright disc,
and the disc's label under ``labels/``, written to ``<workdir>/cohort``) go through ``run_job`` on
one local Ray of ``--cpus`` CPUs, as ``medclipsam pseudolabel --prompt-source labels`` runs them:
the command's default task config, box prompts from the ground truth, the real LiteMedSAM on the
CPU, tracked in an MLflow sqlite store in the work folder (``<workdir>/mlflow.db``), output in
``<workdir>/run``.

What it measures:

- throughput over time: the progress callback stamps the wall-clock time of every completed case.
  The run is cut into tenths by case count; the cases/s of each tenth is its number of cases over
  the time from the previous tenth's last case (for the first tenth: from the call to ``run_job``)
  to its own last case. The first tenth therefore includes the actors' start-up (model loading,
  Ray Data planning), so it is the slowest and ``throughput_drift`` (last tenth / first tenth) is
  expected to be above 1; a drift well below the middle tenths' ratios, or tenths slowing down one
  after another, is what a leak or a growing backlog looks like.
- the driver's peak memory (VmHWM, as ``benchmarks/pipeline.py`` measures it), in MB. It includes
  writing the cohort, which holds one image at a time.
- errors: cases whose record status in the final manifest is ``error``; lost: planned cases that
  have no row in the final manifest (read back from ``<workdir>/run/manifest.parquet``), plus the
  extra rows of any case that appears more than once.

Last line: ``cases=<n> errors=<n> lost=<n> rss_peak_mb=<v> throughput_drift=<ratio>``; the line
above it has the cases/s of each tenth, the one above that the rest.

    python benchmarks/soak.py [--cases 5000] [--size 64] [--workdir DIR] [--cpus N]
    python benchmarks/soak.py --resume --workdir DIR

``--workdir`` must not hold an earlier soak's ``cohort`` or ``run``; without it a new temp folder is
used and kept (its path is printed). A soak stopped part way (killed, machine shut down) goes on with
``--resume``: the pipeline resumes its output as ``medclipsam pseudolabel`` would, and the figures
cover the whole soak. Every completed case is logged to ``<workdir>/soak-progress.jsonl`` (one JSON
line per case, one per segment start), so the throughput is measured on an *active* clock that leaves
out the time between segments, and ``rss_peak_mb`` is the highest driver peak of any segment
(sampled at every case). A resumed soak therefore also counts as a kill-and-resume test: ``lost``
is read from the final manifest over every planned case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))

from pipeline import _start_ray, peak_rss_mb  # a sibling benchmark script

TENTHS = 10
PROGRESS_LOG = "soak-progress.jsonl"


def disc_cohort(root: Path, n: int, size: int, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """``n`` grey PNGs with one bright disc each (``images/``) and its label (``labels/``)."""
    rng = np.random.default_rng(seed)
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    yy, xx = np.mgrid[:size, :size]
    width = len(str(n - 1))
    low, high = max(2, size // 10), max(3, size // 4)  # radius range
    case_ids = []
    for i in range(n):
        r = int(rng.integers(low, high))
        cy, cx = rng.integers(r + 1, size - r - 1, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        pixels = rng.normal(80, 20, (size, size))
        pixels[disc] += 100
        case_id = f"c{i:0{width}d}"
        sitk.WriteImage(sitk.GetImageFromArray(np.clip(pixels, 0, 255).astype(np.uint8)),
                        str(images / f"{case_id}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(disc.astype(np.uint8)), str(labels / f"{case_id}.png"))
        case_ids.append(case_id)
    return images, labels, case_ids


def tenth_rates(start: float, stamps: list[float]) -> list[float]:
    """Cases/s of each tenth of the completed cases (by count), from the completion times."""
    n = len(stamps)
    rates, previous, begin = [], start, 0
    for k in range(1, TENTHS + 1):
        end = round(k * n / TENTHS)
        if end == begin:  # fewer cases than tenths
            rates.append(float("nan"))
            continue
        seconds = stamps[end - 1] - previous
        rates.append((end - begin) / seconds if seconds > 0 else float("inf"))
        previous, begin = stamps[end - 1], end
    return rates


def active_stamps(log: Path) -> tuple[list[float], list[dict]]:
    """Completion times of every logged case on a clock that runs only while a segment runs.

    Each segment's cases are stamped in seconds since that segment called ``run_job``; segment k's
    clock starts where segment k-1's last case ended. Returns the stamps and the segment lines.
    """
    stamps: list[float] = []
    segments: list[dict] = []
    offset = segment_last = 0.0
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if "segment" in entry:
            offset += segment_last
            segment_last = 0.0
            segments.append(entry)
        else:
            stamps.append(offset + entry["t"])
            segment_last = entry["t"]
    return stamps, segments


def _commit() -> str:
    out = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--workdir", default=None, help="work folder [default: a new temp folder]")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs for Ray [default: all]")
    parser.add_argument("--resume", action="store_true", help="go on with the stopped soak in --workdir")
    args = parser.parse_args(argv)
    if args.cases < 1 or args.size < 16:
        parser.error("--cases must be at least 1 and --size at least 16")
    if args.resume and not args.workdir:
        parser.error("--resume needs the --workdir of the soak to go on with")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from medclipsam.cli.common import task_config
    from medclipsam.domain.records import STATUS_ERROR, read_manifest
    from medclipsam.pipeline.job import Job
    from medclipsam.pipeline.ray_runner import cluster_pool_sizes
    from medclipsam.pipeline.run import run_job

    if args.resume:
        work = Path(args.workdir).absolute()
        if not (work / PROGRESS_LOG).is_file() or not (work / "cohort" / "images").is_dir():
            parser.error(f"{work} holds no soak to resume (no {PROGRESS_LOG} or cohort/images)")
    elif args.workdir:
        work = Path(args.workdir).absolute()
        for name in ("cohort", "run", PROGRESS_LOG):
            if (work / name).exists():
                parser.error(f"{work / name} exists: give a fresh --workdir, or --resume")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="medclipsam-soak-"))
    print(f"workdir: {work}", file=sys.stderr)

    begin = time.perf_counter()
    if args.resume:
        images, labels = work / "cohort" / "images", work / "cohort" / "labels"
        case_ids = sorted(path.stem for path in images.glob("*.png"))
        args.cases = len(case_ids)
    else:
        images, labels, case_ids = disc_cohort(work / "cohort", args.cases, args.size)
    cohort_s = time.perf_counter() - begin
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    from mlflow import MlflowClient

    MlflowClient(tracking).search_experiments()  # create the store (schema migrations) before timing
    # As `medclipsam pseudolabel --prompt-source labels --tracking-uri ...` builds it, with no --config.
    config = task_config(None, pipeline={"save_saliency": None}, tracking={"uri": tracking, "experiment": "soak"})
    job = Job(config, str(images), str(work / "run"), "labels", str(labels))
    _start_ray(args.cpus)
    from medclipsam.cli import ray_watchdog

    ray_watchdog.start(os.getpid())  # a killed soak leaves no Ray daemons behind
    import ray

    ray_cpus = int(ray.cluster_resources().get("CPU", 0))
    pools = cluster_pool_sizes(job)

    reported: list[tuple[str, str]] = []
    step = max(1, args.cases // TENTHS)
    log = (work / PROGRESS_LOG).open("a", buffering=1)  # line-buffered: a kill loses at most one line

    def progress(number: int, total: int, record) -> None:
        now = time.perf_counter() - start
        reported.append((record.case_id, record.status))
        log.write(json.dumps({"case": record.case_id, "status": record.status, "t": round(now, 4),
                              "rss_mb": round(peak_rss_mb(), 1)}) + "\n")
        if number % step == 0 or number == total:
            print(f"[{number}/{total}] {now:.1f} s", file=sys.stderr, flush=True)

    log.write(json.dumps({"segment": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": _commit(), "pid": os.getpid(),
                          "ray_cpus": ray_cpus}) + "\n")
    start = time.perf_counter()
    result = run_job(job, "ray", progress)
    run_s = time.perf_counter() - start
    ray.shutdown()
    log.close()
    stamps, segments = active_stamps(work / PROGRESS_LOG)
    logged_rss = [json.loads(line).get("rss_mb", 0.0) for line in (work / PROGRESS_LOG).read_text().splitlines()]

    rows = read_manifest(result.manifest_uri).select(["case_id", "status", "dsc"]).to_pylist()
    seen = Counter(row["case_id"] for row in rows)
    missing = sum(1 for case in case_ids if case not in seen)
    duplicated = sum(seen[case] - 1 for case in case_ids if seen[case] > 1)
    lost = missing + duplicated
    errors = sum(1 for row in rows if row["status"] == STATUS_ERROR)
    statuses = Counter(row["status"] for row in rows)
    unplanned = sum(1 for case in seen if case not in set(case_ids))
    dsc = [row["dsc"] for row in rows if row["dsc"] is not None and np.isfinite(row["dsc"])]
    rates = tenth_rates(0.0, stamps)
    drift = rates[-1] / rates[0] if rates[0] and np.isfinite(rates[0]) else float("nan")
    rss = max([peak_rss_mb(), *logged_rss])

    print(f"size={args.size} ray_cpus={ray_cpus} sam_actors={pools['sam']} cohort_s={cohort_s:.1f} "
          f"segments={len(segments)} commits={','.join(s['commit'] for s in segments)} "
          f"this_segment_s={run_s:.1f} active_s={stamps[-1] if stamps else 0:.1f} "
          f"cases_per_s={len(stamps) / stamps[-1] if stamps else 0:.3f} logged={len(stamps)} "
          f"this_segment={len(reported)} manifest_rows={len(rows)} missing={missing} "
          f"duplicated={duplicated} unplanned={unplanned} "
          f"statuses={','.join(f'{k}:{v}' for k, v in sorted(statuses.items()))} "
          f"mean_dsc={np.mean(dsc) if dsc else float('nan'):.4f} workdir={work}")
    print("cases_per_s_by_tenth=" + ",".join(f"{r:.3f}" for r in rates))
    print(f"cases={args.cases} errors={errors} lost={lost} rss_peak_mb={rss:.1f} throughput_drift={drift:.3f}")


if __name__ == "__main__":
    main()
