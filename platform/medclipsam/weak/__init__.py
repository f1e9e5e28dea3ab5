"""Weak supervision, the method's third stage: nnU-Net v2 (2D configuration, fold ``all``) trained
on the zero-shot pseudo-labels with a cyclic learning rate, an ensemble of checkpoints whose
foreground probabilities are averaged, and a per-case uncertainty score.

``dataset`` exports an nnU-Net raw dataset, ``planning`` plans and preprocesses it, the trainer
subclass in ``nnunet_trainers`` runs the cyclic schedule and keeps the members, ``training``
drives it on Ray Train with MLflow, ``ensemble`` and ``predict`` apply the members to a cohort.
May import ``eval``, ``ops``, ``io``, ``config`` and ``errors``, Ray, MLflow and nnU-Net; never
``cli``.
"""
