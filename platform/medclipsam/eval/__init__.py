"""Scoring and showing results: DSC/NSD/HD95 metrics, evaluation of mask folders against ground
truth, overlay pictures, the HTML report of a run.

May import: ``ops``, ``io``, ``config``, ``errors``. No Ray or MLflow.
"""
