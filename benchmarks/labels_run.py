"""Labels-mode pseudo-labelling: pools sized by ``actors: auto`` against one SAM actor, and the
peak memory of a write task before and after the writers stopped importing torch and MONAI.

Speed: the same synthetic 2D cases with labels (box prompts from the truth, real LiteMedSAM, one
image per batch) go through ``run_job`` twice on one local Ray of ``--cpus`` CPUs: once with
``pipeline.sam.actors: 1`` (the old default), once with ``auto``. Both timings include loading the
models into the actors; Ray is started once, before either.

Memory: a fresh process runs the write stage (``cpu_tasks.write_slice``) over the rows of
``--write-cases`` scored 2D cases and one scored volume of ``--volume-slices`` slices, and
reports its peak RSS (VmHWM). The baseline process first imports what the write tasks used to
load (the model stages, hence torch, and MONAI's metrics) and scores with MONAI, as they did.

Last line: ``labels_speedup=<ratio> writer_rss_mb=<v>``; the line above it has the rest.

    python benchmarks/labels_run.py [--cases 48] [--cpus 2] [--write-cases 40] [--volume-slices 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))

from pipeline import _start_ray, peak_rss_mb  # a sibling benchmark script


def labelled_images(root: Path, n: int, size: int = 160, seed: int = 0) -> Path:
    """``n`` grey PNGs with one bright disc each, and its label under ``labels/``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.integers(40, size - 40), rng.integers(40, size - 40), rng.integers(12, 30)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        pixels = rng.normal(80, 20, (size, size))
        pixels[disc] += 100
        picture = np.clip(pixels, 0, 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(picture), str(root / "images" / f"c{i:04d}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(disc.astype(np.uint8)), str(root / "labels" / f"c{i:04d}.png"))
    return root


def _labels_config(actors: int | str, tracking: str):
    from medclipsam.config import parse_config

    return parse_config({"task": "labels-benchmark", "sam": {"backend": "litemedsam", "batch_size": 1},
                         "pipeline": {"sam": {"actors": actors}, "overlays": 0},
                         "tracking": {"uri": tracking, "experiment": "benchmark"}})


def throughput(cases: int, cpus: int, work: Path) -> dict:
    """Cases per second of a labels-mode run with one SAM actor and with ``auto`` pools."""
    from medclipsam.pipeline.job import Job
    from medclipsam.pipeline.ray_runner import cluster_pool_sizes
    from medclipsam.pipeline.run import run_job

    data = labelled_images(work / "cohort", cases)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    from mlflow import MlflowClient

    MlflowClient(tracking).search_experiments()  # create the store before timing
    _start_ray(cpus)
    figures: dict = {}
    for name, actors in (("one", 1), ("auto", "auto")):
        job = Job(_labels_config(actors, tracking), str(data / "images"), str(work / f"run_{name}"), "labels",
                  str(data / "labels"))
        figures[f"{name}_actors"] = cluster_pool_sizes(job)["sam"]
        start = time.perf_counter()
        result = run_job(job)
        figures[f"{name}_s"] = time.perf_counter() - start
        assert result.counts["ok"] == cases, result.counts
        figures[f"{name}_dsc"] = float(np.mean([r.dsc for r in result.records]))
    import ray

    ray.shutdown()
    return figures


# -- the write stage's memory --------------------------------------------------------------------------
def _write_rows(work: Path, cases: int, volume_slices: int) -> tuple[list[dict], str]:
    """Rows as the SAM stage hands them to the writers (Ray's columns): 2D cases, then one volume's slices."""
    from medclipsam.config import ImageConfig
    from medclipsam.domain.images import read_mask
    from medclipsam.pipeline.slices import NO_IMAGE, CaseTask, case_slices

    rng = np.random.default_rng(1)
    data = labelled_images(work / "write_cohort", cases, size=256, seed=1)
    volume = rng.normal(100, 20, (volume_slices, 256, 256)).astype(np.int16)
    label = np.zeros(volume.shape, np.uint8)
    label[volume_slices // 4:volume_slices - volume_slices // 4, 80:170, 60:190] = 1
    for kind, array in (("images", volume), ("labels", label)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(image, str(data / kind / "vol.nii.gz"))
    rows = []
    for case in sorted(p.stem.split(".")[0] for p in (data / "images").iterdir()):
        suffix = ".nii.gz" if case == "vol" else ".png"
        task = CaseTask(case, str(data / "images" / f"{case}{suffix}"), str(data / "labels" / f"{case}{suffix}"))
        truth = read_mask(task.gt_uri).array
        for row in case_slices(task, ImageConfig(), "labels"):
            k = row.slice
            plane = truth if k < 0 else truth[k]
            plane = plane[..., 0] if plane.ndim == 3 else plane
            noisy = np.roll(plane > 0, 3, axis=1)  # a prediction a few pixels off the truth
            rows.append({**row.to_columns(), "image": NO_IMAGE, "mask": noisy, "seconds_embed": 0.0,
                         "seconds_decode": 0.0, "backend": "litemedsam", "checkpoint": "", "checkpoint_sha256": ""})
    return rows, str(data)


def writer_run(work: Path, baseline: bool, cases: int, volume_slices: int) -> None:
    """Run the write stage over prepared rows in this (fresh) process; print its peak RSS as JSON."""
    import pickle

    rows = pickle.loads((work / "rows.pkl").read_bytes())
    if baseline:  # what a write task loaded before: the model stages and MONAI's metrics
        import torch
        from monai.metrics import compute_hausdorff_distance, compute_surface_dice

        import medclipsam.eval.evaluation as evaluation
        import medclipsam.pipeline.stages  # noqa: F401
        from medclipsam.eval.metrics import CaseMetrics, dice

        def monai_score(pred, pred_uri, truth, tolerance):
            spacing = list(truth.spacing_array_order if truth.is_volume else (1.0, 1.0))
            p, t = torch.as_tensor(pred > 0)[None, None], torch.as_tensor(truth.array > 0)[None, None]
            nsd = compute_surface_dice(p, t, [tolerance], include_background=True, spacing=spacing)
            hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)
            return CaseMetrics(dice(pred > 0, truth.array > 0), float(nsd[0, 0]), float(hd[0, 0]))

        import medclipsam.pipeline.assembly as assembly

        assembly.score_mask = monai_score
        del evaluation
    from medclipsam.pipeline.assembly import AssemblySettings
    from medclipsam.pipeline.cpu_tasks import write_slice

    settings = AssemblySettings(str(work / ("out_before" if baseline else "out_after")), "labels")
    start = time.perf_counter()
    records = [r for row in rows for r in write_slice(row, settings)]
    statuses = [(r["case_id"], r["status"], r["error"]) for r in records]
    assert len(records) == cases + 1 and all(s[1] == "ok" for s in statuses), statuses
    print(json.dumps({"rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - start,
                      "nsd": float(np.mean([r["nsd"] for r in records])),
                      "torch": "torch" in sys.modules}))


def writer_memory(work: Path, cases: int, volume_slices: int) -> dict:
    import pickle

    rows, _ = _write_rows(work, cases, volume_slices)
    (work / "rows.pkl").write_bytes(pickle.dumps(rows))
    out = {}
    for name, flag in (("before", ["--baseline"]), ("after", [])):
        done = subprocess.run([sys.executable, __file__, "--writer-run", "--work", str(work),
                               "--write-cases", str(cases), "--volume-slices", str(volume_slices), *flag],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"writer run ({name}) failed:\n{done.stderr[-3000:]}")
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=48)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--write-cases", type=int, default=40)
    parser.add_argument("--volume-slices", type=int, default=60)
    parser.add_argument("--writer-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.writer_run:
        writer_run(Path(args.work), args.baseline, args.write_cases, args.volume_slices)
        return
    work = Path(tempfile.mkdtemp(prefix="medclipsam-labels-"))
    memory = writer_memory(work, args.write_cases, args.volume_slices)
    speed = throughput(args.cases, args.cpus, work)
    before, after = memory["before"], memory["after"]
    print(f"cases={args.cases} cpus={args.cpus} one_actor_s={speed['one_s']:.1f} auto_s={speed['auto_s']:.1f} "
          f"auto_actors={speed['auto_actors']} one_cases_per_s={args.cases / speed['one_s']:.3f} "
          f"auto_cases_per_s={args.cases / speed['auto_s']:.3f} dsc_one={speed['one_dsc']:.4f} "
          f"dsc_auto={speed['auto_dsc']:.4f} write_cases={args.write_cases} volume_slices={args.volume_slices} "
          f"writer_rss_before_mb={before['rss_mb']:.1f} writer_torch_before={before['torch']} "
          f"writer_torch_after={after['torch']} writer_s_before={before['seconds']:.2f} "
          f"writer_s_after={after['seconds']:.2f} nsd_before={before['nsd']:.6f} nsd_after={after['nsd']:.6f}")
    print(f"labels_speedup={speed['one_s'] / speed['auto_s']:.3f} writer_rss_mb={after['rss_mb']:.1f}")


if __name__ == "__main__":
    main()
