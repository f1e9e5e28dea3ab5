"""The case path, end to end: a job is planned (cases, prompts, settings), each case is read and
cut into slice rows, the rows pass the stages (saliency -> coarse mask -> prompts -> SAM), and
the rows of a case are assembled into its mask, scores, overlay and record.

``slices``, ``stages`` and ``assembly`` hold the stage functions; ``local`` runs them in a loop, ``ray_runner``
wires the same functions into Ray Data; ``run`` is the driver both share (plan, resume, tracking,
manifest). May import every lower layer (``segment``, ``saliency``, ``prompts``, ``eval``,
``models``, ``ops``, ``io``, ``config``, ``errors``), Ray and MLflow; never ``cli``.
"""
