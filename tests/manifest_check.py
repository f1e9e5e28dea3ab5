"""The manifest a run assembled from its record parts, against the one written the way it always was."""

from __future__ import annotations

import pyarrow.parquet as pq

from medclipsam.domain.records import SCHEMA, read_records, to_table


def _rows(table) -> list[dict]:
    return [{k: ("nan" if isinstance(v, float) and v != v else v) for k, v in row.items()}
            for row in table.to_pylist()]


def assert_manifest_is_the_records(output, case_ids: list[str]) -> None:
    """``output``'s manifest holds exactly each planned case's own record (``records/<case_id>.json``),
    in plan order: the same rows, columns and order as a manifest written from the records themselves."""
    manifest = pq.read_table(f"{output}/manifest.parquet")
    records = read_records(str(output))
    expected = to_table([records[c] for c in case_ids])
    assert manifest.schema.remove_metadata().equals(SCHEMA) and manifest.column_names == expected.column_names
    assert _rows(manifest) == _rows(expected)
