"""A labelled evaluation set and the hash of its content, so a recorded score names exactly the
cases it was measured on (a file replaced under the same URI changes the hash)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .. import storage
from ..domain.cohort import CohortCase, is_manifest, read_labelled_cohort
from ..errors import InputError


@dataclass(frozen=True)
class EvalSet:
    uri: str
    input_uri: str  # what a run takes as --input
    gt_uri: str | None  # and as --gt (None: the manifest's gt_uri column)
    cases: tuple[CohortCase, ...]
    sha256: str


def read_eval_set(uri: str) -> EvalSet:
    """A cohort manifest whose every row has a ``gt_uri``, or a folder with ``images/`` and ``labels/``."""
    if is_manifest(uri):
        input_uri, gt_uri = uri, None
    elif storage.isdir(storage.join(uri, "images")) and storage.isdir(storage.join(uri, "labels")):
        input_uri, gt_uri = storage.join(uri, "images"), storage.join(uri, "labels")
    else:
        raise InputError(f"{uri}: an evaluation set is a cohort manifest (.csv/.parquet with a gt_uri column) or a "
                         "folder holding images/ and labels/ (paired by case_id)")
    cases = read_labelled_cohort(input_uri, gt_uri, f"the evaluation set {uri}")
    return EvalSet(uri, input_uri, gt_uri, tuple(cases), content_sha256(cases))


def content_sha256(cases: list[CohortCase] | tuple[CohortCase, ...]) -> str:
    """SHA-256 over every case's id, image bytes, label bytes and prompts, in case_id order."""
    digest = hashlib.sha256()
    for case in sorted(cases, key=lambda c: c.case_id):
        digest.update(f"{case.case_id}\0{_bytes_sha256(case.uri)}\0{_bytes_sha256(case.gt_uri)}\0"
                      f"{'|'.join(case.prompts)}\n".encode())
    return digest.hexdigest()


def _bytes_sha256(uri: str) -> str:
    """Of a file, or of a folder (a DICOM series): its files' names and bytes; of one series of a folder
    (``<folder>#series=<uid>``), the whole folder's and the series' UID."""
    digest = hashlib.sha256()
    folder, part = storage.split_part(uri)
    try:
        if storage.isdir(folder):
            digest.update(part.encode())
            for name in sorted(storage.list_files(folder, recursive=True)):
                digest.update(name.removeprefix(folder).encode() + b"\0" + storage.read_bytes(name))
        else:
            digest.update(part.encode())  # one segment of a SEG truth: the file's bytes and the choice
            digest.update(storage.read_bytes(folder))
    except FileNotFoundError:
        raise InputError(f"{uri}: no such file (named by the evaluation set)") from None
    return digest.hexdigest()
