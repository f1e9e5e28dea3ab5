"""The things a run is about, as values with their geometry: medical images and masks
(``images``), the cases of a cohort (``inputs`` lists a prefix, ``cohort`` reads a manifest), and
the per-case records and run manifest that say what became of each case (``records``).

May import ``medclipsam.storage`` (to reach the files) and ``medclipsam.errors``; knows nothing of
models, prompts, Ray or MLflow.
"""
