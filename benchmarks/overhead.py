"""The orchestration ceiling: the Ray pipeline's slices/s and CPU per slice when SAM costs nothing.

What runs: ``--slices`` synthetic 2D cases (``--size`` square grey PNGs, noise with one bright
disc, and the disc's label under ``labels/``; each case is one slice) go through ``run_job`` on one
local Ray of ``--cpus`` CPUs in labels mode, as ``medclipsam pseudolabel --prompt-source labels``
runs them (the command's default task config, tracked in an MLflow sqlite store in the work
folder, created before timing), writes included: masks, records, overlays, the manifest, the
report. Only the SAM stage is the benchmark's own: a subclass of the pipeline's ``SamStage``,
injected through ``run_job``'s ``sam_stage`` as the fault tests inject theirs, that loads no model
and returns each prompt box as the mask. What is left is the pipeline's own cost: Ray Data,
converting rows, reading, assembling, scoring, writing, and the driver's bookkeeping.

What it measures: wall-clock time of ``run_job`` (Ray is started before it), and the CPU time
(user + system) spent during it by the driver process (all its threads, less the sampler's own)
and by the Ray worker processes (the processes titled ``ray::...``: task workers and actors),
read with psutil every ``--sample-s`` seconds; Ray's daemons (raylet, GCS, agents) are reported
apart as ``system``. A worker that exits between two samples loses its last interval.

Last line: ``slices=<n> slices_per_s=<v> driver_cpu_ms=<v> worker_cpu_ms=<v>`` (the CPU figures
per slice); the line above it has the breakdown (seconds to the first record, the steady rate
after it, the totals, the daemons' share, the mean DSC of the box masks). There is no baseline
in the same run: the figures stand alone.

    python benchmarks/overhead.py [--slices 400] [--size 256] [--cpus 2] [--sample-s 0.5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).parent))

from labels_run import labelled_images  # sibling benchmark scripts
from pipeline import _start_ray

from medclipsam.pipeline.ray_runner import SamStage, batch_to_rows, rows_to_batch
from medclipsam.pipeline.slices import NO_IMAGE, NO_MASK


class BoxSam(SamStage):
    """A SAM stage that costs nothing: each prompt box, filled, is the mask (no model is loaded).

    It fills the fields ``stages.add_masks`` fills, so the writers see what they would see."""

    def __init__(self, settings, device: str, attribution: bool = False) -> None:  # no super(): no model
        self.settings, self.attribution = settings, attribution

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = batch_to_rows(batch)
        for row in rows:
            row.mask = NO_MASK if row.error else np.zeros(row.image.shape[:2], dtype=bool)
            if not row.error and row.prompts is not None:
                for x0, y0, x1, y1 in row.prompts.boxes:
                    row.mask[max(0, int(np.ceil(y0))):int(y1) + 1, max(0, int(np.ceil(x0))):int(x1) + 1] = True
            row.oracle_mask = NO_MASK
            row.seconds_embed = row.seconds_decode = 0.0
            row.backend, row.checkpoint, row.checkpoint_sha256 = "box", "", ""
            if not row.overlay:
                row.image = NO_IMAGE
        return rows_to_batch(rows)


class CpuSampler:
    """CPU seconds of this process and of its descendants (Ray's daemons and workers), by kind.

    Every process's CPU time is read at each tick; its last reading minus its first (zero for a
    process born after ``start``) is what it spent while the sampler ran."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.me = psutil.Process()
        self.first: dict[tuple[int, float], float] = {}
        self.last: dict[tuple[int, float], tuple[str, float]] = {}
        self.own_cpu = 0.0  # the sampler thread's own CPU, taken off the driver's
        self.peak_workers = 0  # the most worker processes alive at one reading
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _kind(process: psutil.Process) -> str:
        try:
            title = (process.cmdline() or [process.name()])[0]
        except (psutil.Error, IndexError):
            return "system"
        return "worker" if title.startswith("ray::") else "system"

    def _read(self, initial: bool = False) -> None:
        workers = 0
        for process in self.me.children(recursive=True):
            try:
                with process.oneshot():
                    key = (process.pid, process.create_time())
                    times = process.cpu_times()
                    # a worker is titled ray::... only once it has started: until then, ask again
                    known = self.last.get(key, ("system", 0.0))[0]
                    kind = known if known == "worker" else self._kind(process)
            except psutil.Error:
                continue
            cpu = times.user + times.system
            if key not in self.first:
                self.first[key] = cpu if initial else 0.0  # a process born since start spent all of it
            self.last[key] = (kind, cpu)
            workers += kind == "worker"
        self.peak_workers = max(self.peak_workers, workers)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            begin = time.thread_time()
            self._read()
            self.own_cpu += time.thread_time() - begin

    def _driver_cpu(self) -> float:
        times = self.me.cpu_times()
        return times.user + times.system

    def start(self) -> None:
        self._read(initial=True)
        self.driver_start = self._driver_cpu()
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        driver = self._driver_cpu() - self.driver_start - self.own_cpu
        self._read()
        spent = {"driver": driver, "worker": 0.0, "system": 0.0}
        for key, (kind, cpu) in self.last.items():
            spent[kind] += cpu - self.first[key]
        spent["workers_seen"] = sum(1 for kind, _ in self.last.values() if kind == "worker")
        spent["workers_peak"] = self.peak_workers
        return spent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=400, help="2D cases of one slice each")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for Ray")
    parser.add_argument("--sample-s", type=float, default=0.5, help="seconds between CPU readings")
    args = parser.parse_args(argv)
    if args.slices < 1 or args.size < 96:
        parser.error("--slices must be at least 1 and --size at least 96")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from mlflow import MlflowClient

    from medclipsam.cli.common import task_config
    from medclipsam.pipeline.job import Job
    from medclipsam.pipeline.run import run_job

    work = Path(tempfile.mkdtemp(prefix="medclipsam-overhead-"))
    data = labelled_images(work / "cohort", args.slices, size=args.size)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    MlflowClient(tracking).search_experiments()  # create the store (schema migrations) before timing
    config = task_config(None, pipeline={"save_saliency": None}, tracking={"uri": tracking, "experiment": "overhead"})
    job = Job(config, str(data / "images"), str(work / "run"), "labels", str(data / "labels"))
    _start_ray(args.cpus)
    import ray

    stamps: list[float] = []
    sampler = CpuSampler(args.sample_s)
    sampler.start()
    start = time.perf_counter()
    result = run_job(job, "ray", lambda number, total, record: stamps.append(time.perf_counter()), sam_stage=BoxSam)
    run_s = time.perf_counter() - start
    spent = sampler.stop()
    ray.shutdown()
    assert result.counts.get("ok") == args.slices, result.counts

    n = args.slices
    first_s = stamps[0] - start
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
    dsc = float(np.mean([r.dsc for r in result.records]))
    print(f"size={args.size} cpus={args.cpus} run_s={run_s:.2f} first_record_s={first_s:.2f} "
          f"last_record_s={stamps[-1] - start:.2f} steady_slices_per_s={steady:.2f} "
          f"driver_cpu_s={spent['driver']:.2f} worker_cpu_s={spent['worker']:.2f} "
          f"system_cpu_s={spent['system']:.2f} system_cpu_ms={1000 * spent['system'] / n:.2f} "
          f"workers_seen={spent['workers_seen']:.0f} workers_peak={spent['workers_peak']:.0f} "
          f"mean_dsc={dsc:.4f} workdir={work}")
    print(f"slices={n} slices_per_s={n / run_s:.3f} driver_cpu_ms={1000 * spent['driver'] / n:.2f} "
          f"worker_cpu_ms={1000 * spent['worker'] / n:.2f}")


if __name__ == "__main__":
    main()
