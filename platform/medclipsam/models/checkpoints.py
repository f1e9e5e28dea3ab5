"""Resolving checkpoint URIs to local files, hashing them, and loading state dicts."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import torch

from ..errors import ModelError
from ..io.fetch import fetch_file


def resolve_checkpoint(uri: str) -> str:
    """A local path for ``uri``: local files as they are; remote files fetched once into the cache."""
    if not uri:
        raise ModelError("no checkpoint given: pass --checkpoint PATH_OR_URI")
    return fetch_file(uri, "checkpoint")


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
