"""The Ray a job runs on: joined or started once, its Ray Data output kept quiet, and the device
each model pool uses. The CLI passes a ``connect`` that joins the cluster it was told of (and
stops a local Ray on every exit); a library caller without one gets a local Ray.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable


def ensure_ray(connect: Callable[[], None] | None = None) -> None:
    """Call ``connect``, or start a local Ray if this process has none yet."""
    import ray

    if connect is not None:
        connect()
    elif not ray.is_initialized():
        ray.init()


def alive_nodes() -> int:
    """How many nodes the Ray this process is connected to has now."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def watch_head(gcs_address: str, on_lost: Callable[[], None], lost_after_s: float,
               period_s: float = 1.0) -> threading.Thread:
    """Call ``on_lost`` once the head's GCS (``host:port``) has refused connections for ``lost_after_s``.

    A process that joined a cluster whose head died waits on Ray's reconnect for 60 s, logging, and
    is then aborted by Ray; a TCP connect to the GCS port tells sooner. A daemon thread, so it never
    keeps the process alive.
    """
    host, port = gcs_address.rsplit(":", 1)
    host = host.strip("[]")

    def watch() -> None:
        since = None
        while True:
            try:
                with socket.create_connection((host, int(port)), timeout=period_s):
                    since = None
            except OSError:
                since = since if since is not None else time.monotonic()
                if time.monotonic() - since >= lost_after_s:
                    on_lost()
                    return
            time.sleep(period_s)

    thread = threading.Thread(target=watch, name="medclipsam-head-watch", daemon=True)
    thread.start()
    return thread


def pool_device(num_gpus: float, cpu_device: str = "cpu") -> str:
    """The torch device of an actor that asked Ray for ``num_gpus``: Ray gives it a GPU, or none."""
    return "cuda" if num_gpus > 0 else cpu_device


def quiet_ray_data(verbose: bool = False) -> None:
    """Ray Data's own progress bars, execution log and periodic advice off unless verbose.

    The CLI draws one progress bar per run. Ray Data's issue detectors repeat a 14-line memory
    advice every 30 s for as long as a run lasts; with -v they are back.
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    if not verbose:
        context.issue_detectors_config.detectors = []
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    # "Progress bars disabled": we disabled them on purpose.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if verbose else logging.ERROR)
