"""A real ``mlflow server`` on 127.0.0.1 for the tests: started, waited for, stopped."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def running_mlflow_server(options: list[str], env: dict[str, str], log_path: Path,
                          cwd: Path | None = None) -> Iterator[str]:
    """``mlflow server OPTIONS`` on a free loopback port until its /health answers; yields its URI
    and stops it on exit. A server that dies or does not answer in 120 s fails with its log's tail."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *options, "--host", "127.0.0.1",
                                   "--port", str(port), "--workers", "1"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, cwd=cwd)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {log_path.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
