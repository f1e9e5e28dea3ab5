"""The watch on a joined cluster's head (runs.ray_session.watch_head), against a real listening socket."""

from __future__ import annotations

import socket
import threading
import time

from medclipsam.runs.ray_session import watch_head


def test_the_head_is_lost_only_after_it_refuses_for_the_whole_wait():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    lost = threading.Event()
    thread = watch_head(f"127.0.0.1:{port}", lost.set, lost_after_s=1.0, period_s=0.1)
    time.sleep(0.6)
    assert not lost.is_set()  # it answers
    server.close()
    start = time.monotonic()
    assert lost.wait(10)
    assert time.monotonic() - start >= 0.9  # not before the wait is up
    thread.join(2)
    assert not thread.is_alive()  # once


def test_a_head_back_within_the_wait_is_not_lost():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    lost = threading.Event()
    watch_head(f"127.0.0.1:{port}", lost.set, lost_after_s=2.0, period_s=0.1)
    time.sleep(0.8)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(16)
    try:
        assert not lost.wait(2.5)  # back after 0.8 s of 2: the refusals start over
    finally:
        server.close()
