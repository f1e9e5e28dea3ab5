"""The weak stage on the bundled sample scans: does nnU-Net trained on degraded labels beat them?

Cases: every labelled slice of the five sample volumes (brain MRI, breast, lung CT; 27 slices), or
``--cases`` of them spread evenly over that list, windowed to 8 bits and resized to ``--size``
(128) pixels square. Pseudo-labels: the true masks degraded by a seeded rule (erosion, dilation or
a shift, chosen per case and grown until the DSC against the truth falls to 0.8 or below), standing
in for zero-shot masks. A CPU-sized training run (``--epochs``, ``--cycles``, ``--keep``,
``--iterations``, ``--val-iterations``) on those pseudo-labels, then the DSC against the true
labels, on the same slices (there is no held-out set in five volumes), of the pseudo-labels, of
``checkpoint_final`` alone, and of the cycle ensemble (mean probability > 0.2).

Last line: ``dsc_pseudo=<v> dsc_final=<v> dsc_ensemble=<v> train_s=<v>`` (``train_s``: the export,
nnU-Net's planning and preprocessing, and the training, without Ray's start-up).

    python benchmarks/weak.py [--epochs 40] [--cycles 4] [--keep 3] [--iterations 25] [--val-iterations 5]
                              [--cases N] [--size 128] [--gpu]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

SIZE = 128


def _resize(plane: np.ndarray, label: bool, size: int = SIZE) -> np.ndarray:
    image = sitk.GetImageFromArray(plane.astype(np.uint8))
    factors = (plane.shape[1] / size, plane.shape[0] / size)
    out = sitk.Resample(image, (size, size), sitk.Transform(), sitk.sitkNearestNeighbor if label else sitk.sitkLinear,
                        (0.0, 0.0), factors, (1.0, 0.0, 0.0, 1.0), 0, image.GetPixelID())
    return sitk.GetArrayFromImage(out)


def degrade(truth: np.ndarray, index: int, seed: int = 0) -> np.ndarray:
    """Erode, dilate or shift (by case) until the DSC against the truth is at most 0.8."""
    from medclipsam.eval.metrics import dice

    rng = np.random.default_rng(seed * 1000 + index)
    kind = ("erode", "dilate", "shift")[index % 3]
    direction = rng.choice([-1, 1], size=2)
    previous = truth
    for step in range(1, 40):
        if kind == "erode":
            out = ndimage.binary_erosion(truth, iterations=step)
        elif kind == "dilate":
            out = ndimage.binary_dilation(truth, iterations=step)
        else:
            out = np.roll(truth, (int(direction[0] * step), int(direction[1] * step)), axis=(0, 1))
        if not out.any():
            return previous  # an erosion that empties the mask keeps the last non-empty one
        previous = out
        if dice(out, truth) <= 0.8:
            return out
    return out


def make_cases(samples: Path, root: Path, size: int = SIZE, limit: int | None = None) -> tuple[Path, Path, Path]:
    """images/, labels/ (truth) and pseudo/ (degraded) as ``size`` x ``size`` PNGs, one per labelled
    slice (``limit``: that many of them, spread evenly)."""
    from medclipsam.ops.slicing import window_to_uint8

    folders = [root / name for name in ("images", "labels", "pseudo")]
    for folder in folders:
        folder.mkdir(parents=True)
    volumes = sorted((samples / "images").glob("*.nrrd"))
    truths = {path: sitk.GetArrayFromImage(sitk.ReadImage(str(samples / "labels" / path.name))) > 0
              for path in volumes}
    planes = [(path, int(k)) for path in volumes for k in np.flatnonzero(truths[path].any(axis=(1, 2)))]
    if limit is not None and limit < len(planes):
        planes = [planes[int(i)] for i in np.linspace(0, len(planes) - 1, limit).round()]
    index = 0
    for path in volumes:
        slices = [k for p, k in planes if p == path]
        if not slices:
            continue
        volume, truth = sitk.GetArrayFromImage(sitk.ReadImage(str(path))), truths[path]
        for k in slices:
            case = f"{path.stem}_{k:03d}"
            image = _resize(window_to_uint8(volume[k]), label=False, size=size)
            label = _resize(truth[k].astype(np.uint8), label=True, size=size) > 0
            if not label.any():
                continue
            sitk.WriteImage(sitk.GetImageFromArray(image), str(folders[0] / f"{case}.png"))
            sitk.WriteImage(sitk.GetImageFromArray(label.astype(np.uint8) * 255), str(folders[1] / f"{case}.png"))
            pseudo = degrade(label, index)
            sitk.WriteImage(sitk.GetImageFromArray(pseudo.astype(np.uint8) * 255), str(folders[2] / f"{case}.png"))
            index += 1
    return folders[0], folders[1], folders[2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--val-iterations", type=int, default=5)
    parser.add_argument("--cases", type=int, default=None, help="labelled slices to use [default: all 27]")
    parser.add_argument("--size", type=int, default=SIZE, help="image side in pixels")
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

    import ray

    from medclipsam.eval.evaluation import evaluate
    from medclipsam.storage.samples import fetch_samples
    from medclipsam.weak.dataset import cases_from_folders
    from medclipsam.weak.predict import run_weak_predict
    from medclipsam.weak.settings import WeakConfig
    from medclipsam.weak.training import run_weak_training

    work = Path(tempfile.mkdtemp(prefix="medclipsam-weak-bench-"))
    images, labels, pseudo = make_cases(fetch_samples(), work / "cases", args.size, args.cases)
    _, pseudo_summary = evaluate(str(pseudo), str(labels))
    config = WeakConfig.model_validate({
        "training": {"epochs": args.epochs, "cycles": args.cycles, "keep_per_cycle": args.keep,
                     "iterations_per_epoch": args.iterations, "val_iterations_per_epoch": args.val_iterations,
                     "augment_processes": None if args.gpu else 0},
        "prediction": {"num_gpus": 1 if args.gpu else 0, "use_mirroring": True},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "weak-benchmark"},
    })
    cases, skipped = cases_from_folders(str(images), str(pseudo))
    from mlflow import MlflowClient

    MlflowClient(config.tracking.uri).search_experiments()  # create the store (schema migrations) before timing
    ray_start_s = []

    def start_ray() -> None:
        # Called by run_weak_training once nnU-Net has preprocessed: its forked workers must not inherit Ray.
        begin = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_start_s.append(time.perf_counter() - begin)

    start = time.perf_counter()
    result = run_weak_training(cases, skipped, str(work / "run"), config, "benchmark", use_gpu=args.gpu,
                               connect=start_ray, work=work / "nnunet")
    train_s = time.perf_counter() - start - sum(ray_start_s)  # Ray's start-up left out
    scores = {}
    for members in ("final", "cycles"):
        start = time.perf_counter()
        run_weak_predict(result.ensemble_uri, str(images), str(work / f"pred_{members}"), config, str(labels),
                         members=members, runner="local")
        scores[members] = evaluate(str(work / f"pred_{members}" / "masks"), str(labels))[1]
        scores[members]["seconds"] = time.perf_counter() - start
    ray.shutdown()
    print(f"cases={len(result.cases)} epochs={args.epochs} cycles={args.cycles} keep={args.keep} "
          f"iterations={args.iterations} members={len(result.members)} gpu={args.gpu} "
          f"nsd_pseudo={pseudo_summary['nsd']:.4f} nsd_final={scores['final']['nsd']:.4f} "
          f"nsd_ensemble={scores['cycles']['nsd']:.4f} predict_final_s={scores['final']['seconds']:.1f} "
          f"predict_ensemble_s={scores['cycles']['seconds']:.1f}")
    print(f"dsc_pseudo={pseudo_summary['dsc']:.4f} dsc_final={scores['final']['dsc']:.4f} "
          f"dsc_ensemble={scores['cycles']['dsc']:.4f} train_s={train_s:.1f}")


if __name__ == "__main__":
    main()
