"""SAM on the CPU: LiteMedSAM with its image encoder in torch against the runtime ``sam.runtime:
auto`` keeps (OpenVINO, or ONNX Runtime without it), on the same slices in one run.

Slices: the labelled slices of the bundled sample volumes with the largest truth area (brain MRI,
breast, lung CT; ``--images`` of them, taken round the volumes), windowed as the pipeline does,
each prompted with its truth's box. Each model segments every slice (encoder, mask decoder,
threshold: what a slice costs in the pipeline) with ``--threads`` threads, after one warm-up
slice, the models taking turns slice by slice so that a change in the machine's load falls on all
of them; the exports into the model cache happen before the timing. Seconds are wall-clock per
slice; ``*_cpu_s`` above the last line are this process's CPU seconds per slice, steadier on a busy
machine. ``max_abs_diff`` is the largest
difference of the image embeddings, ``mask_agreement`` the fraction of identical mask pixels.

The line above the last has the rest: ONNX Runtime and OpenVINO in bf16 against torch (time and
mask agreement), the seconds per image of the encoder alone at each ``--batches`` size for
torch and the kept runtime (one call per batch), which is how the CPU default of ``sam.batch_size``
was chosen, and the ceiling: the encoder's GFLOP (torch's FlopCounterMode), the rate torch runs it
at, the rate of this CPU's best fp32 and bf16 matmul on as many threads, and their ratio, the most
any runtime could gain over torch in that precision.

Last line: ``torch_s=<v> fast_s=<v> speedup=<v> max_abs_diff=<v> mask_agreement=<v>``
(seconds per slice, end to end).

    python benchmarks/sam_cpu.py [--images 10] [--threads <cores>] [--batches 1 4 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch


def sample_slices(samples: Path, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` RGB slices with their truth's box, the largest labelled slices first, round the volumes."""
    from medclipsam.config import WindowConfig
    from medclipsam.ops.slicing import to_rgb, window_to_uint8

    per_volume = []
    for path in sorted((samples / "images").glob("*.nrrd")):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(samples / "labels" / path.name))) > 0
        if image.ndim == 2:
            image, truth = image[None], truth[None]
        order = np.argsort([-t.sum() for t in truth])
        per_volume.append([(image[i], truth[i]) for i in order if truth[i].any()])
    images, boxes = [], []
    for rank in range(max(len(v) for v in per_volume)):
        for volume in per_volume:
            if rank < len(volume) and len(images) < n:
                pixels, truth = volume[rank]
                ys, xs = np.nonzero(truth)
                images.append(to_rgb(window_to_uint8(pixels.astype(np.float32), WindowConfig())))
                boxes.append(np.array([[xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2]], float))
    return images, boxes


def interleaved(models: dict, images, boxes) -> dict[str, dict]:
    """Each slice segmented by every model in turn (so a change in the machine's load falls on all of
    them alike): seconds per slice of wall-clock and of this process's CPU, the masks, the embeddings."""
    from medclipsam.config import SamConfig
    from medclipsam.prompts.types import SlicePrompts
    from medclipsam.segment.sam import segment_images

    params = SamConfig(batch_size=1)
    out = {name: {"wall": 0.0, "cpu": 0.0, "masks": [], "embeddings": []} for name in models}
    for model in models.values():  # warm-up (and the decoder's export, for the runtimes)
        segment_images(model, images[:1], [SlicePrompts(boxes=boxes[0])], params)
    for image, box in zip(images, boxes, strict=True):
        for name, model in models.items():
            wall, cpu = time.perf_counter(), time.process_time()
            (mask,), _ = segment_images(model, [image], [SlicePrompts(boxes=box)], params)
            out[name]["wall"] += (time.perf_counter() - wall) / len(images)
            out[name]["cpu"] += (time.process_time() - cpu) / len(images)
            out[name]["masks"].append(mask)
    for name, model in models.items():
        out[name]["embeddings"] = [e.features for e in model.embed(images)]
    return out


