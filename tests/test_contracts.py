"""The import-linter contracts of ``make lint`` hold the layers: a planted import that breaks one
fails ``lint-imports`` (run on a copy of the package, so the tree itself is never touched)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tmp_path: Path, plant: dict[str, str]) -> subprocess.CompletedProcess:
    """lint-imports over a copy of the package with ``plant`` (module file -> line) appended."""
    copy = tmp_path / "platform"
    shutil.copytree(ROOT / "platform" / "medclipsam", copy / "medclipsam",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for module, line in plant.items():
        path = copy / "medclipsam" / module
        path.write_text(path.read_text() + f"\n{line}\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return subprocess.run([str(LINT), "--no-cache"], cwd=tmp_path, env={"PYTHONPATH": str(copy), "PATH": ""},
                          capture_output=True, text=True, timeout=300, check=False)


def _statuses(output: str) -> dict[str, str]:
    """Contract name -> KEPT or BROKEN, from lint-imports' summary (it wraps long names)."""
    part = output.split("dependencies.", 1)[1].split("Contracts:", 1)[0]
    summary = " ".join(re.sub(r"^\s*-+", "", part).split())
    return {name.strip(): status for name, status in re.findall(r"(.+?) (KEPT|BROKEN)", summary)}


def test_the_contracts_hold_on_the_tree(tmp_path):
    result = _lint(tmp_path, {})
    assert result.returncode == 0, result.stdout[-2000:]
    statuses = _statuses(result.stdout)
    assert len(statuses) == 4 and set(statuses.values()) == {"KEPT"}, statuses


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("segment/sam.py", "import mlflow  # noqa", "Stages know nothing of Ray, MLflow or object storage"),
    ("pipeline/job.py", "import mlflow  # noqa", "MLflow is reached only through runs.tracking"),
    ("runs/case_run.py", "from ..pipeline import run  # noqa", "Layers: cli -> registry"),
])
def test_a_planted_import_breaks_its_contract(tmp_path, module, line, contract):
    result = _lint(tmp_path, {module: line})
    assert result.returncode != 0
    broken = [name for name, status in _statuses(result.stdout).items() if status == "BROKEN"]
    assert any(name.startswith(contract) for name in broken), (broken, result.stdout[-2000:])
