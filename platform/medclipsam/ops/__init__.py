"""Array operations with exact inverses: geometric transforms between an image and a model's
input, volume <-> slices, intensity windowing, merging SAM's candidate masks, post-processing.

May import: ``medclipsam.domain`` (the image type and its finite check), ``medclipsam.config``,
``medclipsam.errors``, numpy/scipy/torch.
Pure functions on arrays; no storage, Ray or MLflow.
"""
