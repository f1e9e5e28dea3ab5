"""``models:/`` URIs of the MLflow model registry, resolved to exact versions.

An alias (``models:/NAME@champion``) names whichever version holds it now; a run resolves it once,
at its start, and works with ``models:/NAME/<version>`` from then on, so moving the alias during a
run, or after it, changes neither its masks nor what it records. A version's artifacts are fetched
into the cache once (``fetch_registered``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import storage
from ..errors import ModelError, first_line
from .fetch import cache_slot

_PATTERN = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))/?$")


@dataclass(frozen=True)
class RegisteredRef:
    """A registered model version: what the user wrote and what it resolved to."""

    requested: str  # as given, e.g. models:/biomedclip-dhnnce@champion
    name: str
    version: str
    alias: str = ""  # the alias it was resolved through, if any

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
    return RegisteredRef(uri, name, str(found.version), alias)


def _where(client) -> str:
    return storage.redact_uri(str(getattr(client, "_registry_uri", "") or getattr(client, "tracking_uri", "")))


def fetch_registered(uri: str) -> Path:
    """The artifacts of ``models:/name@alias`` or ``models:/name/version``, downloaded into the cache.

    An alias is resolved to its version first. A version's artifacts never change, so they are
    fetched once per registry (the cache key holds the tracking URI) and renamed into place whole.
    """
    import shutil

    import mlflow

    registry = mlflow.get_tracking_uri()
    pinned = resolve_registered(uri).uri
    target = cache_slot("models", f"{registry} {pinned}")
    if target.is_dir():
        return target
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
    return target
