"""A registered pipeline as an MLflow pyfunc: the task config with every model pinned travels as an
artifact (``pipeline.yaml`` and ``pins.json``), and ``pseudolabel --pipeline models:/NAME@alias``
runs it through ``registry.pipelines.load_pipeline``.

MLflow logs this file as the model's code (``set_model`` below), so nothing is pickled."""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc


class PipelineModel(mlflow.pyfunc.PythonModel):
    """predict(anything) -> the pinned task config and pins, so the registered model explains itself."""

    def load_context(self, context) -> None:
        import json
        from pathlib import Path

        import yaml

        folder = Path(context.artifacts["pipeline"])
        self.config = yaml.safe_load((folder / "pipeline.yaml").read_text())
        self.pins = json.loads((folder / "pins.json").read_text())

    def predict(self, context, model_input: list[str], params=None) -> list[dict]:
        return [{"config": self.config, "pins": self.pins}]


mlflow.models.set_model(PipelineModel())
