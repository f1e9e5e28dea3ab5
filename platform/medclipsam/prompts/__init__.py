"""Visual prompts for SAM: saliency -> coarse mask -> boxes/points, boxes from label masks (the
oracle), and box/point prompt CSV files.

May import: ``ops``, ``io``, ``config``, ``errors``. No Ray or MLflow.
"""
