"""The GPU path end to end: labels-mode pseudo-labelling slices/s through the Ray pipeline with the
SAM pool on the device, for LiteMedSAM and a ViT-B SAM (seeded random weights in segment_anything's
layout, 1024 px), in each ``--precisions``; and M2IB saliency images/s at BiomedCLIP's shapes
(random weights) on the same device.

Cases: ``--slices`` synthetic ``--size`` px PNGs with a bright disc and its label (the truth's box
prompts SAM). Each run is ``run_job`` on a local Ray with one SAM actor holding the GPU
(``pipeline.sam.num_gpus: 1``; none with ``--device cpu``), writes included; the slices/s figure
counts the whole run, the model loading into the actor too, so use enough slices to see the steady
state. ``--device cpu`` runs the same code on the CPU at a tiny size: the test suite does that so
the script cannot rot; the figures that matter come from a GPU machine (benchmarks/RESULTS.md).
Weak predict (nnU-Net on the GPU) is not measured here yet.

Last line: ``litemedsam_fp32_slices_per_s=<v> litemedsam_bf16_slices_per_s=<v> vit_b_fp32_slices_per_s=<v>
vit_b_bf16_slices_per_s=<v> m2ib_images_per_s=<v>`` at the default backends and precisions (one
``<backend>_<precision>_slices_per_s`` per backend and precision asked for); the line above it names
the device, the card and the sizes.

    python benchmarks/gpu.py [--device cuda] [--slices 256] [--size 256] [--backends litemedsam vit_b]
                             [--precisions fp32 bf16] [--clip-images 16] [--steps 10] [--copies 10]
                             [--vision vit_base_patch16_224] [--text-layers 12] [--text-hidden 768]
                             [--embed-dim 512] [--layer 9] [--cpus 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from labels_run import labelled_images  # sibling benchmark scripts
from m2ib import batched_maps, random_clip
from pipeline import _start_ray


def random_vit_b(folder: Path) -> str:
    """segment_anything's ViT-B with seeded random weights, saved as its state dict."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    path = folder / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), path)
    return str(path)


def pseudolabel_rate(data: Path, work: Path, backend: str, checkpoint: str | None, precision: str,
                     device: str, slices: int) -> float:
    """Slices per second of one labels-mode run with the SAM pool on ``device``."""
    from medclipsam.config import parse_config
    from medclipsam.pipeline.job import Job
    from medclipsam.pipeline.run import run_job

    gpu = 0.0 if device == "cpu" else 1.0
    config = parse_config({
        "task": "gpu-benchmark",
        "sam": {"backend": backend, "checkpoint": checkpoint, "device": device, "precision": precision},
        "pipeline": {"sam": {"actors": 1, "num_gpus": gpu, "num_cpus": 1}, "overlays": 0},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "gpu-benchmark"}})
    name = f"{backend}_{precision}"
    start = time.perf_counter()
    result = run_job(Job(config, str(data / "images"), str(work / name), "labels", str(data / "labels")))
    seconds = time.perf_counter() - start
    if result.counts.get("ok") != slices:
        raise SystemExit(f"{name}: {result.counts} of {slices} slices")
    return slices / seconds


def m2ib_rate(args: argparse.Namespace) -> float:
    """M2IB images per second on the device (batched maps, one warm-up image first)."""
    from medclipsam.config import SaliencyConfig

    device, images = args.device, args.clip_images
    clip = random_clip(args.vision, args.text_layers, args.text_hidden, args.embed_dim, device)
    params = SaliencyConfig(steps=args.steps, copies=args.copies, layer=args.layer)
    pixels = torch.randn(images, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    prompt = "a bright round lesion"
    batched_maps(clip, pixels[:1], prompt, params)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    batched_maps(clip, pixels, prompt, params)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--slices", type=int, default=256)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--backends", nargs="+", default=["litemedsam", "vit_b"], choices=["litemedsam", "vit_b"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--clip-images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--vision", default="vit_base_patch16_224", help="timm ViT name (BiomedCLIP's by default)")
    parser.add_argument("--text-layers", type=int, default=12)
    parser.add_argument("--text-hidden", type=int, default=768)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--cpus", type=int, default=4)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for the small check)")

    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = labelled_images(work / "cohort", args.slices, size=args.size)
        _start_ray(args.cpus)
        for backend in args.backends:
            checkpoint = random_vit_b(work) if backend == "vit_b" else None
            for precision in args.precisions:
                figures[f"{backend}_{precision}_slices_per_s"] = pseudolabel_rate(
                    data, work, backend, checkpoint, precision, args.device, args.slices)
        import ray

        ray.shutdown()
    figures["m2ib_images_per_s"] = m2ib_rate(args)
    card = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(json.dumps({"device": args.device, "card": card, "slices": args.slices, "size": args.size,
                      "torch": torch.__version__}))
    print(" ".join(f"{key}={value:.3f}" for key, value in figures.items()))


if __name__ == "__main__":
    main()