def encoder_seconds(segmenter, images, batch: int) -> float:
    """Seconds per image of the encoder alone, ``batch`` images per call (images repeated as needed)."""
    chunk = [images[i % len(images)] for i in range(batch)]
    segmenter.embed(chunk[:1], 1)
    start = time.perf_counter()
    segmenter.embed(chunk, batch)
    return (time.perf_counter() - start) / batch


def matmul_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    """What this CPU's best kernels reach on a dense ``n x n`` matmul: the ceiling of any runtime on a
    network made of matmuls and convolutions."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    start = time.perf_counter()
    a @ b
    return 2 * n**3 / (time.perf_counter() - start) / 1e9


def encoder_gflop(segmenter, size: int = 256) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        segmenter.image_encoder(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def largest_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(max((x - y).abs().max() for x, y in zip(a, b, strict=True)))


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean(np.concatenate([(x == y).ravel() for x, y in zip(a, b, strict=True)])))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from medclipsam.models import cpu_runtime
    from medclipsam.models.sam_backends import build_segmenter
    from medclipsam.storage.samples import fetch_samples

    images, boxes = sample_slices(fetch_samples(), args.images)
    kept = cpu_runtime.resolve_runtime("auto", "cpu")
    with tempfile.TemporaryDirectory() as cache:
        cpu_runtime.CACHE_DIR = Path(cache)  # a cold cache: the export is part of what runs here
        reference = build_segmenter("litemedsam")
        start = time.perf_counter()
        fast = build_segmenter("litemedsam", runtime=kept, threads=args.threads)
        export_s = time.perf_counter() - start
        others = {"onnxruntime": build_segmenter("litemedsam", runtime="onnxruntime", threads=args.threads),
                  "openvino_bf16": build_segmenter("litemedsam", runtime="openvino", precision="bf16",
                                                   threads=args.threads)}
        runs = interleaved({"torch": reference, "fast": fast, **others}, images, boxes)
        rest: dict[str, float | str] = {"kept": fast.runtime, "slices": len(images), "threads": args.threads,
                                        "export_and_load_s": round(export_s, 2)}
        base = runs["torch"]
        for name, run in runs.items():
            rest[f"{name}_cpu_s"] = round(run["cpu"], 4)
            if name in others:
                rest[f"{name}_s"] = round(run["wall"], 4)
                rest[f"{name}_agreement"] = round(agreement(base["masks"], run["masks"]), 6)
                rest[f"{name}_max_abs_diff"] = largest_difference(base["embeddings"], run["embeddings"])
        for batch in args.batches:
            rest[f"torch_encoder_b{batch}_s"] = round(encoder_seconds(reference, images, batch), 4)
            rest[f"{fast.runtime}_encoder_b{batch}_s"] = round(encoder_seconds(fast, images, batch), 4)
        # the ceiling: torch's encoder against the CPU's own matmul rate, fp32 and bf16, the best of three
        # rounds of each, taking turns (the best is what the machine can do when the others leave it be)
        gflop = encoder_gflop(reference)
        rates: dict[str, float] = {"torch_encoder": 0.0, "fp32": 0.0, "bf16": 0.0}
        for _ in range(3):
            rates["torch_encoder"] = max(rates["torch_encoder"], gflop / encoder_seconds(reference, images, 1))
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                rates[name] = max(rates[name], matmul_gflops(dtype))
        rest.update({"encoder_gflop": round(gflop, 2), "torch_encoder_gflops": round(rates["torch_encoder"], 1)})
        for name in ("fp32", "bf16"):
            rest[f"matmul_{name}_gflops"] = round(rates[name], 1)
            rest[f"{name}_ceiling_speedup"] = round(rates[name] / rates["torch_encoder"], 2)
    torch_s, fast_s = base["wall"], runs["fast"]["wall"]
    diff = largest_difference(base["embeddings"], runs["fast"]["embeddings"])
    torch_masks, fast_masks = base["masks"], runs["fast"]["masks"]
    print(json.dumps(rest))
    print(f"torch_s={torch_s:.4f} fast_s={fast_s:.4f} speedup={torch_s / fast_s:.3f} max_abs_diff={diff:.3g} "
          f"mask_agreement={agreement(torch_masks, fast_masks):.6f}")


if __name__ == "__main__":
    main()
