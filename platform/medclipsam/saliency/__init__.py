"""Text-conditioned saliency: M2IB (an information bottleneck on one vision block) batched over
images, and the maps mapped back through the exact inverse of CLIP's input transform.

May import: ``models``, ``ops``, ``io``, ``config``, ``errors``. No storage, Ray or MLflow.
"""
