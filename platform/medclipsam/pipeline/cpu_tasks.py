"""The CPU stages as Ray Data calls them: read a case into slice rows, stage or write a slice.

Ray imports this module, not ``ray_runner``, in its task workers, and nothing it imports loads
model code (no torch, no MONAI): a write task then holds numpy, SimpleITK and the case's arrays,
a few hundred MiB instead of the ~800 MiB torch costs, and that memory is left to the actors.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from .assembly import AssemblySettings, collect_slice
from .job import Job
from .slices import CaseTask, case_slices

log = logging.getLogger(__name__)


def read_case(row: dict, job: Job) -> list[dict]:
    """The case's slice rows (one error row if it cannot be read)."""
    return case_slices(CaseTask(**row), job.config.image, job.source, job.config.oracle.box_margin,
                       oracle=job.attribution)


def write_slice(row: dict, settings: AssemblySettings) -> list[dict]:
    """Stage one slice; the case's record (as a dict) once its last slice is in, else nothing."""
    try:
        record = collect_slice(row, settings)
    except Exception:  # a slice that cannot be staged leaves its case incomplete; the driver reports it
        log.exception("case %s slice %s could not be staged", row["case_id"], row["slice"])
        return []
    return [] if record is None else [asdict(record)]
