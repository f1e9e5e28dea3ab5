"""The SAM image encoder on a faster CPU runtime: exported once per weights into the model cache,
then run by OpenVINO or ONNX Runtime in place of torch.

The encoder is where a slice's time goes (LiteMedSAM's TinyViT: 75 GFLOP per 256 px image), and
torch's CPU kernels leave much of it on the table: on this project's 2-core machine one image took
1.7 s in torch, 1.3 s in ONNX Runtime and 1.1 s in OpenVINO on one thread, and torch gains little
from a second thread where the other two nearly halve (docs/benchmarks.md). So ``sam.runtime:
auto`` runs the encoder by OpenVINO on the CPU (ONNX Runtime when OpenVINO is missing) and by
torch on CUDA.

Safety and honesty: an export is checked against torch on a seeded input before it is cached
(largest difference at most ``EXPORT_TOLERANCE``), a cache entry is used only when its SHA-256
matches the one recorded beside it, and a runtime that is missing or an export that fails costs
one warning line and falls back to torch: never a wrong mask.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import first_line
from ..storage.fetch import CACHE_DIR, sha256_of

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "fp16")
OPSET = 17
EXPORT_TOLERANCE = 1e-4  # largest |runtime - torch| on the check input, relative to max |torch| (at least 1)
_OPENVINO_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}

Encoder = Callable[[torch.Tensor], torch.Tensor]
stats = {"exports": 0}  # exports this process has run (the tests count them: a cached export is not redone)


class ExportFailed(RuntimeError):
    """The encoder could not be exported, or its export disagrees with torch."""


@dataclass(frozen=True)
class ExportedEncoder:
    """An encoder's ONNX file in the cache and whether it takes a batch axis."""

    path: Path
    dynamic_batch: bool
    max_abs_diff: float


