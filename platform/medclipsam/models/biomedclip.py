"""Loading BiomedCLIP (or any open_clip model with a timm ViT image tower) from a model URI.

Accepted URIs:
- ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` (needs the Hugging Face hub);
- a local directory in the same layout (``open_clip_config.json``, weights, tokenizer files), also
  written ``local-dir:/path``;
- ``s3://...`` or any fsspec URI of such a directory (fetched once into the cache).

BiomedCLIP's config names its HF text tower and tokenizer by hub id. When the directory itself
holds the text tower's ``config.json`` and tokenizer files, those names are pointed at the
directory, so a copy works with no network at all.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import BIOMEDCLIP_HUB
from ..errors import ModelError, describe
from ..storage.fetch import fetch_folder
from ..storage.registered import fetch_registered
from .checkpoints import sha256_of

WEIGHT_NAMES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "model.pth",
)
OFFLINE_HELP = (
    "To run without the hub, copy the model to a folder holding open_clip_config.json, the weights "
    "(open_clip_pytorch_model.bin), the tokenizer files (vocab.txt, tokenizer_config.json, ...) and the "
    "text tower's config.json, and pass that folder (or an s3:// copy of it) as the model URI."
)


def offline_help(uri: str) -> str:
    """How to get a model onto this machine; for a hub model, the exact download command."""
    if not uri.startswith("hf-hub:"):
        return OFFLINE_HELP
    repo = uri.removeprefix("hf-hub:")
    folder = repo.rsplit("/", 1)[-1]
    return (f"To get it once on a machine that reaches the hub: `hf download {repo} --local-dir {folder}`; "
            f"then pass that folder (or an s3:// copy of it) as the model URI.")


@dataclass
class ClipModel:
    """An open_clip model with what the saliency stage needs: its tokenizer, input size and identity."""

    model: torch.nn.Module
    tokenizer: object
    uri: str
    sha256: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    config: dict = field(default_factory=dict, repr=False)  # the open_clip_config.json it was built from
    _text_cache: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def text_embedding(self, prompts: str | list[str]) -> torch.Tensor:
        """Unit-norm text embedding ``D``; a list is embedded as the normalised mean of its members.

        Cached per (model, prompts): the text tower runs once per prompt set.
        """
        key = (prompts,) if isinstance(prompts, str) else tuple(prompts)
        if not key:
            raise ValueError("no text prompt given")
        if key not in self._text_cache:
            tokens = self.tokenizer(list(key)).to(self.device)
            emb = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
            mean = torch.nn.functional.normalize(emb.mean(dim=0), dim=-1)
            self._text_cache[key] = mean
        return self._text_cache[key].clone()


def _local_dir(uri: str) -> Path:
    try:
        if uri.startswith("models:/"):
            return _registered_dir(uri)
        return fetch_folder(uri.removeprefix("local-dir:"), "model", marker="open_clip_config.json")
    except ModelError as exc:
        raise ModelError(f"{exc}. {OFFLINE_HELP}") from exc


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ModelError(f"model {folder}: no weights file (looked for {', '.join(WEIGHT_NAMES)})")


def _localised_copy(folder: Path) -> Path:
    """A folder of links to ``folder`` whose config points the HF text tower at local files."""
    config_path = folder / "open_clip_config.json"
    if not config_path.is_file():
        raise ModelError(f"model {folder}: missing open_clip_config.json. {OFFLINE_HELP}")
    try:
        config = json.loads(config_path.read_text())
        text_cfg = config["model_cfg"].get("text_cfg", {})
    except (json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise ModelError(f"model {config_path}: not a valid open_clip config ({exc})") from exc
    has_text_config = (folder / "config.json").is_file()
    for key in ("hf_model_name", "hf_tokenizer_name"):
        name = text_cfg.get(key)
        if name and not Path(name).is_dir():
            if not has_text_config:
                raise ModelError(
                    f"model {folder}: text_cfg.{key} names '{name}', which is not a local folder, and {folder} "
                    f"has no config.json for the text tower. {OFFLINE_HELP}"
                )
            text_cfg[key] = str(folder.resolve())
    staging = Path(tempfile.mkdtemp(prefix="medclipsam-clip-"))
    for entry in folder.iterdir():
        if entry.name != "open_clip_config.json":
            (staging / entry.name).symlink_to(entry.resolve())
    (staging / "open_clip_config.json").write_text(json.dumps(config))
    return staging


def load_clip(uri: str = BIOMEDCLIP_HUB, device: str = "cpu") -> ClipModel:
    """Build the model, its tokenizer and preprocessing constants from a model URI."""
    import open_clip

    try:
        if uri.startswith("hf-hub:"):
            model, _, preprocess = open_clip.create_model_and_transforms(uri, device=device)
            tokenizer = open_clip.get_tokenizer(uri)
            from huggingface_hub import hf_hub_download

            weights = hf_hub_download(uri.removeprefix("hf-hub:"), "open_clip_pytorch_model.bin")
            config = json.loads(Path(hf_hub_download(uri.removeprefix("hf-hub:"), "open_clip_config.json")).read_text())
        else:
            folder = _local_dir(uri)
            config = json.loads((folder / "open_clip_config.json").read_text()) if (
                folder / "open_clip_config.json").is_file() else {}
            weights = str(_weights_file(folder))
            staging = _localised_copy(folder)
            model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{staging}", device=device)
            tokenizer = open_clip.get_tokenizer(f"local-dir:{staging}")
    except ModelError:
        raise
    except Exception as exc:
        detail = describe(exc)
        raise ModelError(f"model {uri}: cannot be loaded ({detail}). {offline_help(uri)}") from exc
    model.eval()
    normalise = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    image_size = int(getattr(model.visual, "image_size", (224, 224))[0])
    return ClipModel(
        model=model, tokenizer=tokenizer, uri=uri, sha256=sha256_of(weights), image_size=image_size,
        mean=tuple(normalise.mean), std=tuple(normalise.std), config=config,
    )


def clip_weights_sha256(uri: str) -> str:
    """SHA-256 of a model's weights file, without building the model (a registry run records it first)."""
    if uri.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        try:
            return sha256_of(hf_hub_download(uri.removeprefix("hf-hub:"), "open_clip_pytorch_model.bin"))
        except Exception as exc:
            raise ModelError(f"model {uri}: cannot be fetched ({describe(exc)}). {offline_help(uri)}") from exc
    return sha256_of(str(_weights_file(_local_dir(uri))))


