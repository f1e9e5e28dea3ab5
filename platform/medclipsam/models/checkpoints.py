"""Resolving checkpoint URIs to local files, hashing them, and loading state dicts; checking a
checkpoint before a resume trusts it, and picking the newest one that passes."""

from __future__ import annotations

import json
import logging
import pickle
import posixpath
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ..errors import ModelError, describe
from ..storage.fetch import fetch_file, sha256_of  # noqa: F401  (sha256_of: this layer's users import it here)

log = logging.getLogger(__name__)
C = TypeVar("C")
R = TypeVar("R")


def resolve_checkpoint(uri: str) -> str:
    """A local path for ``uri``: local files as they are; remote files fetched once into the cache."""
    if not uri:
        raise ModelError("no checkpoint given: pass --checkpoint PATH_OR_URI")
    return fetch_file(uri, "checkpoint")


class UnsafeCheckpoint(ModelError):
    """A checkpoint that holds Python objects beyond tensors and plain values: loading it could run
    code from the file, so it is refused (never skipped for an older one: someone planted it)."""


# What a checkpoint may hold besides tensors, containers and plain values: numpy scalars and the
# dtypes they name (nnU-Net's training log and its best EMA Dice are numpy floats).
_NUMPY_SCALARS = [np.dtypes.Float64DType, np.dtypes.Float32DType, np.dtypes.Float16DType, np.dtypes.Int64DType,
                  np.dtypes.Int32DType, np.dtypes.Int16DType, np.dtypes.Int8DType, np.dtypes.UInt8DType,
                  np.dtypes.BoolDType]
_SAFE_GLOBALS = [np.dtype, getattr(np, "_core", getattr(np, "core", None)).multiarray.scalar, *_NUMPY_SCALARS]


