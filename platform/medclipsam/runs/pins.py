"""The models a run uses, pinned at its start: a ``models:/NAME@alias`` is resolved once to the
version it names then, and the weights' SHA-256 is recorded with it (``run.json``, MLflow params,
the manifest), so an alias moved during the run, or after it, changes nothing the run did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..storage.registered import is_registered, resolve_registered


@dataclass(frozen=True)
class ModelPin:
    """A model a run used, as asked for and as loaded; recorded in ``run.json`` and MLflow params."""

    role: str  # which model of the run: "clip", "pipeline", "ensemble"
    requested: str  # as given (an alias, a version, a folder, ...)
    uri: str  # what the run loads
    version: str = ""  # registry version, for models:/ URIs
    sha256: str = ""  # of the weights

    def params(self) -> dict[str, str]:
        """MLflow params: ``model.<role>.<field>``."""
        return {f"model.{self.role}.{k}": str(v) for k, v in asdict(self).items() if k != "role" and v}


def pin_registered(role: str, uri: str, sha256_of: Callable[[str], str] | None = None) -> ModelPin | None:
    """``uri`` pinned to the version it names now in the current MLflow store's registry (None for a
    URI outside the registry). ``sha256_of(pinned_uri)`` gives the weights' hash; without it the hash
    is left to the caller."""
    if not is_registered(uri):
        return None
    ref = resolve_registered(uri)
    return ModelPin(role, uri, ref.uri, ref.version, sha256_of(ref.uri) if sha256_of else "")


def pin_params(pins: tuple[ModelPin, ...]) -> dict[str, str]:
    """Every pin's MLflow params."""
    return {k: v for pin in pins for k, v in pin.params().items()}
