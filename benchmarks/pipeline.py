"""The Ray Data pseudo-labelling pipeline against a single-process loop, and the driver's memory.

Speed: the same synthetic 2D cases go through the single-process runner (one process, torch given
all the cores, the stage functions one after another) and through the Ray runner (Ray started with
the same number of CPUs; a saliency actor and a SAM actor pool working at the same time). Both
timings include loading the models. CPU default: a small BiomedCLIP-shaped CLIP with random
weights (ViT-Ti/16, 2-layer BERT) and the real LiteMedSAM; ``--gpu``: BiomedCLIP's shapes
(ViT-B/16 + BERT-base) and both pools sharing one GPU.

Memory: peak RSS of the driver process for a run over 200 and over 2,000 slices (``--memory-slices``;
synthetic volumes of 100 slices, box prompts from labels on two slices per volume, so the rows, not
the model, dominate), each in a fresh process (Ray on 2 CPUs, ``--sam-actors`` SAM actors).
Streaming keeps the two close; materialising would grow ~10x.

Last line: ``speedup=<ratio> rss_200_mb=<v> rss_2000_mb=<v>`` (the keys name the two
``--memory-slices``); the line above it has the rest.

    python benchmarks/pipeline.py [--cases 96] [--cpus 2] [--steps 10] [--copies 10] [--sam-actors 2]
                                  [--memory-slices 200 2000] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))

SLICES_PER_VOLUME = 100


def synthetic_images(folder: Path, n: int, size: int = 160, seed: int = 0) -> Path:
    """``n`` grey PNGs: noise with one bright disc at a random place."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.integers(40, size - 40), rng.integers(40, size - 40), rng.integers(12, 30)
        pixels = rng.normal(80, 20, (size, size))
        pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 100
        sitk.WriteImage(sitk.GetImageFromArray(np.clip(pixels, 0, 255).astype(np.uint8)), str(folder / f"c{i:04d}.png"))
    return folder


