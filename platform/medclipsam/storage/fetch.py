"""Remote files and folders fetched once into the local cache (SimpleITK, torch and open_clip read
only local paths), and models registered in MLflow fetched by their ``models:/`` URI.

Each fetch lands under a temporary name and is renamed into place, so a killed download never
leaves a half-written file that a later run would take for complete.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .. import storage
from ..errors import ModelError, StorageUnavailable

CACHE_DIR = Path(os.environ.get("MEDCLIPSAM_CACHE", Path.home() / ".cache" / "medclipsam"))


def cache_slot(kind: str, uri: str) -> Path:
    """The cache folder of ``uri`` for one kind of content (a hash of the URI, so reruns find it)."""
    return CACHE_DIR / kind / hashlib.sha256(uri.encode()).hexdigest()[:16]


def fetch_file(uri: str, what: str = "file") -> str:
    """A local path for ``uri``: local files as they are; remote files fetched once into the cache."""
    if not storage.is_remote(uri):
        path = uri.removeprefix("file://")
        if not os.path.isfile(path):
            raise ModelError(f"{what} {uri}: no such file")
        return path
    target = cache_slot("checkpoints", uri) / storage.basename(uri)
    if not target.exists():
        try:
            if not storage.exists(uri):
                raise ModelError(f"{what} {uri}: no such object")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            fs, path = storage.filesystem(uri)
            storage.retried(uri, lambda: fs.get(path, str(partial)))
            partial.replace(target)
        except (ModelError, StorageUnavailable):
            raise
        except Exception as exc:  # network, permission, credentials
            raise ModelError(f"{what} {uri}: cannot fetch ({exc}); download it and pass its local path instead") \
                from exc
    return str(target)


def fetch_folder(uri: str, what: str = "model", marker: str | None = None) -> Path:
    """A local folder for ``uri``: local folders as they are; remote ones fetched once into the cache.

    ``marker`` names a file whose presence means an earlier fetch completed.
    """
    if not storage.is_remote(uri):
        path = Path(uri.removeprefix("file://"))
        if not path.is_dir():
            raise ModelError(f"{what} {uri}: no such directory")
        return path
    target = cache_slot("models", uri)
    if not (target / marker if marker else target).exists():
        try:
            if not storage.isdir(uri):
                raise ModelError(f"{what} {uri}: no such directory")
            fs, path = storage.filesystem(uri)
            partial = Path(str(target) + ".part")
            storage.retried(uri, lambda: fs.get(path.rstrip("/") + "/", str(partial) + "/", recursive=True))
            os.replace(partial, target)
        except (ModelError, StorageUnavailable):
            raise
        except Exception as exc:
            raise ModelError(f"{what} {uri}: cannot fetch ({exc})") from exc
    return target


