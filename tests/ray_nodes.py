"""Ray nodes started the way a user starts a cluster's machines: ``ray start --block`` processes on
loopback, each in a session of its own, so that stopping (or killing) one ends its node."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_node(command: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """A ``ray start --block`` process; ``--block`` ties the node's processes to it, so stopping it stops them."""
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_node(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)


def listed_nodes(address: str, env: dict) -> list[dict]:
    """``ray list nodes`` of the dashboard at ``address`` ([] while it does not answer, or answers
    "No resource in the cluster" before the head's raylet has registered)."""
    listed = subprocess.run([RAY, "list", "nodes", "--address", address, "--format", "json"], env=env,
                            capture_output=True, text=True, check=False)
    try:
        return json.loads(listed.stdout) if listed.returncode == 0 else []
    except json.JSONDecodeError:
        return []
