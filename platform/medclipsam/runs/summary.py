"""The figures of an output: case counts by status, mean scores, throughput over the attempts
that processed cases, and the latest attempt's own (``attempt_*``), logged at the attempt's step."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..domain.records import column_floats, table_counts


def _rates(n_processed: float, n_slices: float, seconds: float) -> tuple[float, float]:
    return (n_processed / seconds, n_slices / seconds) if seconds > 0 else (0.0, 0.0)


SUMMARY_COLUMNS = ("status", "gt_uri", "dsc", "nsd", "dsc_coarse", "dsc_oracle")  # what the figures read


def summary_metrics(table: pa.Table, attempts: list[dict]) -> dict[str, float]:
    """Figures of the whole output (its manifest ``table``: counts, scores, throughput of the
    attempts that processed cases) and of the latest attempt (``attempt_*``)."""
    metrics = {f"n_{status}": float(n) for status, n in table_counts(table).items()}
    working = [a for a in attempts if a["n_processed"] > 0]
    processed, slices, seconds = (sum(a[k] for a in working) for k in ("n_processed", "n_slices", "seconds"))
    cases_per_s, slices_per_s = _rates(processed, slices, seconds)
    metrics.update(n_cases=float(table.num_rows), n_processed=float(processed), wall_seconds=float(seconds),
                   cases_per_s=cases_per_s, slices_per_s=slices_per_s, attempts=float(len(attempts)))
    last = attempts[-1]
    last_cases, last_slices = _rates(last["n_processed"], last["n_slices"], last["seconds"])
    metrics.update(attempt_n_processed=float(last["n_processed"]), attempt_wall_seconds=float(last["seconds"]),
                   attempt_cases_per_s=last_cases, attempt_slices_per_s=last_slices)
    has_truth = pc.not_equal(table.column("gt_uri"), "").to_numpy(zero_copy_only=False).astype(bool)
    dsc = column_floats(table, "dsc")
    scored = has_truth & np.isfinite(dsc)
    if scored.any():
        metrics.update(mean_dsc=float(np.mean(dsc[scored])),
                       mean_nsd=float(np.mean(column_floats(table, "nsd")[scored])), n_scored=float(scored.sum()))
    attributed = scored & np.isfinite(column_floats(table, "dsc_oracle"))
    if attributed.any():  # stage attribution: where the accuracy is lost
        metrics.update(mean_dsc_coarse=float(np.mean(column_floats(table, "dsc_coarse")[attributed])),
                       mean_dsc_attributed=float(np.mean(dsc[attributed])),
                       mean_dsc_oracle=float(np.mean(column_floats(table, "dsc_oracle")[attributed])))
    return metrics
