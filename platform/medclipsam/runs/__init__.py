"""What every job shares between its stages and the user: the resumable per-case run (plan,
resume, stream, progress, outage stop, manifest, the ``run.json`` guard), the models a run pins,
MLflow (the only layer that talks to it, beside the registered-model wrappers), and the Ray
session a job joins.

Sits above the stage layers (``segment``, ``eval`` and below) and below the jobs that use it
(``pipeline``, ``finetune``, ``weak``): a new per-case job composes these pieces instead of
copying the run skeleton.
"""
