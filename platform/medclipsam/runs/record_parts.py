"""Case records streamed into Parquet parts as they arrive, so a run's driver keeps none of them.

    <output>/records/<case_id>.json               written where the case finished, last: the truth
    <output>/records/parts/<attempt>-<n>.parquet  the driver's copy, ``PART_ROWS`` records a part

A resume learns which cases are complete from the parts (one listing, one read per part) and reads
a case's own record only where no part has it complete yet: the last records of a driver that was
killed, a failed case that was retried. The manifest is assembled from the parts at the end, the
latest record of each planned case in plan order, with the repeated strings as dictionaries.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..domain.records import COMPLETED, ROWS_PER_GROUP, CaseRecord, read_manifest, record_from_dict, write_manifest
from ..storage.outputs import RECORDS

PARTS = "parts"  # under records/
PART_ROWS = 1000  # records a part holds: a resume re-reads at most this many of a killed driver's


def use_system_allocator() -> None:
    """Arrow's system allocator for this process (the driver): it hands freed memory back, where
    Arrow's default (mimalloc) keeps it for reuse, so reading the parts to assemble the manifest
    does not stay on the driver's peak (``benchmarks/scale.py``: about 90 MB less at 100,000 cases).
    Ray's workers keep the default."""
    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


def parts_folder(output: str) -> str:
    return storage.join(output, RECORDS, PARTS)


class PartWriter:
    """Appends records to the output's parts, ``rows`` at a time. Part names sort in the order
    they were written (the attempt's start in nanoseconds, then a counter), so the latest record of
    a case is the one in the last part that holds it."""

    def __init__(self, output: str, rows: int = PART_ROWS) -> None:
        self.folder, self.rows = parts_folder(output), rows
        self.attempt = f"{time.time_ns():020d}"
        self.buffer: list[CaseRecord] = []
        self.written = 0

    def add(self, record: CaseRecord) -> None:
        self.buffer.append(record)
        if len(self.buffer) >= self.rows:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            write_manifest(self.buffer, storage.join(self.folder, f"{self.attempt}-{self.written:06d}.parquet"))
            self.written += 1
            self.buffer = []


def _parts(output: str) -> list[str]:
    folder = parts_folder(output)
    if not storage.exists(folder):
        return []
    return [u for u in storage.list_files(folder) if u.endswith(".parquet")
            and not storage.basename(u).startswith(".")]


def remove_parts(output: str) -> None:
    """A run that does not resume starts its parts afresh."""
    storage.remove_tree(parts_folder(output))


def recover(output: str, writer: PartWriter) -> dict[str, str]:
    """Every case's latest status under ``output`` (case_id -> status; {} for a new output).

    A case's own record decides: one whose record was removed counts as not run, whatever a part
    says, and records that no part holds complete are read one by one and handed to ``writer``, so
    the manifest assembled later has them. They are few: what a killed driver had not flushed, and
    failed cases, whose record a retry may have replaced."""
    statuses: dict[str, str] = {}
    for uri in _parts(output):
        part = read_manifest(uri, ["case_id", "status"])
        statuses.update(zip(part.column("case_id").to_pylist(), part.column("status").to_pylist(), strict=True))
    folder = storage.join(output, RECORDS)
    if not storage.exists(folder):
        return statuses
    names = {storage.basename(u).removesuffix(".json") for u in storage.list_files(folder)
             if u.endswith(".json") and not storage.basename(u).startswith(".")}
    for case_id in set(statuses) - names:  # its record was removed: the case runs again
        del statuses[case_id]
    unsure = [storage.join(folder, f"{n}.json") for n in names if statuses.get(n) not in COMPLETED]
    for data in storage.read_many(unsure).values():
        record = record_from_dict(json.loads(data))
        statuses[record.case_id] = record.status
        writer.add(record)
    writer.flush()
    return statuses


class Assembled:
    """Which row of which part is each row of the manifest: the latest record of each planned case,
    in plan order. Worked out on the case_id columns alone, so the records themselves are read a
    row group at a time (``groups``), never all at once."""

    def __init__(self, parts: list[str], part_of: np.ndarray, row_in: np.ndarray) -> None:
        self.parts, self.part_of, self.row_in = parts, part_of, row_in

    def __len__(self) -> int:
        return len(self.part_of)

    def groups(self, size: int = ROWS_PER_GROUP, keep: int = 8) -> Iterator[pa.Table]:
        """The manifest's rows, ``size`` at a time, in order. Records arrive roughly in plan order,
        so a group needs a few parts, and the last ``keep`` parts read are kept for the next."""
        cache: dict[int, pa.Table] = {}
        for start in range(0, len(self), size):
            part_of, row_in = self.part_of[start:start + size], self.row_in[start:start + size]
            pieces, positions = [], []
            for part in np.unique(part_of):
                if part not in cache:
                    if len(cache) >= keep:
                        del cache[next(iter(cache))]
                    cache[part] = read_manifest(self.parts[part], compact=True)
                chosen = np.flatnonzero(part_of == part)
                pieces.append(cache[part].take(pa.array(row_in[chosen])))
                positions.append(chosen)
            group = pa.concat_tables(pieces).unify_dictionaries()
            yield group.take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))


def assemble(output: str, case_ids: list[str]) -> Assembled:
    """Where the manifest of ``case_ids`` comes from in the parts (a case no part holds is left out)."""
    parts = _parts(output)
    ids = [read_manifest(uri, ["case_id"]).column("case_id") for uri in parts]
    if not ids:
        return Assembled([], np.zeros(0, np.int64), np.zeros(0, np.int64))
    sizes = np.array([len(column) for column in ids])
    n = int(sizes.sum())
    # The latest record of a case is its last row: its first in the rows reversed, which index_in finds.
    backwards = pc.take(pa.chunked_array(ids, pa.string()), pa.array(np.arange(n - 1, -1, -1)))
    found = pc.index_in(pa.array(case_ids, pa.string()), value_set=backwards.combine_chunks())
    rows = n - 1 - pc.filter(found, pc.is_valid(found)).to_numpy().astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    part_of = np.searchsorted(starts, rows, side="right") - 1
    return Assembled(parts, part_of, rows - starts[part_of])
