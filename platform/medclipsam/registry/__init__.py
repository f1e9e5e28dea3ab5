"""The MLflow model registry as a team uses it: versions evaluated on a labelled set before an alias
moves (the promotion gate), and whole pipelines (a task config with every model pinned) registered
as models of their own.

Sits above ``pipeline`` and ``weak``: the gate evaluates each kind of model through the same code
a run uses.
"""
