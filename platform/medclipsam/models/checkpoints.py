"""Resolving checkpoint URIs to local files, hashing them, and loading state dicts."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch

from .. import storage
from ..errors import ModelError

CACHE_DIR = Path(os.environ.get("MEDCLIPSAM_CACHE", Path.home() / ".cache" / "medclipsam"))


def resolve_checkpoint(uri: str) -> str:
    """A local path for ``uri``: local files as they are; remote files fetched once into the cache."""
    if not uri:
        raise ModelError("no checkpoint given: pass --checkpoint PATH_OR_URI")
    if not storage.is_remote(uri):
        path = uri.removeprefix("file://")
        if not os.path.isfile(path):
            raise ModelError(f"checkpoint {uri}: no such file")
        return path
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = CACHE_DIR / "checkpoints" / digest / storage.basename(uri)
    if not target.exists():
        try:
            if not storage.exists(uri):
                raise ModelError(f"checkpoint {uri}: no such object")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            fs, path = storage.filesystem(uri)
            fs.get(path, str(tmp))
            tmp.replace(target)
        except ModelError:
            raise
        except Exception as exc:  # network, permission, credentials
            raise ModelError(
                f"checkpoint {uri}: cannot fetch ({exc}); download it and pass its local path instead"
            ) from exc
    return str(target)


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path: str) -> str:
    """SHA-256 of a file, cached by (path, size, mtime)."""
    stat = os.stat(path)
    return _sha256_cached(path, stat.st_size, stat.st_mtime_ns)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a state dict saved bare or wrapped as ``{"model": ...}`` / ``{"state_dict": ...}``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"checkpoint {path}: cannot be read as a PyTorch state dict ({exc})") from exc
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path}: not a state dict of tensors")
    return state


def load_into(module: torch.nn.Module, path: str) -> None:
    """Load a checkpoint into ``module``, naming the missing or unexpected keys on mismatch."""
    state = load_state_dict(path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ModelError(
            f"checkpoint {path} does not match the {type(module).__name__} architecture: {' '.join(first)[:400]}"
        ) from exc
