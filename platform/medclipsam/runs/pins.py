"""The models a run uses, pinned at its start."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
