"""The CPU stages as Ray Data calls them: read a case into slice rows, stage or write a slice.

Ray imports this module, not ``ray_runner``, in its task workers, and nothing it imports loads
model code (no torch, no MONAI): a write task then holds numpy, SimpleITK and the case's arrays,
a few hundred MiB instead of the ~800 MiB torch costs, and that memory is left to the actors.
Ray hands these tasks plain rows (dicts of columns); they convert at this edge
(``SliceRow.from_columns`` / ``to_columns``), so the stages below see ``SliceRow`` objects.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from ..domain.records import STATUS_ERROR, CaseRecord
from ..errors import shorten
from .assembly import AssemblySettings, collect_slice
from .job import Job
from .slices import CaseTask, SliceRow, case_slices, failed_read

log = logging.getLogger(__name__)


def read_case(row: dict, job: Job) -> list[dict]:
    """The case's slice rows as columns (one error row if it cannot be read)."""
    rows = case_slices(CaseTask(**row), job.config.image, job.source, job.config.oracle.box_margin,
                       oracle=job.attribution, key_slices=job.config.oracle.key_slices)
    return [r.to_columns() for r in rows]


def write_slice(row: dict, settings: AssemblySettings) -> list[dict]:
    """Stage one slice; the case's record (as a dict) once its last slice is in, else nothing.

    Ray runs it inside ``Contained``: a slice that cannot be staged makes its case an error row with
    the cause (the case can no longer complete in this run; a rerun retries it)."""
    record = collect_slice(SliceRow.from_columns(row), settings)
    return [] if record is None else [asdict(record)]


def failed_write(row: dict, exc: BaseException) -> list[dict]:
    """The case's error record; a slice that had already failed (its read, M2IB or SAM) keeps that
    cause first, since a rerun needs to know it, and the write's comes after it."""
    log.error("case %s slice %s could not be written: %s", row["case_id"], row["slice"], exc)
    cause = f"slice {row['slice']} could not be written: {type(exc).__name__}: {exc}"
    if row.get("error"):
        cause = f"{row['error']}; then {cause}"
    failed = CaseRecord(row["case_id"], row["uri"], gt_uri=row.get("gt_uri", ""), status=STATUS_ERROR,
                        error=shorten(cause, 500), n_slices=int(row.get("n_slices", 0) or 0))
    return [asdict(failed)]


class Contained:
    """A read or write task whose exception becomes its case's error row instead of a failed Ray task.

    A task that raises would stop the whole run (Ray Data does not retry application errors); an
    error row costs one case, which a rerun retries."""

    def __init__(self, func, kind: str) -> None:
        self.func, self.kind = func, kind

    def __call__(self, row: dict, **kwargs) -> list[dict]:
        try:
            return self.func(row, **kwargs)
        except Exception as exc:
            if self.kind == "write":
                return failed_write(row, exc)
            log.error("case %s could not be read: %s", row["case_id"], exc)
            return [failed_read(CaseTask(**row), f"{type(exc).__name__}: {exc}").to_columns()]
