"""Faults injected into Ray Train runs from the test side (production code reads no test flags)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import ray.cloudpickle
from ray.train import UserCallback


class KillWorkersOnce(UserCallback):
    """Once every worker has reported ``epoch`` (and its checkpoint is registered), SIGKILL them all.

    Runs on the Ray Train controller. ``marker`` records the kill, so it happens once per test, and
    lets the test check that it did.
    """

    def __init__(self, epoch: int, marker: Path):
        self.epoch, self.marker = epoch, marker

    def after_report(self, run_context, metrics, checkpoint):
        if metrics[0]["epoch"] != self.epoch or self.marker.exists():
            return
        pids = [actor["Pid"] for actor in _train_workers()]
        self.marker.write_text(json.dumps({"epoch": metrics[0]["epoch"], "pids": pids,
                                           "checkpoint": checkpoint.path if checkpoint else None}))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


def _train_workers() -> list[dict]:
    """The alive Ray Train workers of the job this runs in (from the controller)."""
    import ray
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    return [actor for actor in state.actors(actor_state_name="ALIVE").values()
            if actor["ActorClassName"] == "RayTrainWorker" and actor["JobID"] == job]


class LoseNodeOnce(UserCallback):
    """Notes the node of the workers at every reported epoch (a line of ``placements``); once ``epoch``
    is reported (its checkpoint registered), kills the node whose processes ``node_pids`` lists (its
    raylet and every process under it, SIGKILL: no drain), then the named actor ``release`` that
    kept the other node's CPUs busy, so the workers can start again there only.
    """

    def __init__(self, epoch: int, placements: Path, node_pids: Path, release: tuple[str, str]):
        self.epoch, self.placements, self.node_pids, self.release = epoch, placements, node_pids, release

    def after_report(self, run_context, metrics, checkpoint):
        import psutil
        import ray

        nodes = sorted(actor["Address"]["NodeID"] for actor in _train_workers())
        with open(self.placements, "a") as handle:
            handle.write(json.dumps({"epoch": metrics[0]["epoch"], "nodes": nodes, "time": time.time(),
                                     "checkpoint": checkpoint.path if checkpoint else None}) + "\n")
        if metrics[0]["epoch"] != self.epoch or not self.node_pids.exists():
            return
        roots = [psutil.Process(pid) for pid in json.loads(self.node_pids.read_text())
                 if psutil.pid_exists(pid)]
        self.node_pids.unlink()  # once
        doomed = {p for root in roots for p in [root, *root.children(recursive=True)]}
        for process in doomed:
            try:
                process.kill()
            except psutil.Error:
                pass
        name, namespace = self.release
        ray.kill(ray.get_actor(name, namespace=namespace))


class FailNth:
    """Wraps a Ray Data task function (the pipeline's ``read``/``write`` seams): its ``n``-th call,
    counted over every worker process in the file ``counter``, raises instead of running."""

    def __init__(self, func, n: int, counter: Path, what: str):
        self.func, self.n, self.counter, self.what = func, n, str(counter), what
        self.__name__ = getattr(func, "__name__", what)

    def __call__(self, *args, **kwargs):
        if tick(self.counter) == self.n:
            raise RuntimeError(f"injected {self.what} failure")
        return self.func(*args, **kwargs)


def tick(counter: str) -> int:
    """Add one to a counter file shared by processes; the new count."""
    import fcntl

    with open(counter, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("x")
        handle.flush()
        handle.seek(0)
        return len(handle.read())


# The callback runs on the Ray Train controller, which cannot import this module: ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
