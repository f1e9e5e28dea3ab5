"""One place that knows how to reach files: local paths, ``s3://`` and any other fsspec URI.

SimpleITK and torch read only local files, so remote objects are fetched into a temporary
directory (``local_copy``); writes go through a temporary name and a rename so that no
half-written file is ever visible under its final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs

from ..errors import InputError


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file``."""
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``uri`` and the path inside it."""
    return url_to_fs(uri)


def _with_scheme(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    if not is_remote(like):
        return path
    return fs.unstrip_protocol(path)


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a local path or URI."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def isdir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.isdir(path)


def list_files(uri: str, recursive: bool = False) -> list[str]:
    """Files directly under ``uri`` (or below it, when recursive), sorted, as full URIs."""
    fs, path = filesystem(uri)
    if recursive:
        found = [p for p in fs.find(path)]
    else:
        found = [e["name"] for e in fs.ls(path, detail=True) if e["type"] == "file"]
    return sorted(_with_scheme(fs, p, uri) for p in found)


def list_dirs(uri: str) -> list[str]:
    """Sub-directories directly under ``uri``, sorted, as full URIs."""
    fs, path = filesystem(uri)
    found = [e["name"] for e in fs.ls(path, detail=True) if e["type"] == "directory"]
    return sorted(_with_scheme(fs, p.rstrip("/"), uri) for p in found if p.rstrip("/") != path.rstrip("/"))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """Yield a local path holding the file (or directory) at ``uri``; remote data is fetched."""
    if not is_remote(uri):
        yield uri.removeprefix("file://")
        return
    fs, path = filesystem(uri)
    tmp = tempfile.mkdtemp(prefix="medclipsam-")
    try:
        target = os.path.join(tmp, basename(uri))
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", target + "/", recursive=True)
        else:
            fs.get(path, target)
        yield target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` under a temporary name, then rename it into place.

    A folder (or S3 prefix) already at ``uri`` is refused: a rename would move the file into it and
    the write would look done while ``uri`` holds no file. The temporary never outlives a failure.
    """
    fs, path = filesystem(uri)
    if fs.isdir(path):
        raise InputError(f"{uri} is a folder; cannot write a file there (remove or rename the folder)")
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        try:
            fs.makedirs(parent, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InputError(f"{_with_scheme(fs, parent, uri)} is a file; cannot create a folder there "
                             f"to write {basename(uri)} (remove or rename the file)") from None
    name = f".tmp-{uuid.uuid4().hex}-{basename(path)}"
    tmp = f"{parent}/{name}" if parent else name
    try:
        with fs.open(tmp, "wb") as handle:
            handle.write(data)
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


def upload_file_atomic(local_path: str | Path, uri: str) -> None:
    """Copy a local file to ``uri`` atomically (temporary name, then rename)."""
    write_bytes_atomic(uri, Path(local_path).read_bytes())


def read_many(uris: list[str]) -> dict[str, bytes]:
    """The bytes of several files of one filesystem (fetched concurrently where the filesystem can)."""
    if not uris:
        return {}
    fs, _ = filesystem(uris[0])
    paths = {filesystem(uri)[1]: uri for uri in uris}
    found = fs.cat(list(paths))
    if len(paths) == 1 and not isinstance(found, dict):
        found = {next(iter(paths)): found}
    return {paths[p]: data for p, data in found.items()}


def remove_tree(uri: str) -> None:
    """Delete a folder or prefix and everything below it; nothing to do if it is absent."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
