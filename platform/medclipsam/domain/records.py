"""The run manifest: one row per case, written as Parquet."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from ..storage.outputs import RECORDS, record_uri

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_NO_PROMPTS = "no_prompts"
STATUS_NO_TARGET = "no_target"
WARNING_SEPARATOR = "; "  # joins a case's warnings in its record; no warning holds it


@dataclass
class CaseRecord:
    case_id: str
    source_uri: str
    mask_uri: str = ""
    mask_formats: str = ""  # the formats written, comma-separated ("nifti,dicom-seg"); masks/<case_id>.seg.dcm
    status: str = STATUS_OK
    error: str = ""
    warnings: str = ""  # WARNING_SEPARATOR-separated: why an ok case deserves a look (pipeline.flags)
    prompts: str = "{}"  # JSON: slice -> boxes/points/labels
    n_prompted_slices: int = 0
    seconds_read: float = 0.0
    seconds_embed: float = 0.0
    seconds_decode: float = 0.0
    seconds_write: float = 0.0
    backend: str = ""
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    text_prompt: str = ""  # JSON list of the sentences (text-driven mode)
    clip_model: str = ""
    clip_sha256: str = ""
    n_target_slices: int = 0
    seconds_saliency: float = 0.0
    parameters: str = "{}"  # JSON of every setting used
    prompt_source: str = ""  # pseudolabel: "text" (saliency) or "labels" (boxes from the ground truth)
    n_slices: int = 0  # slices the case was cut into (1 for a 2D image)
    gt_uri: str = ""
    dsc: float = math.nan  # against gt_uri, when given
    nsd: float = math.nan
    hd95: float = math.nan
    dsc_coarse: float = math.nan  # stage attribution: the coarse mask's DSC
    dsc_oracle: float = math.nan  # stage attribution: SAM prompted with the truth's boxes
    uncertainty: float = math.nan  # weak predict: the ensemble's per-case uncertainty score
    seconds_predict: float = 0.0  # weak predict: the ensemble's inference time
    n_sam_slices: int = 0  # slices SAM's image encoder ran on (propagation visits only the target's)
    n_m2ib_slices: int = 0  # slices M2IB ran on (text mode; propagated, the sampled ones only)
    node: str = ""  # the Ray node(s) whose SAM actors ran on the case, comma-separated ("" in-process)


SCHEMA = pa.schema(
    [
        ("case_id", pa.string()),
        ("source_uri", pa.string()),
        ("mask_uri", pa.string()),
        ("mask_formats", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("warnings", pa.string()),
        ("prompts", pa.string()),
        ("n_prompted_slices", pa.int64()),
        ("seconds_read", pa.float64()),
        ("seconds_embed", pa.float64()),
        ("seconds_decode", pa.float64()),
        ("seconds_write", pa.float64()),
        ("backend", pa.string()),
        ("checkpoint", pa.string()),
        ("checkpoint_sha256", pa.string()),
        ("text_prompt", pa.string()),
        ("clip_model", pa.string()),
        ("clip_sha256", pa.string()),
        ("n_target_slices", pa.int64()),
        ("seconds_saliency", pa.float64()),
        ("parameters", pa.string()),
        ("prompt_source", pa.string()),
        ("n_slices", pa.int64()),
        ("gt_uri", pa.string()),
        ("dsc", pa.float64()),
        ("nsd", pa.float64()),
        ("hd95", pa.float64()),
        ("dsc_coarse", pa.float64()),
        ("dsc_oracle", pa.float64()),
        ("uncertainty", pa.float64()),
        ("seconds_predict", pa.float64()),
        ("n_sam_slices", pa.int64()),
        ("n_m2ib_slices", pa.int64()),
        ("node", pa.string()),
    ]
)


COMPLETED = (STATUS_OK, STATUS_NO_TARGET, STATUS_NO_PROMPTS)  # a rerun skips these; errors are retried


def record_from_dict(data: dict) -> CaseRecord:
    """A record read back from JSON; keys this version does not know are ignored."""
    known = {f for f in CaseRecord.__dataclass_fields__}
    floats = ("dsc", "nsd", "hd95", "dsc_coarse", "dsc_oracle", "uncertainty")
    values = {k: (math.nan if v is None and k in floats else v) for k, v in data.items() if k in known}
    return CaseRecord(**values)


def status_counts(statuses) -> dict[str, int]:
    """How many cases ended in each status (records, or manifest rows as dicts), sorted by status."""
    counts: dict[str, int] = {}
    for item in statuses:
        status = item["status"] if isinstance(item, dict) else item.status
        counts[status] = counts.get(status, 0) + 1
    return dict(sorted(counts.items()))


def table_counts(table: pa.Table) -> dict[str, int]:
    """``status_counts`` of a manifest table (its status column plain or a dictionary), sorted by status."""
    counts = pc.value_counts(table.column("status").cast(pa.string())).to_pylist()
    return dict(sorted((str(c["values"]), int(c["counts"])) for c in counts))


def column_floats(table: pa.Table, column: str) -> np.ndarray:
    """A manifest column as floats (NaN where a score is missing), for figures over the whole run."""
    return table.column(column).to_numpy(zero_copy_only=False).astype(float)


def to_table(records: list[CaseRecord]) -> pa.Table:
    """The records as a table, every URI in them redacted (a credential never reaches a manifest)."""
    return pa.Table.from_pylist([storage.redact_values(asdict(record)) for record in records], schema=SCHEMA)


ABOUT_KEY = b"medclipsam.run"  # the manifest's Parquet metadata: what the run was (JSON), for its report


def write_manifest(records: list[CaseRecord], uri: str, about: dict | None = None) -> None:
    """Write the manifest atomically to ``uri`` (any fsspec URI); ``about`` goes into its metadata."""
    write_table(to_table(records), uri, about)


ROWS_PER_GROUP = 2_000  # a manifest is written a row group at a time, so its strings unpack a group at a time


def write_table(table: pa.Table, uri: str, about: dict | None = None) -> None:
    """Write ``table`` (``SCHEMA``'s columns, strings plain or dictionary-encoded) as a manifest."""
    write_groups((table.slice(start, ROWS_PER_GROUP) for start in range(0, table.num_rows, ROWS_PER_GROUP)),
                 uri, about)


def write_groups(groups: Iterable[pa.Table], uri: str, about: dict | None = None) -> None:
    """Write a manifest a row group at a time (``SCHEMA``'s columns, strings plain or as dictionaries),
    so that no more than one group of its rows need be in memory at once."""
    schema = SCHEMA.with_metadata({ABOUT_KEY: json.dumps(storage.redact_values(about)).encode()}) if about else SCHEMA
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, schema) as writer:
        for group in groups:
            writer.write_table(group.select(SCHEMA.names).cast(schema))
    storage.write_bytes_atomic(uri, buffer.getvalue())


