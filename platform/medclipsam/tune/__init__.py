"""``medclipsam tune``: the text-driven settings of a task searched on Ray Tune, scored on labelled cases.

The published method picks beta and the bottleneck layer per task by a grid search scored by
Dice; this runs that search (optionally crossed with the coarse mask, the visual prompts, the
sentences and the CLIP model) as Ray Tune trials, each scoring the final SAM masks (and, beside
them, the coarse masks) of every labelled case.

``space`` reads the search space and turns its points into task configs; ``services`` holds the
models and caches for the whole search (two Ray actors); ``trial`` scores one point with the
runners' own stage functions; ``search`` drives Ray Tune and writes best.yaml, trials.csv,
report.html and the MLflow runs. Sits beside ``registry``, above ``pipeline``.
"""
