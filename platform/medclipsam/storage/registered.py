"""``models:/`` URIs of the MLflow model registry, resolved to exact versions.

An alias (``models:/NAME@champion``) names whichever version holds it now; a run resolves it once,
at its start, and works with ``models:/NAME/<version>`` from then on, so moving the alias during a
run, or after it, changes neither its masks nor what it records. A version's artifacts are fetched
into the cache once (``fetch_registered``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import storage
from ..errors import ModelError, first_line
from .fetch import cache_slot

SHA_TAG = "medclipsam.weights_sha256"  # a version's weights hash, as registration tagged it
_PATTERN = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))/?$")


@dataclass(frozen=True)
class RegisteredRef:
    """A registered model version: what the user wrote and what it resolved to."""

    requested: str  # as given, e.g. models:/biomedclip-dhnnce@champion
    name: str
    version: str
    alias: str = ""  # the alias it was resolved through, if any
    sha256: str = ""  # the version's weights hash tag, written at registration ("" if it has none)

    @property
    def uri(self) -> str:
        """The pinned URI: always this version, whatever the aliases do later."""
        return f"models:/{self.name}/{self.version}"


def is_registered(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith("models:/")


def parse_registered(uri: str) -> tuple[str, str, str]:
    """(name, alias, version) of a ``models:/`` URI; exactly one of alias and version is non-empty."""
    match = _PATTERN.match(uri)
    if not match:
        raise ModelError(f"model {uri}: not a registry URI; write models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["alias"] or "", match["version"] or ""


def resolve_registered(uri: str, client=None) -> RegisteredRef:
    """Pin ``models:/NAME@alias`` (or check ``models:/NAME/V``) against the registry.

    ``models:/NAME/latest`` resolves to the newest version. ``client``: an ``MlflowClient``
    (default: one for the current tracking URI).
    """
    name, alias, version = parse_registered(uri)
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    try:
        if alias:
            found = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ModelError(f"model {uri}: {name} has no versions")
            found = max(versions, key=lambda v: int(v.version))
        else:
            found = client.get_model_version(name, version)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"model {uri}: not found in the MLflow registry at {_where(client)} "
                         f"({first_line(exc)})") from exc
    return RegisteredRef(uri, name, str(found.version), alias, (getattr(found, "tags", None) or {}).get(SHA_TAG, ""))


def _where(client) -> str:
    return storage.redact_uri(str(getattr(client, "_registry_uri", "") or getattr(client, "tracking_uri", "")))


def fetch_registered(uri: str, digest: Callable[[Path], str] | None = None) -> Path:
    """The artifacts of ``models:/name@alias`` or ``models:/name/version``, downloaded into the cache.

    An alias is resolved to its version first. A version's artifacts never change, so they are
    fetched once per registry (the cache key holds the tracking URI) and renamed into place whole.
    ``digest`` computes the weights' SHA-256 of a fetched folder the way registration did: the
    folder is used only if it equals the version's SHA tag (a cached copy that does not is fetched
    again, once; a version without the tag, or still different, is refused)."""
    import mlflow

    registry = mlflow.get_tracking_uri()
    ref = resolve_registered(uri)
    target = cache_slot("models", f"{registry} {ref.uri}")
    for _ in range(2):
        if not target.is_dir():
            _download(uri, ref.uri, registry, target)
        if digest is None:
            return target
        if not ref.sha256:
            raise ModelError(f"model {uri}: version {ref.version} has no {SHA_TAG} tag, so its weights cannot be "
                             "verified; register it again with medclipsam")
        found = digest(target)
        if found == ref.sha256:
            return target
        shutil.rmtree(target, ignore_errors=True)  # a tampered or damaged copy: fetched again once
    raise ModelError(f"model {uri}: the weights fetched from the registry have SHA-256 {found[:12]}... but "
                     f"version {ref.version} was registered with {ref.sha256[:12]}...; refused (tampered with?)")


def _download(uri: str, pinned: str, registry: str, target: Path) -> None:
    """A version's artifacts into ``target``, whole or not at all (a partial folder renamed into place)."""
    import mlflow

    partial = Path(f"{target}.{os.getpid()}.part")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(partial))
        try:
            os.replace(partial, target)
        except OSError:  # another process fetched it first
            if not target.is_dir():
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise ModelError(f"model {uri}: cannot be fetched from the MLflow registry at "
                         f"{storage.redact_uri(registry)} ({exc})") from exc
