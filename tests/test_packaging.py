"""The installed package works without the source tree: a wheel built from the sources carries the
configs, and from a fresh virtual environment `medclipsam demo --help` runs and a config is found by
its bare name.

The fresh environment gets this environment's dependencies (torch, Ray, ...) but not its editable
install: one line in a .pth file of the new site-packages names this environment's site-packages.
Python appends such a line to sys.path, but processes the .pth files of site directories only, not
those of a folder added that way, so the editable install's .pth (which adds platform/) stays unread.
The test checks that too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_ROOT = REPO / "platform"


def _run(command: list[str], cwd: Path, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(virtual environment, wheel) with the wheel of the sources installed, and a clean environment."""
    tmp = tmp_path_factory.mktemp("packaging")
    # build from a copy of what a source distribution holds, so the build writes nothing into the checkout
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(SOURCE_ROOT, source / "platform", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
          "-w", str(tmp / "dist")], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("medclipsam-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], cwd=tmp)
    new_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         cwd=tmp).stdout.strip())
    (new_site / "medclipsam_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {"PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": os.environ.get("HOME", str(tmp)),
           "LANG": "C.UTF-8"}  # no PYTHONPATH, no VIRTUAL_ENV of this environment
    work = tmp / "elsewhere"  # a working directory outside the repository, with no configs/ next to it
    work.mkdir()
    return venv, wheel, env, work


def test_wheel_carries_the_configs(installed):
    _, wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"medclipsam/configs/{p.name}" for p in (SOURCE_ROOT / "medclipsam" / "configs").glob("*.yaml")}
    assert shipped and shipped <= names
    assert "medclipsam/cli/__init__.py" in names and not any(n.startswith(("tests/", "jobs/")) for n in names)


def test_installed_package_runs_without_the_source_tree(installed):
    venv, _, env, work = installed
    assert not work.resolve().is_relative_to(REPO)
    # medclipsam comes from the new environment, and the editable install's path is not on sys.path
    probe = ("import json, sys, medclipsam\n"
             "from medclipsam.config import load_config, packaged_configs, resolve_config\n"
             "print(json.dumps({'file': medclipsam.__file__, 'path': sys.path, 'names': packaged_configs(),\n"
             "  'task': load_config('breast_ultrasound').task, 'yaml': resolve_config('breast_ultrasound.yaml')}))")
    seen = json.loads(_run([str(venv / "bin" / "python"), "-c", probe], cwd=work, env=env).stdout)
    assert Path(seen["file"]).resolve().is_relative_to(venv.resolve())
    assert not Path(seen["file"]).resolve().is_relative_to(REPO)
    assert sysconfig.get_paths()["purelib"] in seen["path"]  # the dependencies, through the .pth line
    assert all(not entry.startswith(str(SOURCE_ROOT)) for entry in seen["path"])
    assert seen["task"] == "breast_ultrasound"
    assert Path(seen["yaml"]).resolve().is_relative_to(venv.resolve()) and Path(seen["yaml"]).is_file()
    assert {"breast_ultrasound", "demo", "weak", "finetune"} <= set(seen["names"])
    # the claim the set-up rests on: an editable install here puts platform/ on sys.path through a .pth
    # file in this site-packages, and the new environment, which appends that folder, did not read it
    editable = [p for p in Path(sysconfig.get_paths()["purelib"]).glob("*.pth") if str(SOURCE_ROOT) in p.read_text()]
    if editable:
        import medclipsam

        assert Path(medclipsam.__file__).resolve().is_relative_to(SOURCE_ROOT) and str(SOURCE_ROOT) in sys.path

    # the console script of the wheel: demo's help, and a bare config name through the CLI
    help_text = _run([str(venv / "bin" / "medclipsam"), "demo", "--help"], cwd=work, env=env).stdout
    assert help_text.startswith("Usage: medclipsam demo") and "--config" in help_text
    unknown = subprocess.run([str(venv / "bin" / "medclipsam"), "segment", "--config", "breast_ultrasund",
                              "--input", str(work), "--output", str(work / "out")],
                             cwd=work, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert unknown.returncode == 2, unknown.stderr
    assert "breast_ultrasund: config file not found" in unknown.stderr and "breast_ultrasound" in unknown.stderr