# Columns most cases share a value of (the settings, the models, the status): read back as
# dictionaries, they cost a few bytes a row instead of the whole string.
REPEATED = ("mask_formats", "status", "error", "warnings", "backend", "checkpoint", "checkpoint_sha256",
            "text_prompt", "clip_model", "clip_sha256", "parameters", "prompt_source", "node")


def read_manifest(uri: str, columns: list[str] | None = None, compact: bool = False) -> pa.Table:
    """A manifest (or a part of one); ``compact`` reads the ``REPEATED`` columns as dictionaries."""
    wanted = [c for c in REPEATED if columns is None or c in columns] if compact else None
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns, read_dictionary=wanted)


def records_of(table: pa.Table) -> list[CaseRecord]:
    """The rows of a manifest as records."""
    return [record_from_dict(row) for row in table.to_pylist()]


def manifest_about(table: pa.Table) -> dict:
    """What ``write_manifest`` recorded about the run ({} for a manifest without it)."""
    raw = (table.schema.metadata or {}).get(ABOUT_KEY)
    return json.loads(raw) if raw else {}


def write_record(record: CaseRecord, output: str) -> None:
    """The record as JSON, every URI in it redacted."""
    storage.write_bytes_atomic(record_uri(output, record.case_id),
                               json.dumps(storage.redact_values(asdict(record))).encode())


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
