"""Records streamed into Parquet parts (``runs.record_parts``): the manifest assembled from them is
the one the records make, the latest record of a case wins, a resume reads only what no part holds
complete, and neither planning nor a resume makes requests that grow with the cases."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medclipsam import storage
from medclipsam.domain.records import (
    SCHEMA,
    CaseRecord,
    read_manifest,
    to_table,
    write_groups,
    write_manifest,
    write_record,
    write_table,
)
from medclipsam.runs.record_parts import PartWriter, assemble, parts_folder, recover


def _record(i: int, status: str = "ok", **changes) -> CaseRecord:
    dsc = math.nan if i % 7 == 0 else 0.5 + (i % 50) / 100
    return replace(CaseRecord(f"c{i:05d}", f"/data/images/c{i:05d}.png", mask_uri=f"/out/masks/c{i:05d}.png",
                              status=status, prompts=json.dumps({"": {"boxes": [[i, i, i + 9, i + 9]]}}),
                              parameters=json.dumps({"source": "labels", "margin": 0}), backend="litemedsam",
                              gt_uri="" if i % 5 == 0 else f"/data/labels/c{i:05d}.png", dsc=dsc, nsd=dsc / 2,
                              n_slices=1 + i % 3, node="n1" if i % 2 else "n2"), **changes)


def _assembled(output, case_ids, size: int = 10_000):
    """The manifest's rows as ``assemble`` picks them from the parts, ``size`` a row group."""
    return pa.concat_tables(list(assemble(str(output), case_ids).groups(size))).unify_dictionaries()


def _plain(table) -> list[dict]:
    """Rows with NaN as a string (NaN never equals itself) and dictionaries read as plain strings."""
    rows = table.cast(SCHEMA).to_pylist()
    return [{k: ("nan" if isinstance(v, float) and v != v else v) for k, v in row.items()} for row in rows]


def test_a_manifest_assembled_from_parts_is_the_records_in_plan_order(tmp_path):
    records = [_record(i, "error" if i % 11 == 0 else "ok") for i in range(2500)]
    arrival = records[:]
    random.Random(0).shuffle(arrival)  # cases finish in any order
    writer = PartWriter(str(tmp_path), rows=1000)
    for record in arrival:
        writer.add(record)
    writer.flush()
    assert len(storage.list_files(parts_folder(str(tmp_path)))) == 3  # 1000 + 1000 + 500
    plan = [r.case_id for r in records]
    assembled = assemble(str(tmp_path), plan)
    groups = list(assembled.groups(size=700, keep=2))  # a few parts kept: some are read again
    assert [g.num_rows for g in groups] == [700, 700, 700, 400]
    assert groups[0].schema.field("parameters").type != SCHEMA.field("parameters").type  # read as a dictionary
    assert _plain(pa.concat_tables(groups).unify_dictionaries()) == _plain(to_table(records))
    # Written as a manifest (a row group at a time), it reads back as the one written from the records.
    write_groups(assembled.groups(), str(tmp_path / "assembled.parquet"), {"task": "t"})
    write_manifest(records, str(tmp_path / "direct.parquet"), {"task": "t"})
    assembled, direct = pq.read_table(tmp_path / "assembled.parquet"), pq.read_table(tmp_path / "direct.parquet")
    assert assembled.schema.equals(direct.schema, check_metadata=True)
    assert _plain(assembled) == _plain(direct) and assembled.num_rows == 2500
    # Only the planned cases, in the plan's order, whatever order the parts hold them in.
    subset = plan[::-3]
    assert _assembled(tmp_path, subset).column("case_id").to_pylist() == subset


def test_the_latest_record_of_a_case_wins(tmp_path):
    first = PartWriter(str(tmp_path))
    for i in range(4):
        first.add(_record(i, "error" if i == 2 else "ok"))
    first.flush()
    retry = PartWriter(str(tmp_path))  # a later attempt: its parts sort after the first's
    retry.add(_record(2, "ok", dsc=0.99))
    retry.flush()
    rows = _assembled(tmp_path, [f"c{i:05d}" for i in range(4)]).to_pylist()
    assert [(r["case_id"], r["status"]) for r in rows] == [(f"c{i:05d}", "ok") for i in range(4)]
    assert rows[2]["dsc"] == 0.99


def test_write_table_in_row_groups_equals_one_table(tmp_path, monkeypatch):
    import medclipsam.domain.records as records_module

    records = [_record(i) for i in range(25)]
    monkeypatch.setattr(records_module, "ROWS_PER_GROUP", 4)
    write_table(to_table(records), str(tmp_path / "m.parquet"))
    written = pq.ParquetFile(tmp_path / "m.parquet")
    assert written.metadata.num_row_groups == 7  # 6 x 4 + 1
    assert _plain(written.read()) == _plain(to_table(records))
    write_table(SCHEMA.empty_table(), str(tmp_path / "empty.parquet"))  # no case: the columns all the same
    assert pq.read_table(tmp_path / "empty.parquet").schema.equals(SCHEMA)


class Reads:
    """Counts the files the storage layer reads (a read of N files counts N) and its other calls."""

    def __init__(self, monkeypatch) -> None:
        self.files: list[str] = []
        self.calls = 0
        for name in ("read_bytes", "read_many", "exists", "isdir", "list_files", "list_dirs"):
            original = getattr(storage, name)
            monkeypatch.setattr(storage, name, self._counted(name, original))

    def _counted(self, name, original):
        def call(*args, **kwargs):
            self.calls += 1
            if name == "read_bytes":
                self.files.append(args[0])
            elif name == "read_many":
                self.files.extend(args[0])
            return original(*args, **kwargs)

        return call


