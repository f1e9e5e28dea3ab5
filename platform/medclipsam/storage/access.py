"""Reaching inputs and outputs, checked before any work: a run that cannot read its cohort or write
its results must say so in one sentence before it loads a model or computes a case, not after
every case is done, and not with a traceback from the storage library. These first contacts do not
ride out outages (``retry.fail_fast``): an endpoint that does not answer at the start is reported
at once."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from .. import storage
from ..errors import InputError, describe
from .retry import fail_fast


def check_output_folder(uri: str) -> None:
    """``uri`` is (or can become) a folder this process can write to: a probe object is written and removed."""
    try:
        with fail_fast():
            if storage.exists(uri) and not storage.isdir(uri):
                raise InputError(f"{uri}: the output is an existing file; give a folder (or a new path)")
            _probe(storage.join(uri, f".medclipsam-probe-{uuid.uuid4().hex}"))
    except InputError:
        raise
    except Exception as exc:  # permissions, a read-only file system, credentials, an unreachable endpoint
        raise InputError(f"{uri}: the output cannot be written ({describe(exc)})") from exc


def check_output_file(uri: str) -> None:
    """``uri`` names a file this process can write: not a folder, and its folder takes a probe object."""
    try:
        with fail_fast():
            if storage.isdir(uri):
                raise InputError(f"{uri}: is a folder; give a file name for the output")
            parent = uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."
            _probe(storage.join(parent, f".medclipsam-probe-{uuid.uuid4().hex}"))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{uri}: the output cannot be written ({describe(exc)})") from exc


def _probe(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(b"probe")
    fs.rm(path)


# Where storage errors come from: the local file system (OSError) and fsspec's remote backends.
_STORAGE_MODULES = {"botocore", "aiobotocore", "s3fs", "fsspec", "aiohttp", "gcsfs", "adlfs", "urllib3"}


def is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _STORAGE_MODULES


@contextmanager
def reading(uri: str, what: str = "input") -> Iterator[None]:
    """Storage errors while reading ``uri`` (unreachable endpoint, credentials, permissions) become one
    InputError sentence; other errors pass unchanged. The store's outages are not ridden out here."""
    try:
        with fail_fast():
            yield
    except InputError:
        raise
    except Exception as exc:
        if not is_storage_error(exc) or isinstance(exc, FileNotFoundError):
            raise
        raise InputError(f"{uri}: the {what} cannot be read ({describe(exc)})") from exc
