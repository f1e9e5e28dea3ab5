"""DHN-NCE fine-tuning of a CLIP model on image-caption pairs, on Ray Train, tracked and
registered in MLflow.

May import: ``models``, ``ops``, ``io``, ``config``, ``errors``, Ray and MLflow; never
``pipeline`` or ``cli``.
"""
