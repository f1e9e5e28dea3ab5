"""Running a cohort one case at a time: one manifest row per case, failures recorded, not raised."""

from __future__ import annotations

import logging
from collections.abc import Callable

from . import storage
from .errors import MedClipSamError
from .manifest import STATUS_ERROR, CaseRecord, write_manifest

log = logging.getLogger(__name__)

Progress = Callable[[int, int, CaseRecord], None]


def record_failure(record: CaseRecord, exc: Exception) -> None:
    """Mark the case failed with its message; unexpected errors keep their traceback in the log."""
    record.status, record.error = STATUS_ERROR, str(exc)
    if isinstance(exc, MedClipSamError):
        log.debug("case %s failed: %s", record.case_id, exc)
    else:
        log.exception("case %s failed", record.case_id)


def run_cases(
    cases: dict[str, str], run_one: Callable[[str, str], CaseRecord], output: str, progress: Progress | None = None
) -> list[CaseRecord]:
    """``run_one(case_id, uri)`` for every case, then the manifest at ``<output>/manifest.parquet``."""
    records = []
    for number, (case_id, uri) in enumerate(cases.items(), start=1):
        record = run_one(case_id, uri)
        records.append(record)
        if progress is not None:
            progress(number, len(cases), record)
    write_manifest(records, storage.join(output, "manifest.parquet"))
    return records
