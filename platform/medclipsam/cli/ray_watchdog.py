"""Stops what a local Ray left behind when the command that started it dies without cleaning up.

``ray.init`` on a laptop starts Ray's daemons as children of the command. A normal exit, an error,
Ctrl-C or SIGTERM stops them (``ray.shutdown``), but a SIGKILL (or the OOM killer) leaves Ray's
dashboard and runtime-env agents and idle workers running, re-parented to init. This watchdog runs
in its own session: it notes the command's descendants every second, and once the command is gone
it terminates the ones still alive (matched by PID and start time, so a reused PID is never hit).

    python -m medclipsam.cli.ray_watchdog PID
"""

from __future__ import annotations

import sys
import time


def watch(pid: int, interval: float = 1.0, grace: float = 3.0) -> int:
    import psutil

    try:
        driver = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    import os

    me = os.getpid()  # started by the command, so one of its children
    known: dict[int, float] = {}
    while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        try:
            known.update({p.pid: p.create_time() for p in driver.children(recursive=True) if p.pid != me})
        except psutil.Error:
            pass
        time.sleep(interval)
    left = []
    for child_pid, started in known.items():
        try:
            process = psutil.Process(child_pid)
            if process.create_time() == started:
                left.append(process)
        except psutil.Error:
            continue
    for process in left:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    return 0


def start(pid: int) -> None:
    """Start a watchdog for ``pid`` in a session of its own (it must outlive a SIGKILL of ``pid``)."""
    import subprocess

    subprocess.Popen([sys.executable, "-m", "medclipsam.cli.ray_watchdog", str(pid)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    sys.exit(watch(int(sys.argv[1])))