def load_torch_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` that never runs code from the file: ``weights_only=True``, with numpy scalars
    the only globals allowed. A file that needs more is an ``UnsafeCheckpoint`` naming the file and
    what it asked for; any other failure propagates for the caller to name."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        wanted = re.search(r"GLOBAL (\S+)", str(exc))  # the weights-only unpickler names what it refused
        if wanted is None:
            raise  # not a pickle at all, or a damaged one: the caller names the file
        raise UnsafeCheckpoint(
            f"checkpoint file {path}: refused, it holds Python objects that loading would run "
            f"({wanted.group(1)}); only weights (tensors, numbers, strings, lists, dicts) are loaded") from None


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a state dict saved bare or wrapped as ``{"model": ...}`` / ``{"state_dict": ...}``."""
    try:
        state = load_torch_file(path)
    except UnsafeCheckpoint:
        raise
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


class CorruptCheckpoint(ModelError):
    """A checkpoint file is missing, truncated or unreadable; the message names the file and why."""


def torch_file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` file (None when it looks complete).

    Cheap: only the zip directory at the end of the file is read, so a truncated, empty or missing
    file is found without loading its tensors (files in torch's legacy, non-zip format are refused)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except FileNotFoundError:
        return "the file is missing"
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"not a complete PyTorch file, truncated or damaged ({exc})"
    if not any(posixpath.basename(name) == "data.pkl" for name in names):
        return "not a PyTorch file (no data.pkl record)"
    return None


def read_torch_checkpoint(path: str | Path, keys: Iterable[str] = (), map_location: Any = "cpu",
                          mmap: bool = False) -> dict:
    """A checkpoint dict saved by ``torch.save`` (a training state, an ensemble member), checked to
    hold ``keys``; a missing, truncated or unreadable file, or one without those keys, is a
    ``CorruptCheckpoint`` naming it, and one that would run code is an ``UnsafeCheckpoint``
    (``load_torch_file``). ``mmap`` maps the tensors instead of reading them (a check only)."""
    problem = torch_file_problem(path)
    if problem is None:
        try:
            state = load_torch_file(path, map_location=map_location, mmap=mmap)
        except UnsafeCheckpoint:
            raise
        except Exception as exc:
            problem = f"cannot be loaded ({describe(exc)})"
        else:
            missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
            if not isinstance(state, dict) or missing:
                problem = f"not a training state: {', '.join(missing) or 'not a dict'} missing"
    if problem is not None:
        raise CorruptCheckpoint(f"checkpoint file {path}: {problem}")
    return state


def read_json_checkpoint(path: str | Path) -> dict:
    """A JSON object file of a checkpoint; missing or unreadable is a ``CorruptCheckpoint`` naming it."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"checkpoint file {path}: the file is missing") from None
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"checkpoint file {path}: unreadable JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise CorruptCheckpoint(f"checkpoint file {path}: not a JSON object")
    return value


def older_checkpoints(chosen: str, names: Iterable[str]) -> list[str]:
    """The folder names among ``names`` that Ray Train wrote before ``chosen``, newest first.

    Ray Train names its checkpoint folders ``checkpoint_<YYYY-MM-DD_HH-MM-SS.ffffff>``, so their
    order is their names' order. Folders named after ``chosen`` are left out: Ray had not recorded
    them (an upload cut short by a crash)."""
    return sorted((n for n in set(names) if n.startswith("checkpoint_") and n < chosen), reverse=True)


def newest_valid(candidates: Sequence[C], load: Callable[[C], R],
                 describe: Callable[[C], str] = str) -> tuple[C, R] | None:
    """The first of ``candidates`` (newest first) that ``load`` reads, and what it read.

    ``load`` raises ``CorruptCheckpoint`` for a checkpoint that cannot be used; each one skipped so
    is logged as a warning naming it and the reason. Any other error is not corruption and is
    raised. None when no candidate can be used."""
    for number, candidate in enumerate(candidates):
        try:
            return candidate, load(candidate)
        except CorruptCheckpoint as exc:
            following = "trying the previous one" if number + 1 < len(candidates) else "no older one is left"
            log.warning("checkpoint %s cannot be used (%s); %s", describe(candidate), exc, following)
    return None


def restore_newest(checkpoint: Any, read: Callable[[Path], R], what: str = "training") -> R | None:
    """Read the newest usable of the checkpoints a resume can use, or None to start from scratch.

    ``checkpoint`` is the one Ray Train hands a worker to resume from (``ray.train.get_checkpoint()``:
    any object with ``path``, a pyarrow ``filesystem`` and ``as_directory()``), or None. It is
    tried first, then the older ``checkpoint_*`` folders Ray Train keeps beside it, newest first.
    ``read`` gets each one's local folder and raises ``CorruptCheckpoint`` when it is unusable
    (a warning names the checkpoint and the reason, and the previous one is tried). When none can
    be read, a warning says so and None is returned: the caller starts from scratch rather than
    fail on every retry of a checkpoint that will never load."""
    if checkpoint is None:
        return None
    import pyarrow.fs  # a checkpoint's filesystem is pyarrow's (local, S3, ...)

    parent, name = posixpath.split(str(checkpoint.path).rstrip("/"))
    try:
        listed = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError as exc:
        log.warning("cannot list the checkpoints in %s (%s): only %s can be tried", parent, exc, name)
        listed = []
    folders = [info.base_name for info in listed if info.type == pyarrow.fs.FileType.Directory]
    candidates = [checkpoint, *(type(checkpoint)(posixpath.join(parent, n), checkpoint.filesystem)
                                for n in older_checkpoints(name, folders))]

    def load(candidate: Any) -> R:
        with candidate.as_directory() as folder:
            return read(Path(folder))

    found = newest_valid(candidates, load, describe=lambda c: str(c.path))
    if found is None:
        log.warning("no usable checkpoint under %s (%d tried): %s starts from scratch", parent, len(candidates),
                    what)
        return None
    if found[0] is not checkpoint:
        log.warning("%s resumes from the older checkpoint %s", what, found[0].path)
    return found[1]
