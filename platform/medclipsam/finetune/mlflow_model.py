"""The fine-tuned CLIP model as an MLflow pyfunc: the model folder travels as an artifact, and
``models:/name@alias`` loads in the segmentation pipeline through ``load_clip``."""

from __future__ import annotations

import mlflow.pyfunc


class ClipTextEmbedder(mlflow.pyfunc.PythonModel):
    """predict(captions) -> unit-norm text embeddings, so the registered model is usable on its own."""

    def load_context(self, context) -> None:
        from medclipsam.models.biomedclip import load_clip

        self.clip = load_clip(context.artifacts["clip"])

    def predict(self, context, model_input, params=None):
        captions = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
        return [self.clip.text_embedding(caption).tolist() for caption in captions]