def _finished_run(output: str, n: int, flushed: int, errors: bool = True) -> list[CaseRecord]:
    """``n`` cases each with its own record (every tenth failed), the first ``flushed`` of them in
    parts too: a killed driver's output."""
    records = [_record(i, "error" if errors and i % 10 == 3 else "ok") for i in range(n)]
    writer = PartWriter(output, rows=100)
    for record in records:
        write_record(record, output)
        if record.case_id < f"c{flushed:05d}":
            writer.add(record)
    writer.flush()
    return records


def test_a_resume_reads_only_the_records_no_part_holds_complete(tmp_path, monkeypatch):
    output = str(tmp_path / "run")
    records = _finished_run(output, 500, flushed=400)
    reads = Reads(monkeypatch)
    resumed = PartWriter(output)
    statuses = recover(output, resumed)
    assert statuses == {r.case_id: r.status for r in records}
    unflushed = {f"c{i:05d}" for i in range(400, 500)}
    failed = {r.case_id for r in records if r.status == "error" and r.case_id not in unflushed}
    read = {storage.basename(u).removesuffix(".json") for u in reads.files if u.endswith(".json")}
    assert read == unflushed | failed and len(failed) == 40  # the 100 unflushed and 40 failed ones, nothing else
    # What was read is in a part now: the manifest has every case.
    assert _plain(_assembled(output, [r.case_id for r in records])) == _plain(to_table(records))
    # A case whose own record was removed runs again, whatever its part says.
    (tmp_path / "run" / "records" / "c00005.json").unlink()
    assert "c00005" not in recover(output, PartWriter(output))


def test_resume_requests_do_not_grow_with_the_cases(tmp_path, monkeypatch):
    counted = {}
    for n in (300, 3000):
        output = str(tmp_path / f"run{n}")
        _finished_run(output, n, flushed=n, errors=False)  # every case complete and in a part
        reads = Reads(monkeypatch)
        recover(output, PartWriter(output))
        monkeypatch.undo()
        parts = len(storage.list_files(parts_folder(output)))
        counted[n] = (reads.calls, len([u for u in reads.files if u.endswith(".json")]), parts)
    assert counted[300][1] == counted[3000][1] == 0  # no case's own record is read
    # listings and checks the same; one read per part (the parts hold 100 records each)
    assert counted[300][0] - counted[300][2] == counted[3000][0] - counted[3000][2]


def test_planning_requests_do_not_grow_with_the_cases(tmp_path, monkeypatch):
    from medclipsam.config import parse_config
    from medclipsam.pipeline.job import Job, plan

    config = parse_config({"task": "t"})
    counted = {}
    for n in (50, 500):
        images, labels = tmp_path / f"images{n}", tmp_path / f"labels{n}"
        images.mkdir()
        labels.mkdir()
        for i in range(n):
            (images / f"c{i:04d}.png").write_bytes(b"not read at planning")
            (labels / f"c{i:04d}.png").write_bytes(b"not read at planning")
        reads = Reads(monkeypatch)
        tasks = plan(Job(config, str(images), str(tmp_path / f"out{n}"), "labels", str(labels)).resolved())
        monkeypatch.undo()
        assert len(tasks) == n and all(t.gt_uri.endswith(f"{t.case_id}.png") for t in tasks)
        counted[n] = (reads.calls, len(reads.files))
    assert counted[50] == counted[500], counted


def test_summary_metrics_from_the_manifest_match_a_brute_force_count():
    from medclipsam.domain.records import table_counts
    from medclipsam.runs.summary import summary_metrics

    records = [_record(i, ["ok", "error", "no_target"][i % 3], dsc_oracle=0.9 if i % 4 == 0 else math.nan,
                       dsc_coarse=0.3) for i in range(200)]
    attempts = [{"n_processed": 150, "seconds": 10.0, "n_slices": 300}, {"n_processed": 50, "seconds": 5.0,
                                                                          "n_slices": 90}]
    metrics = summary_metrics(to_table(records), attempts)
    assert table_counts(to_table(records)) == {"error": 67, "no_target": 66, "ok": 67}
    scored = [r for r in records if r.gt_uri and np.isfinite(r.dsc)]
    attributed = [r for r in scored if np.isfinite(r.dsc_oracle)]
    assert metrics["n_scored"] == len(scored) and metrics["mean_dsc"] == pytest.approx(np.mean([r.dsc for r in scored]))
    assert metrics["mean_nsd"] == pytest.approx(np.mean([r.nsd for r in scored]))
    assert metrics["mean_dsc_oracle"] == pytest.approx(0.9)
    assert metrics["mean_dsc_attributed"] == pytest.approx(np.mean([r.dsc for r in attributed]))
    assert metrics["n_ok"] == 67 and metrics["n_cases"] == 200 and metrics["cases_per_s"] == pytest.approx(200 / 15)
    assert metrics["attempt_slices_per_s"] == pytest.approx(90 / 5)


def test_records_of_a_run_are_read_from_its_manifest_when_used(tmp_path):
    from medclipsam.runs.case_run import ManifestRecords

    records = [_record(i) for i in range(5)]
    write_manifest(records, str(tmp_path / "manifest.parquet"))
    lazy = ManifestRecords(str(tmp_path / "manifest.parquet"), 5)
    assert len(lazy) == 5 and lazy._records is None  # counted without reading
    assert [asdict(r)["case_id"] for r in lazy] == [r.case_id for r in records]
    assert lazy[2].prompts == records[2].prompts and lazy[-1].node == "n2"
    some = ManifestRecords(str(tmp_path / "manifest.parquet"), 5, {"c00001", "c00003"})
    assert len(some) == 2 and [r.case_id for r in some] == ["c00001", "c00003"]
    assert read_manifest(str(tmp_path / "manifest.parquet"), ["case_id"]).num_columns == 1
