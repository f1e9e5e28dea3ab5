"""The figures of an output: case counts by status, mean scores, throughput over the attempts
that processed cases, and the latest attempt's own (``attempt_*``), logged at the attempt's step."""

from __future__ import annotations

import numpy as np

from ..domain.records import CaseRecord, status_counts


def _rates(n_processed: float, n_slices: float, seconds: float) -> tuple[float, float]:
    return (n_processed / seconds, n_slices / seconds) if seconds > 0 else (0.0, 0.0)


def summary_metrics(records: list[CaseRecord], attempts: list[dict]) -> dict[str, float]:
    """Figures of the whole output (counts, scores, throughput of the attempts that processed cases)
    and of the latest attempt (``attempt_*``)."""
    metrics = {f"n_{status}": float(n) for status, n in status_counts(records).items()}
    working = [a for a in attempts if a["n_processed"] > 0]
    processed, slices, seconds = (sum(a[k] for a in working) for k in ("n_processed", "n_slices", "seconds"))
    cases_per_s, slices_per_s = _rates(processed, slices, seconds)
    metrics.update(n_cases=float(len(records)), n_processed=float(processed), wall_seconds=float(seconds),
                   cases_per_s=cases_per_s, slices_per_s=slices_per_s, attempts=float(len(attempts)))
    last = attempts[-1]
    last_cases, last_slices = _rates(last["n_processed"], last["n_slices"], last["seconds"])
    metrics.update(attempt_n_processed=float(last["n_processed"]), attempt_wall_seconds=float(last["seconds"]),
                   attempt_cases_per_s=last_cases, attempt_slices_per_s=last_slices)
    scored = [r for r in records if r.gt_uri and np.isfinite(r.dsc)]
    if scored:
        metrics.update(mean_dsc=float(np.mean([r.dsc for r in scored])),
                       mean_nsd=float(np.mean([r.nsd for r in scored])), n_scored=float(len(scored)))
    attributed = [r for r in scored if np.isfinite(r.dsc_oracle)]
    if attributed:  # stage attribution: where the accuracy is lost
        metrics.update(mean_dsc_coarse=float(np.mean([r.dsc_coarse for r in attributed])),
                       mean_dsc_attributed=float(np.mean([r.dsc for r in attributed])),
                       mean_dsc_oracle=float(np.mean([r.dsc_oracle for r in attributed])))
    return metrics