def synthetic_volumes(root: Path, n_slices: int, size: int = 64, seed: int = 0) -> Path:
    """Volumes of 100 slices (images/ and labels/), each labelled on two slices."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for v in range(n_slices // SLICES_PER_VOLUME):
        volume = rng.normal(100, 20, (SLICES_PER_VOLUME, size, size)).astype(np.int16)
        label = np.zeros(volume.shape, np.uint8)
        for k in (40, 41):
            label[k, 20:40, 24:44] = 1
        volume[label > 0] += 120
        for kind, array in (("images", volume), ("labels", label)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((0.8, 0.8, 2.5))
            sitk.WriteImage(image, str(root / kind / f"v{v:03d}.nii.gz"))
    return root


def _config(clip_dir: str, tracking: str, args, source_gpu: bool):
    from medclipsam.config import parse_config

    share = 0.5 if source_gpu else 0.0  # both pools on one GPU
    return parse_config({
        "task": "benchmark", "text": {"prompts": ["a bright round lesion"], "clip_model": clip_dir},
        "saliency": {"steps": args.steps, "copies": args.copies, "batch_size": 4},
        # LiteMedSAM's encoder is fastest one image at a time on CPU (cache-bound), so both runs use 1.
        "sam": {"backend": "litemedsam", "batch_size": 1 if not source_gpu else 8,
                "device": "cuda" if source_gpu else "cpu"},
        "pipeline": {"saliency": {"actors": 1, "num_gpus": share, "num_cpus": 0.5},
                     "sam": {"actors": args.sam_actors, "num_gpus": share, "num_cpus": 0.5},
                     "task_cpus": 0.25, "overlays": 0},
        "tracking": {"uri": tracking, "experiment": "benchmark"},
    })


def _start_ray(cpus: int) -> None:
    import ray

    quiet = "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning"
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": quiet}})
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def memory_run(n_slices: int, work: Path, sam_actors: int = 2) -> None:
    """One labels-mode run over ``n_slices``; prints the driver's peak RSS in MB as JSON."""
    from medclipsam.config import parse_config
    from medclipsam.pipeline.job import Job
    from medclipsam.pipeline.run import run_job

    data = synthetic_volumes(work / f"volumes{n_slices}", n_slices)
    _start_ray(2)
    config = parse_config({"task": "memory", "pipeline": {"overlays": 0, "saliency": {"num_cpus": 0.5},
                                                           "sam": {"actors": sam_actors, "num_cpus": 0.5}},
                           "tracking": {"uri": f"sqlite:///{work / f'mlflow{n_slices}.db'}"}})
    start = time.perf_counter()
    result = run_job(Job(config, str(data / "images"), str(work / f"run{n_slices}"), "labels", str(data / "labels")))
    assert result.counts["ok"] == n_slices // SLICES_PER_VOLUME, result.counts
    print(json.dumps({"rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - start}))


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM; ru_maxrss would include the
    parent's peak, which Linux carries across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure_memory(n_slices: int, work: Path, sam_actors: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-run", str(n_slices), "--work", str(work),
                          "--sam-actors", str(sam_actors)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"memory run over {n_slices} slices failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=96)
    parser.add_argument("--cpus", type=int, default=2, help="cores for both: torch threads and Ray CPUs")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--sam-actors", type=int, default=2)
    parser.add_argument("--memory-slices", type=int, nargs=2, default=[200, 2000], metavar=("SMALL", "LARGE"),
                        help=f"slices of the two memory runs, multiples of {SLICES_PER_VOLUME}")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--memory-run", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    small_slices, large_slices = args.memory_slices
    if small_slices >= large_slices or any(n < 1 or n % SLICES_PER_VOLUME for n in args.memory_slices):
        parser.error(f"--memory-slices: two multiples of {SLICES_PER_VOLUME}, the smaller first")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_run:
        memory_run(args.memory_run, Path(args.work), args.sam_actors)
        return

    import torch
    from m2ib import random_clip

    from medclipsam.models.biomedclip import save_clip
    from medclipsam.pipeline.job import Job
    from medclipsam.pipeline.run import run_job

    work = Path(tempfile.mkdtemp(prefix="medclipsam-bench-"))
    shapes = ("vit_base_patch16_224", 12, 768) if args.gpu else ("vit_tiny_patch16_224", 2, 128)
    clip_dir = str(save_clip(random_clip(*shapes, 512, "cpu"), work / "clip"))
    images = synthetic_images(work / "images", args.cases)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    from mlflow import MlflowClient

    MlflowClient(tracking).search_experiments()  # create the store (schema migrations) before timing
    config = _config(clip_dir, tracking, args, args.gpu)

    torch.set_num_threads(args.cpus)
    start = time.perf_counter()  # the local runner loads both models, as the Ray actors do
    loop = run_job(Job(config, str(images), str(work / "loop"), "text"), "local", resume=False, track=False).records
    loop_s = time.perf_counter() - start

    _start_ray(args.cpus)
    start = time.perf_counter()
    result = run_job(Job(config, str(images), str(work / "ray"), "text"))
    ray_s = time.perf_counter() - start
    import ray

    ray.shutdown()
    same = np.mean([np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(a.mask_uri)),
                                   sitk.GetArrayFromImage(sitk.ReadImage(b.mask_uri)))  # same masks?
                    for a, b in zip(loop, result.records, strict=True)])

    small, large = (_measure_memory(n, work, args.sam_actors) for n in (small_slices, large_slices))
    print(f"cases={args.cases} cpus={args.cpus} gpu={args.gpu} clip={shapes[0]} steps={args.steps} "
          f"copies={args.copies} sam_actors={args.sam_actors} loop_s={loop_s:.1f} ray_s={ray_s:.1f} "
          f"loop_cases_per_s={args.cases / loop_s:.3f} ray_cases_per_s={args.cases / ray_s:.3f} "
          f"identical_masks={same:.3f} rss_{small_slices}_s={small['seconds']:.1f} "
          f"rss_{large_slices}_s={large['seconds']:.1f} "
          f"rss_ratio={large['rss_mb'] / small['rss_mb']:.3f}")
    print(f"speedup={loop_s / ray_s:.3f} rss_{small_slices}_mb={small['rss_mb']:.1f} "
          f"rss_{large_slices}_mb={large['rss_mb']:.1f}")


if __name__ == "__main__":
    main()