def _registered_dir(uri: str) -> Path:
    """``models:/name@alias`` or ``models:/name/version``: the folder of the registered model."""
    def model_dir(folder: Path) -> Path:
        found = sorted(folder.rglob("open_clip_config.json"))
        if not found:
            raise ModelError(f"model {uri}: the registered model holds no open_clip_config.json")
        return found[0].parent

    # the weights file, as fine-tuning hashed it when it registered the version
    return model_dir(fetch_registered(uri, digest=lambda folder: sha256_of(str(_weights_file(model_dir(folder))))))


def save_clip(clip: ClipModel, folder: str | Path) -> Path:
    """Write a model in the layout ``load_clip`` reads: config, weights, tokenizer, text tower config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(clip.config)) if clip.config else {}
    config.setdefault("preprocess_cfg", {"mean": list(clip.mean), "std": list(clip.std)})
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.save({k: v.detach().cpu() for k, v in clip.model.state_dict().items()},
               folder / "open_clip_pytorch_model.bin")
    inner = getattr(clip.tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "save_pretrained"):
        inner.save_pretrained(str(folder))
    text = getattr(getattr(clip.model, "text", None), "transformer", None)
    if text is not None and hasattr(text, "config"):
        text.config.save_pretrained(str(folder))
    return folder


def hub_problem(uri: str) -> str | None:
    """Why an ``hf-hub:`` model cannot be had right now (None when it can, or for other URIs).

    Quick: the local cache first, then one metadata request with a short timeout, so an offline
    machine learns it in about a second instead of after the downloader's retries.
    """
    if not uri.startswith("hf-hub:"):
        return None
    from huggingface_hub import HfApi, hf_hub_download

    repo = uri.removeprefix("hf-hub:")
    try:
        hf_hub_download(repo, "open_clip_config.json", local_files_only=True)
        hf_hub_download(repo, "open_clip_pytorch_model.bin", local_files_only=True)
        return None
    except Exception:  # not cached: ask the hub
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache"
    try:
        HfApi().model_info(repo, timeout=5)
    except Exception as exc:
        return f"the Hugging Face hub cannot be reached ({describe(exc)})"
    return None
