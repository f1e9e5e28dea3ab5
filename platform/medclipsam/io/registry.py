"""``models:/`` URIs of the MLflow model registry, resolved to exact versions.

An alias (``models:/NAME@champion``) names whichever version holds it now; a run resolves it once,
at its start, and works with ``models:/NAME/<version>`` from then on, so moving the alias during a
run, or after it, changes neither its masks nor what it records.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..errors import ModelError, first_line

# Tags on a model version: which kind of model it is (how the promotion gate evaluates it), and the
# SHA-256 of its weights.
KIND_TAG, SHA_TAG = "medclipsam.kind", "medclipsam.weights_sha256"
KIND_CLIP, KIND_WEAK, KIND_PIPELINE = "clip", "weak-ensemble", "pipeline"
KINDS = (KIND_CLIP, KIND_WEAK, KIND_PIPELINE)

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


@dataclass(frozen=True)
class ModelPin:
    """A model a run used, as asked for and as loaded; recorded in ``run.json`` and MLflow params."""

    role: str  # which model of the run: "clip", "pipeline"
    requested: str  # as given (an alias, a version, a folder, ...)
    uri: str  # what the run loads
    version: str = ""  # registry version, for models:/ URIs
    sha256: str = ""  # of the weights

    def params(self) -> dict[str, str]:
        """MLflow params: ``model.<role>.<field>``."""
        return {f"model.{self.role}.{k}": str(v) for k, v in asdict(self).items() if k != "role" and v}


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
    from .tracking import redact_uri

    return redact_uri(str(getattr(client, "_registry_uri", "") or getattr(client, "tracking_uri", "")))


