"""The weak ensemble as an MLflow pyfunc: the ensemble folder travels as an artifact, and
``models:/NAME@alias`` loads in ``weak predict`` through ``ensemble.resolve_ensemble``.

MLflow logs this file as the model's code (``set_model`` below), so nothing is pickled."""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc


class WeakEnsembleModel(mlflow.pyfunc.PythonModel):
    """predict(image URIs) -> per image: foreground pixels of the ensemble's mask and its uncertainty,
    so the registered model is usable on its own."""

    def load_context(self, context) -> None:
        from medclipsam.weak.ensemble import Ensemble, resolve_ensemble

        self.folder = resolve_ensemble(context.artifacts["ensemble"])  # every member's hash checked
        self.ensemble = Ensemble(self.folder, self.folder.manifest.get("default_members", "cycles"))

    def predict(self, context, model_input: list[str], params=None) -> list[dict]:
        from medclipsam.domain.images import read_image
        from medclipsam.weak.dataset import nnunet_input
        from medclipsam.weak.uncertainty import binary_entropy, case_uncertainty

        uris = list(model_input)
        threshold = float(self.folder.manifest["threshold"])
        out = []
        for uri in uris:
            image = read_image(uri)
            p = self.ensemble.probability(*nnunet_input(image), image.is_volume)
            mask = p > threshold
            out.append({"uri": uri, "foreground_pixels": int(mask.sum()),
                        "uncertainty": case_uncertainty(binary_entropy(p), mask)})
        return out


mlflow.models.set_model(WeakEnsembleModel())
