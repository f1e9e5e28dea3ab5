"""``medclipsam tune`` with the shared cache against the same search recomputing everything.

The published grid (beta 0.1/1/2 x layer 7/8/9; ``--betas``, ``--layers``) crossed with two coarse
methods (``--methods``; 18 trials) on ``--images`` labelled synthetic 160 x 160 images, with a small
BiomedCLIP-shaped CLIP (random weights, ViT-Ti/16 plus a 2-layer BERT; ``--gpu``: BiomedCLIP's
shapes) and the real LiteMedSAM, on one local Ray.
Cached: the tokens before the bottleneck once per (layer, image), each map once per (layer,
beta, image), SAM's embedding once per image. Uncached: every trial computes its maps and
embeddings again. Both must pick the same best trial.

Last line: ``trials=<n> cached_s=<v> uncached_s=<v> speedup=<v>``.

    python benchmarks/tune.py [--images 6] [--steps 10] [--copies 10] [--cpus 2] [--betas 0.1 1 2]
                              [--layers 7 8 9] [--methods kmeans threshold] [--gpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))

from labels_run import labelled_images
from m2ib import random_clip  # a sibling benchmark script
from pipeline import _start_ray


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--betas", type=float, nargs="+", default=None, help="[default: the published 0.1 1 2]")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="[default: the published 7 8 9]")
    parser.add_argument("--methods", nargs="+", default=["kmeans", "threshold"], help="coarse.method values")
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

    from medclipsam.models.biomedclip import save_clip
    from medclipsam.tune.search import tune_task
    from medclipsam.tune.space import DEFAULT_SPACE

    work = Path(tempfile.mkdtemp(prefix="medclipsam-tune-bench-"))
    shapes = ("vit_base_patch16_224", 12, 768) if args.gpu else ("vit_tiny_patch16_224", 2, 128)
    clip_dir = save_clip(random_clip(*shapes, 512, "cpu"), work / "clip")
    data = labelled_images(work / "cohort", args.images)
    share = 0.5 if args.gpu else 0.0
    (work / "task.yaml").write_text(yaml.safe_dump({
        "task": "tune-benchmark", "text": {"prompts": ["a bright round lesion"], "clip_model": str(clip_dir)},
        "saliency": {"steps": args.steps, "copies": args.copies, "batch_size": 4},
        "sam": {"backend": "litemedsam", "batch_size": 1, "device": "cuda" if args.gpu else "cpu"},
        "pipeline": {"saliency": {"num_cpus": 0.5, "num_gpus": share}, "sam": {"num_cpus": 0.5, "num_gpus": share}},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"}}))
    space = {"saliency.beta": args.betas or DEFAULT_SPACE["saliency.beta"],
             "saliency.layer": args.layers or DEFAULT_SPACE["saliency.layer"], "coarse.method": args.methods}
    (work / "space.yaml").write_text(yaml.safe_dump(space))
    _start_ray(args.cpus)
    runs = {}
    for name, cache in (("cached", True), ("uncached", False)):
        runs[name] = tune_task(str(work / "task.yaml"), str(data / "images"), str(data / "labels"),
                               str(work / name), str(work / "space.yaml"), cache=cache)
    cached, uncached = runs["cached"], runs["uncached"]
    names = [k for k in cached.best if "." in k]
    same = {k: cached.best[k] for k in names} == {k: uncached.best[k] for k in names}
    assert same and cached.best["dsc"] == uncached.best["dsc"], (cached.best, uncached.best)
    print(f"images={args.images} steps={args.steps} copies={args.copies} cpus={args.cpus} gpu={args.gpu} "
          f"clip={shapes[0]} m2ib_images_cached={cached.m2ib_images} m2ib_images_uncached={uncached.m2ib_images} "
          f"best={ {k: cached.best[k] for k in names} } best_dsc={cached.best['dsc']:.4f} same_best={same}")
    print(f"trials={len(cached.trials)} cached_s={cached.seconds:.1f} uncached_s={uncached.seconds:.1f} "
          f"speedup={uncached.seconds / cached.seconds:.3f}")


if __name__ == "__main__":
    main()
