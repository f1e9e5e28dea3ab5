"""Models registered the way fine-tuning registers them, for the registry tests; and the marker
strings that stand in for secrets."""

from __future__ import annotations

from pathlib import Path

SECRET_MARKERS = {"AWS_SECRET_ACCESS_KEY": "aws-secret-marker-5f1c9e",
                  "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-marker-83ad2b"}


def register_clip(folder: Path, name: str, tracking_uri: str) -> str:
    """Register a CLIP model folder as a new version of ``name`` through fine-tuning's own registration."""
    import mlflow

    from medclipsam.finetune.settings import FinetuneConfig
    from medclipsam.finetune.trainer import register_model

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("tests-registry")
    with mlflow.start_run() as run:
        pass
    config = FinetuneConfig.model_validate({"registry": {"tracking_uri": tracking_uri, "model_name": name}})
    return register_model(folder, run.info.run_id, config, {"source": folder.name})
