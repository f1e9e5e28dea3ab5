"""A local Ray started by a command goes with it, whatever ends the command: SIGTERM (a clean exit
with a sentence, not Ray's abort dump) and SIGKILL (the watchdog stops Ray's daemons and workers).

Each case runs a real ``medclipsam pseudolabel`` in a subprocess, waits until its Ray has started,
notes every process below it, sends the signal, and checks that none of those processes is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from disc_cohort import disc_images


def _descendants(pid: int) -> dict[int, float]:
    try:
        return {p.pid: p.create_time() for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _command_lines(pids) -> str:
    """The command lines of those of ``pids`` still running (one may exit, or be a zombie, meanwhile)."""
    lines = []
    for pid in pids:
        try:
            lines.append(" ".join(psutil.Process(pid).cmdline()))
        except psutil.Error:
            continue
    return " ".join(lines)


def _alive(known: dict[int, float]) -> list[str]:
    left = []
    for pid, started in known.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(process.cmdline())[:120]}")
        except psutil.Error:
            continue
    return left


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_local_ray_is_stopped_when_the_command_is_signalled(tmp_path, signum):
    data = disc_images(tmp_path / "data", 80, size=64)  # enough work to be stopped in the middle
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [os.path.join(os.path.dirname(sys.executable), "medclipsam"), "pseudolabel", "--input",
               str(data / "images"), "--gt", str(data / "labels"), "--prompt-source", "labels", "--output",
               str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    known: dict[int, float] = {}
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and process.poll() is None:
            known.update(_descendants(process.pid))
            names = _command_lines(known)
            if "raylet" in names and "DashboardAgent" in names and "SamStage" in names:
                break  # Ray, its agents and the SAM actors are up: the run is under way
            time.sleep(0.5)
        assert process.poll() is None, process.communicate()
        time.sleep(2)
        known.update(_descendants(process.pid))
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    if signum == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM
        assert "stopped by SIGTERM; completed cases are kept" in stderr
        assert "SIGTERM received" not in stderr  # Ray's C++ handler would abort with a stack dump
    else:
        assert process.returncode == -signal.SIGKILL
    left = _alive(known)
    for _ in range(30):  # the watchdog polls every second, then gives 3 s before SIGKILL
        if not left:
            break
        time.sleep(1)
        left = _alive(known)
    assert len(known) >= 4 and not left, left
