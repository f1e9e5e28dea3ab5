"""The layout of a run's output folder, and the per-case records that mark a case complete.

    <output>/masks/<case_id>.png|.nii.gz   the mask, with the source geometry
    <output>/saliency/<case_id>.npy        saliency maps (optional), image-shaped float32
    <output>/coarse/<case_id>.png|.nii.gz  coarse masks (optional)
    <output>/prompts/<case_id>.json        SAM prompts per slice (optional)
    <output>/overlays/<case_id>.png        contour pictures of the first cases
    <output>/records/<case_id>.json        the case's manifest row, written last
    <output>/manifest.parquet              every record of the run
    <output>/run.json                      the settings of the run (a resume must match them)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from . import storage
from .manifest import CaseRecord, record_from_dict

MASKS, SALIENCY, COARSE, PROMPTS = "masks", "saliency", "coarse", "prompts"
OVERLAYS, RECORDS, STAGING = "overlays", "records", ".staging"
MANIFEST, RUN_FILE = "manifest.parquet", "run.json"


def absolute_output(output: str) -> str:
    """Local output folders as absolute paths, so the manifest's mask URIs stand on their own."""
    return output if storage.is_remote(output) else os.path.abspath(output.removeprefix("file://"))


def record_uri(output: str, case_id: str) -> str:
    return storage.join(output, RECORDS, f"{case_id}.json")


def write_record(record: CaseRecord, output: str) -> None:
    storage.write_bytes_atomic(record_uri(output, record.case_id), json.dumps(asdict(record)).encode())


def read_records(output: str) -> dict[str, CaseRecord]:
    """Every case record already written under ``output`` (an empty dict for a new output)."""
    folder = storage.join(output, RECORDS)
    if not storage.exists(folder):
        return {}
    uris = [u for u in storage.list_files(folder) if u.endswith(".json") and not storage.basename(u).startswith(".")]
    records = {}
    for data in storage.read_many(uris).values():
        record = record_from_dict(json.loads(data))
        records[record.case_id] = record
    return records
