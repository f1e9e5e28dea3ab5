"""``medclipsam demo`` end to end, offline, as a user runs it: the labels fallback on the real sample
volumes through the Ray pipeline, a quiet console, the published per-case scores, and the report.

Runs in a process of its own (the Makefile gives it one): the command starts its own local Ray.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

# Per-case DSC of LiteMedSAM with boxes from the labels (margin 2 px), as the README reports them.
EXPECTED_DSC = {"brain1": 0.8943, "brain2": 0.6533, "breast1": 0.6763, "lung1": 0.8633, "lung2": 0.9452}


def test_demo_offline_runs_the_labels_fallback_quietly(tmp_path, samples_root):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    cli = Path(sys.executable).with_name("medclipsam")
    run = subprocess.run([str(cli), "demo", "--output", str(tmp_path / "out")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    assert run.returncode == 0, "\n".join(lines[-40:])
    assert len(lines) <= 60, "\n".join(lines)
    assert "BiomedCLIP is not available" in lines[0] and "box prompts from the labels" in lines[0]
    assert not any("Traceback" in line for line in lines)
    row = re.compile(r"^(?P<case>\w+)\s+(?P<dsc>\d\.\d{4})\s+\d\.\d{4}\s+[\d.]+\s+ok$")
    table = {m["case"]: float(m["dsc"]) for m in map(row.match, run.stdout.splitlines()) if m}
    assert table.keys() == EXPECTED_DSC.keys(), run.stdout
    for case, dsc in EXPECTED_DSC.items():
        assert table[case] == pytest.approx(dsc, abs=2e-3), case
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert [r["case_id"] for r in manifest] == list(EXPECTED_DSC)
    assert all(r["status"] == "ok" and r["prompt_source"] == "labels" for r in manifest)
    assert {r["case_id"]: round(r["dsc"], 4) for r in manifest} == table
    page = (tmp_path / "out" / "report.html").read_text()
    assert all(f"<td data-value='{case}'>" in page for case in EXPECTED_DSC)
    assert "id='oracle-banner'" in page and "Oracle upper bound, not a zero-shot result" in page
    assert f"report: {tmp_path / 'out' / 'report.html'}" in run.stdout
