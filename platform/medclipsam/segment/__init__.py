"""Segmentation of a batch of 2D slices by a promptable model (SAM and its variants): embed each
image once, decode every prompt, merge candidates, binarise.

May import: ``saliency``, ``prompts``, ``models``, ``ops``, ``io``, ``config``, ``errors``.
Arrays in, arrays out; no storage, Ray or MLflow.
"""
