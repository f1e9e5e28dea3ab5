"""Remote files and folders fetched once into the local cache (SimpleITK, torch and open_clip read
only local paths), and models registered in MLflow fetched by their ``models:/`` URI.

Each fetch lands under a temporary name and is renamed into place, so a killed download never
leaves a half-written file that a later run would take for complete.
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path

from .. import storage
from ..errors import InputError, ModelError, StorageUnavailable

CACHE_DIR = Path(os.environ.get("MEDCLIPSAM_CACHE", Path.home() / ".cache" / "medclipsam"))


def cache_slot(kind: str, uri: str) -> Path:
    """The cache folder of ``uri`` for one kind of content (a hash of the URI, so reruns find it)."""
    return CACHE_DIR / kind / hashlib.sha256(uri.encode()).hexdigest()[:16]


INSECURE_ENV = "MEDCLIPSAM_ALLOW_INSECURE_DOWNLOAD"  # "1": plain http:// model URLs are fetched too
_PINNED = re.compile(r"#sha256=([0-9a-fA-F]{64})$")


def split_digest(uri: str) -> tuple[str, str]:
    """``URI#sha256=<hex>`` -> (URI, hex): the SHA-256 a user pins a model file to ("" when none)."""
    found = _PINNED.search(uri)
    if found:
        return uri[: found.start()], found.group(1).lower()
    if "#sha256=" in uri:
        raise InputError(f"{storage.redact_uri(uri)}: #sha256= takes the file's SHA-256 as 64 hexadecimal digits")
    return uri, ""


def check_download(uri: str | None, what: str) -> None:
    """Refuse a plain ``http://`` model URL (anyone on the path could swap the weights) unless the
    user allowed it; an ``InputError`` (exit 2) found before any work."""
    if uri and uri.lower().startswith("http://") and os.environ.get(INSECURE_ENV) != "1":
        raise InputError(f"{what} {storage.redact_uri(uri)}: plain http:// is refused (the weights could be "
                         "replaced on the way); use https://, or pass --allow-insecure-download")
    if uri:
        split_digest(uri)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file, cached in this process by (path, size, mtime)."""
    stat = os.stat(path)
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def fetch_file(uri: str, what: str = "file") -> str:
    """A local path for ``uri``: local files as they are; remote files fetched once into the cache.

    ``uri#sha256=<hex>`` pins the file: it is used only if its SHA-256 matches. A fetched file's
    hash is kept beside it in the cache and checked each time the cached copy is used, so a copy
    changed in the cache is fetched again (once); one that still differs is refused."""
    check_download(uri, what)
    uri, expected = split_digest(uri)
    shown = storage.redact_uri(uri)
    if not storage.is_remote(uri):
        path = uri.removeprefix("file://")
        if not os.path.isfile(path):
            raise ModelError(f"{what} {shown}: no such file")
        if expected and sha256_of(Path(path)) != expected:
            raise ModelError(f"{what} {shown}: its SHA-256 is not the pinned {expected[:12]}...; refused")
        return path
    # named without the query (a signature or token there must not become a file name)
    target = cache_slot("checkpoints", uri) / storage.basename(re.split(r"[?#]", uri, maxsplit=1)[0])
    recorded = target.with_name(target.name + ".sha256")
    for _ in range(2):
        if not (target.exists() and recorded.exists()):
            _download(uri, shown, what, target)
            _write_atomic(recorded, sha256_of(target))
        found = sha256_of(target)
        if found == recorded.read_text().strip() and (not expected or found == expected):
            return str(target)
        target.unlink(missing_ok=True)  # changed in the cache, or not the pinned file: fetched again once
        recorded.unlink(missing_ok=True)
    reason = f"not the pinned {expected[:12]}..." if expected else "it changed after it was fetched"
    raise ModelError(f"{what} {shown}: the fetched file's SHA-256 is {found[:12]}..., {reason}; refused")


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    partial.write_text(text)
    partial.replace(path)


def _download(uri: str, shown: str, what: str, target: Path) -> None:
    """``uri`` into ``target`` whole or not at all (a temporary name renamed into place)."""
    try:
        if not storage.exists(uri):
            raise ModelError(f"{what} {shown}: no such object")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")  # several actors may fetch at once
        fs, path = storage.filesystem(uri)
        storage.retried(uri, lambda: fs.get_file(path, str(partial)))  # one file: a '?' in it is no glob
        partial.replace(target)
    except (ModelError, StorageUnavailable):
        raise
    except Exception as exc:  # network, permission, credentials
        raise ModelError(f"{what} {shown}: cannot fetch ({storage.redact_text(str(exc))}); download it and pass "
                         "its local path instead") from exc


def fetch_folder(uri: str, what: str = "model", marker: str | None = None) -> Path:
    """A local folder for ``uri``: local folders as they are; remote ones fetched once into the cache.

    ``marker`` names a file whose presence means an earlier fetch completed.
    """
    check_download(uri, what)
    shown = storage.redact_uri(uri)
    if not storage.is_remote(uri):
        path = Path(uri.removeprefix("file://"))
        if not path.is_dir():
            raise ModelError(f"{what} {shown}: no such directory")
        return path
    target = cache_slot("models", uri)
    if not (target / marker if marker else target).exists():
        try:
            if not storage.isdir(uri):
                raise ModelError(f"{what} {shown}: no such directory")
            fs, path = storage.filesystem(uri)
            partial = Path(str(target) + ".part")
            storage.retried(uri, lambda: fs.get(path.rstrip("/") + "/", str(partial) + "/", recursive=True))
            os.replace(partial, target)
        except (ModelError, StorageUnavailable):
            raise
        except Exception as exc:
            raise ModelError(f"{what} {shown}: cannot fetch ({storage.redact_text(str(exc))})") from exc
    return target