def resolve_runtime(runtime: str, device: str) -> str:
    """The runtime ``auto`` stands for on ``device``: torch on CUDA, else the fastest one installed."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown encoder runtime '{runtime}'; choose from {', '.join(RUNTIMES)}")
    if runtime != "auto":
        return runtime
    if not str(device).startswith("cpu"):
        return "torch"
    for name in ("openvino", "onnxruntime"):
        if _importable(name):
            return name
    return "torch"


def fast_encoder(encoder: torch.nn.Module, runtime: str, key: str, input_size: int, device: str = "cpu",
                 threads: int | None = None, precision: str = "fp32") -> tuple[Encoder, str]:
    """``encoder`` on ``runtime`` (``key`` names its weights, e.g. backend and SHA-256), and the name of
    the runtime that will run it; torch itself when that is asked for, when the device is not the CPU,
    or (after one warning line) when the runtime is missing or the export fails."""
    chosen = resolve_runtime(runtime, device)
    if chosen == "torch":
        return encoder, "torch"
    if not str(device).startswith("cpu"):
        log.warning("SAM encoder: %s runs on the CPU only; device %s uses torch", chosen, device)
        return encoder, "torch"
    if not _importable(chosen):
        log.warning("SAM encoder: %s is not installed; using torch", chosen)
        return encoder, "torch"
    threads = threads or torch.get_num_threads()
    try:
        exported = cached_export(encoder, key, input_size)
        return _session(chosen, exported, threads, precision), chosen
    except Exception as exc:  # an export or a runtime that fails must never cost a mask
        log.warning("SAM encoder: %s is not usable for %s (%s); using torch", chosen, key, first_line(exc))
        return encoder, "torch"


# -- the export and its cache ----------------------------------------------------------------
def export_folder() -> Path:
    return CACHE_DIR / "encoders"


def cached_export(encoder: torch.nn.Module, key: str, input_size: int) -> ExportedEncoder:
    """The ONNX export of ``encoder`` for ``key``, from the cache when its recorded hash matches, else
    exported now, checked against torch and cached (written under a temporary name, then renamed)."""
    stem = hashlib.sha256(f"{key}|{input_size}|torch {torch.__version__}|opset {OPSET}".encode()).hexdigest()[:20]
    path = export_folder() / f"{stem}.onnx"
    found = _read_record(path)
    if found is not None:
        return found
    if path.exists():
        log.warning("SAM encoder: cached export %s does not match its record; exporting again", path)
    return _export_and_record(encoder, path, input_size)


def _read_record(path: Path) -> ExportedEncoder | None:
    record = path.with_suffix(".json")
    try:
        meta = json.loads(record.read_text())
        if path.is_file() and sha256_of(path) == meta["sha256"]:
            return ExportedEncoder(path, bool(meta["dynamic_batch"]), float(meta["max_abs_diff"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _export_and_record(encoder: torch.nn.Module, path: Path, input_size: int) -> ExportedEncoder:
    path.parent.mkdir(parents=True, exist_ok=True)
    # One image for torch (the reference) and a batch of it with its mirror image for the export: a batch
    # axis that mixed images would change the first one's output.
    image = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    probe = torch.cat([image, image.flip(-1)])
    with torch.inference_mode():
        reference = encoder(image).float().numpy()
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=".export-", suffix=".onnx")
    os.close(handle)
    try:
        stats["exports"] += 1
        # A batch axis where the network keeps the batch symbolic; LiteMedSAM's TinyViT takes it as a
        # Python int (``len(x)``), so its export is checked at batch 2 and, failing that, made for one image.
        dynamic = _export(encoder, image, scratch, dynamic=True)
        diff = _check(scratch, probe, reference)
        if diff is None:
            dynamic = _export(encoder, image, scratch, dynamic=False)
            diff = _check(scratch, image, reference)
        if diff is None:
            raise ExportFailed("its export does not reproduce torch's output")
        digest = sha256_of(scratch)
        os.replace(scratch, path)
    finally:
        Path(scratch).unlink(missing_ok=True)
    record = {"sha256": digest, "dynamic_batch": dynamic, "max_abs_diff": diff, "torch": torch.__version__,
              "opset": OPSET}
    _write_atomic(path.with_suffix(".json"), json.dumps(record, indent=1))
    log.info("SAM encoder exported to %s (batch axis: %s, largest difference %.1e)", path, dynamic, diff)
    return ExportedEncoder(path, dynamic, diff)


def _export(encoder: torch.nn.Module, example: torch.Tensor, path: str, dynamic: bool) -> bool:
    axes = {"image": {0: "batch"}, "embedding": {0: "batch"}} if dynamic else None
    import warnings

    with warnings.catch_warnings():  # the tracer's warnings about Python values are checked by _check
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (example,), path, opset_version=OPSET, dynamo=False, input_names=["image"],
                          output_names=["embedding"], dynamic_axes=axes)
    return dynamic


def _check(path: str, probe: torch.Tensor, reference: np.ndarray) -> float | None:
    """Largest difference between ONNX Runtime on the export and torch, or None when they disagree."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # a batch the export cannot take is an answer here, not an error to print
    try:
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": probe.numpy()})[0]
    except Exception:  # a batch the export cannot take
        return None
    if got.shape[1:] != reference.shape[1:] or len(got) != len(probe):
        return None
    got = got[:1]  # the first image's output, against torch's
    diff = float(np.abs(got - reference).max())
    return diff if diff <= EXPORT_TOLERANCE * max(1.0, float(np.abs(reference).max())) else None


def _write_atomic(path: Path, text: str) -> None:
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=".record-")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(scratch, path)


# -- the runtimes ----------------------------------------------------------------------------
def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _session(runtime: str, exported: ExportedEncoder, threads: int, precision: str) -> Encoder:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; choose from {', '.join(PRECISIONS)}")
    if runtime == "openvino":
        import openvino

        compiled = openvino.Core().compile_model(str(exported.path), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": _OPENVINO_HINT[precision]})
        run_batch: Callable[[np.ndarray], np.ndarray] = lambda x: compiled(x)[0]  # noqa: E731
    else:
        import onnxruntime

        if precision != "fp32":
            log.warning("SAM encoder: onnxruntime runs fp32 on the CPU (precision %s ignored)", precision)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(exported.path), options, providers=["CPUExecutionProvider"])
        run_batch = lambda x: session.run(None, {"image": x})[0]  # noqa: E731
    return RuntimeEncoder(run_batch, exported.dynamic_batch)


class RuntimeEncoder:
    """Called like the torch encoder: a ``B x 3 x T x T`` float tensor in, its embeddings out."""

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], dynamic_batch: bool) -> None:
        self.run_batch = run_batch
        self.dynamic_batch = dynamic_batch

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().cpu().float().numpy())
        if self.dynamic_batch or len(x) == 1:
            return torch.from_numpy(np.asarray(self.run_batch(x)))
        return torch.from_numpy(np.concatenate([np.asarray(self.run_batch(x[i : i + 1])) for i in range(len(x))]))
