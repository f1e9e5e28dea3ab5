"""One place that knows how to reach files: local paths, ``s3://`` and any other fsspec URI.

SimpleITK and torch read only local files, so remote objects are fetched into a temporary
directory (``local_copy``); writes go through a temporary name and a rename so that no
half-written file is ever visible under its final name (on an object store one PUT already is
atomic: the object appears whole or not at all, so it is written in place). Every remote operation rides out an
outage of the store (``retry``): repeated with backoff, or ``StorageUnavailable`` in the end.

The package's own functions are the URI operations every other layer calls (``storage.join``,
``storage.read_bytes``, ``storage.write_bytes_atomic``, ...). Its modules: ``retry`` (riding out
outages), ``access`` (first contact with inputs and outputs, checked before any work), ``fetch``
(remote files into the cache), ``registered`` (``models:/`` URIs pinned and fetched from MLflow's
registry), ``outputs`` (the layout of an output folder), ``environment`` (``MEDCLIPSAM_*``
settings) and ``samples`` (the bundled sample cohort). May import ``medclipsam.errors`` and I/O
libraries (fsspec, pyarrow); knows nothing of images, models, prompts or Ray.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import fsspec
from fsspec.core import url_to_fs

from ..errors import InputError
from .retry import retrying

T = TypeVar("T")
TEMPORARY_PREFIX = ".tmp-"  # an atomic write's name until its rename


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file``."""
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """Local paths made absolute (``file://`` dropped), remote URIs as they are: a URI recorded in a
    manifest or sent to a Ray worker must not depend on the working directory."""
    return uri if is_remote(uri) else os.path.abspath(uri.removeprefix("file://"))


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``uri`` and the path inside it.

    Remote listings are never cached: other processes (Ray tasks, a rerun) write into the same
    prefixes, and a cached listing would call their new objects missing.
    """
    if is_remote(uri):
        return url_to_fs(uri, use_listings_cache=False)
    return url_to_fs(uri)


def retried(uri: str, func: Callable[[], T]) -> T:
    """``func()`` (an operation on ``uri``'s store), retried through an outage when ``uri`` is remote."""
    return retrying(uri, func) if is_remote(uri) else func()


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
    return retried(uri, lambda: fs.exists(path))


def isdir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return retried(uri, lambda: fs.isdir(path))


def list_files(uri: str, recursive: bool = False) -> list[str]:
    """Files directly under ``uri`` (or below it, when recursive), sorted, as full URIs."""
    fs, path = filesystem(uri)
    if recursive:
        found = retried(uri, lambda: list(fs.find(path)))
    else:
        found = [e["name"] for e in retried(uri, lambda: fs.ls(path, detail=True)) if e["type"] == "file"]
    return sorted(_with_scheme(fs, p, uri) for p in found)


def list_dirs(uri: str) -> list[str]:
    """Sub-directories directly under ``uri``, sorted, as full URIs."""
    fs, path = filesystem(uri)
    found = [e["name"] for e in retried(uri, lambda: fs.ls(path, detail=True)) if e["type"] == "directory"]
    return sorted(_with_scheme(fs, p.rstrip("/"), uri) for p in found if p.rstrip("/") != path.rstrip("/"))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return retried(uri, lambda: fs.cat_file(path))


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


_PART = re.compile(r"#[a-z]+=[^/#]+$")  # names a part of the object before it: a folder's DICOM series


def split_part(uri: str) -> tuple[str, str]:
    """``(object, part)`` of a URI ending in ``#name=value`` (``folder#series=1.2.3``); ``(uri, "")`` otherwise."""
    found = _PART.search(uri)
    return (uri[: found.start()], found.group()) if found and found.start() else (uri, "")


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """Yield a local path holding the file (or directory) at ``uri``; remote data is fetched.

    A ``#name=value`` part (``split_part``) is not part of the path: the whole object is copied
    and the part is kept on the local path, so its reader still knows which part to read."""
    if not is_remote(uri):
        yield uri.removeprefix("file://")
        return
    uri, part = split_part(uri)
    fs, path = filesystem(uri)
    tmp = tempfile.mkdtemp(prefix="medclipsam-")
    try:
        target = os.path.join(tmp, basename(uri))
        if retried(uri, lambda: fs.isdir(path)):
            retried(uri, lambda: fs.get(path.rstrip("/") + "/", target + "/", recursive=True))
        else:
            retried(uri, lambda: fs.get(path, target))
        yield target + part
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    retried(uri, lambda: fs.makedirs(path, exist_ok=True))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that it appears whole or not at all: under a temporary name, then
    renamed into place (on an object store, one PUT).

    A folder (or S3 prefix) already at ``uri`` is refused: a rename would move the file into it and
    the write would look done while ``uri`` holds no file. The temporary does not outlive a failure,
    unless the store went away before it could be removed (``remove_temporaries`` clears those).
    """
    fs, path = filesystem(uri)
    if retried(uri, lambda: fs.isdir(path)):
        raise InputError(f"{uri} is a folder; cannot write a file there (remove or rename the folder)")
    if _puts_whole_objects(fs):  # 2 requests instead of 8 (folder markers, a copy and a delete)
        retried(uri, lambda: fs.pipe_file(path, data))
        return
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        try:
            retried(uri, lambda: fs.makedirs(parent, exist_ok=True))
        except (FileExistsError, NotADirectoryError):
            raise InputError(f"{_with_scheme(fs, parent, uri)} is a file; cannot create a folder there "
                             f"to write {basename(uri)} (remove or rename the file)") from None
    name = f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{basename(path)}"
    tmp = f"{parent}/{name}" if parent else name
    def put() -> None:
        with fs.open(tmp, "wb") as handle:
            handle.write(data)

    try:
        retried(uri, put)
        retried(uri, lambda: fs.mv(tmp, path))
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: the store may be the reason we are here
            if fs.exists(tmp):
                fs.rm(tmp)
        raise


def remove_temporaries(uri: str) -> int:
    """Delete what atomic writes left below ``uri`` when their clean-up failed too (the store was
    down); returns how many. Nothing to do if ``uri`` is absent, or on an object store, where a
    write is one PUT and leaves no temporary (so a run start does not list a whole cohort's output)."""
    fs, _ = filesystem(uri)
    if _puts_whole_objects(fs) or not exists(uri):
        return 0
    left = [p for p in list_files(uri, recursive=True) if basename(p).startswith(TEMPORARY_PREFIX)]
    for leftover in left:
        path = filesystem(leftover)[1]
        retried(leftover, lambda path=path: fs.rm(path))
    return len(left)


# Object stores whose uploads (single or multipart) become visible only once complete.
_WHOLE_OBJECT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


def _puts_whole_objects(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & _WHOLE_OBJECT_PROTOCOLS)


def upload_file_atomic(local_path: str | Path, uri: str) -> None:
    """Copy a local file to ``uri`` atomically (temporary name, then rename)."""
    write_bytes_atomic(uri, Path(local_path).read_bytes())


def read_many(uris: list[str]) -> dict[str, bytes]:
    """The bytes of several files of one filesystem (fetched concurrently where the filesystem can)."""
    if not uris:
        return {}
    fs, _ = filesystem(uris[0])
    paths = {filesystem(uri)[1]: uri for uri in uris}
    found = retried(uris[0], lambda: fs.cat(list(paths)))
    if len(paths) == 1 and not isinstance(found, dict):
        found = {next(iter(paths)): found}
    return {paths[p]: data for p, data in found.items()}


def remove_tree(uri: str) -> None:
    """Delete a folder or prefix and everything below it; nothing to do if it is absent."""
    fs, path = filesystem(uri)
    if retried(uri, lambda: fs.exists(path)):
        retried(uri, lambda: fs.rm(path, recursive=True))


# Query parameters that carry a credential: tokens, signatures (S3/GCS presigned URLs, Azure SAS),
# keys and passwords. Matched on the name, case-insensitively.
_SECRET_PARAMETER = re.compile(r"(?i)^(x-amz-(?!expires$|date$|signedheaders$|algorithm$).*"
                               r"|x-goog-(signature|credential)|(access_|id_|refresh_|auth_|session_)?token|sig|signature|password|passwd|pwd|secret"
                               r"|client_secret|api[-_]?key|key|access[-_]?key|auth|authorization|credential)$")
# A URI inside any text: a scheme, then everything up to whitespace, a quote or a closing bracket,
# less a trailing ':', ',', ';' or '.' (the sentence's, not the URI's).
_URI_IN_TEXT = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>)\]]*[^\s'\"<>)\]:,;.]", re.IGNORECASE)
REDACTED = "***"


def redact_uri(uri: str) -> str:
    """The URI with every credential it carries replaced by ``***``: a password or a token in its user
    part (``https://user:***@host``, ``https://***@host``) and the values of secret query parameters
    (``?token=***``, ``X-Amz-Signature=***``). The one redaction every URI that reaches a log, a
    record, a file or MLflow goes through; a URI without credentials comes back unchanged."""
    match = re.match(r"^([a-z][a-z0-9+.-]*://)([^/?#]*)(.*)$", uri, flags=re.IGNORECASE | re.DOTALL)
    if not match:
        return uri
    scheme, authority, rest = match.groups()
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        authority = f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
    if "?" in rest:
        path, _, query = rest.partition("?")
        query, hash_mark, fragment = query.partition("#")
        query = "&".join(_redact_parameter(part) for part in query.split("&"))
        rest = f"{path}?{query}{hash_mark}{fragment}"
    return scheme + authority + rest


def _redact_parameter(part: str) -> str:
    name, equals, _ = part.partition("=")
    return f"{name}={REDACTED}" if equals and _SECRET_PARAMETER.match(name) else part


def redact_text(text: str) -> str:
    """``text`` (a message, a JSON document, a log line) with every URI in it redacted (``redact_uri``)."""
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text) if "://" in text else text


def redact_values(value):
    """A JSON-like value (dicts, lists, strings) with every URI in its strings redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)
    return value
