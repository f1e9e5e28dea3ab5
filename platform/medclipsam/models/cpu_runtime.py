"""SAM's networks on a faster CPU runtime: exported once per weights into the model cache, then run
by OpenVINO or ONNX Runtime in place of torch.

The image encoder is where a slice's time goes (LiteMedSAM's TinyViT: 75 GFLOP per 256 px image),
and torch's CPU kernels leave much of it on the table: on this project's 2-core machine one image
took 1.7 s in torch, 1.3 s in ONNX Runtime and 1.1 s in OpenVINO on one thread, and torch gains
little from a second thread where the other two nearly halve (docs/benchmarks.md). So ``sam.runtime:
auto`` runs the encoder by OpenVINO on the CPU (ONNX Runtime when OpenVINO is missing) and by torch
on CUDA. The mask decoder, about a tenth of a slice, took 0.113 s per box in torch and 0.074 s in
ONNX Runtime: beside any CPU runtime in fp32 it runs on ONNX Runtime, and beside OpenVINO in bf16 or
fp16 on OpenVINO in that precision, with a symbolic number of prompts and prompt tokens.

Safety and honesty: an export is checked against torch on seeded inputs before it is cached
(largest difference at most ``EXPORT_TOLERANCE`` of the output's scale), a cache entry is used only
when its SHA-256 matches the one recorded beside it, and a runtime that is missing or an export that
fails costs one warning line and falls back to torch: never a wrong mask.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import os
import tempfile
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import SAM_PRECISIONS, SAM_RUNTIMES
from ..errors import first_line
from ..storage.fetch import CACHE_DIR, sha256_of

log = logging.getLogger(__name__)

RUNTIMES, PRECISIONS = SAM_RUNTIMES, SAM_PRECISIONS
OPSET = 17
EXPORT_TOLERANCE = 1e-4  # largest |runtime - torch| on the check inputs, relative to max |torch| (at least 1)
_OPENVINO_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}

Encoder = Callable[[torch.Tensor], torch.Tensor]
Run = Callable[[Sequence[np.ndarray]], list[np.ndarray]]  # an export's inputs in, its outputs out
stats = {"exports": 0}  # exports this process has run (the tests count them: a cached export is not redone)


class ExportFailed(RuntimeError):
    """The network could not be exported, or its export disagrees with torch."""


@dataclass(frozen=True)
class Variant:
    """One way to export a network: its example inputs, names, symbolic axes, and the check its
    export must pass (given a function that runs the export, the largest difference from torch,
    or None when it disagrees or cannot run the check's inputs)."""

    label: str
    example: tuple[torch.Tensor, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    axes: dict[str, dict[int, str]] | None
    check: Callable[[Run], float | None]


@dataclass(frozen=True)
class Exported:
    path: Path
    variant: str  # the label of the variant that passed its check
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


# -- the encoder -----------------------------------------------------------------------------------
def fast_encoder(encoder: torch.nn.Module, runtime: str, key: str, input_size: int, device: str = "cpu",
                 threads: int | None = None, precision: str = "fp32") -> tuple[Encoder, str]:
    """``encoder`` on ``runtime`` (``key`` names its weights, e.g. backend and SHA-256), and the name of
    the runtime that will run it; torch itself when that is asked for, when the device is not the CPU,
    or (after one warning line) when the runtime is missing or the export fails."""
    chosen = _usable(resolve_runtime(runtime, device), device)
    if chosen == "torch":
        return encoder, "torch"
    threads = threads or torch.get_num_threads()
    try:
        exported = cached_export(encoder, f"{key}|encoder {input_size}", _encoder_variants(encoder, input_size))
        run = _session(chosen, exported.path, threads, precision)
        return RuntimeEncoder(run, exported.variant == "batch axis"), chosen
    except Exception as exc:  # an export or a runtime that fails must never cost a mask
        log.warning("SAM encoder: %s is not usable for %s (%s); using torch", chosen, key, first_line(exc))
        return encoder, "torch"


def _encoder_variants(encoder: torch.nn.Module, size: int) -> list[Variant]:
    # torch sees one image; the export a batch of it with its mirror image, so a batch axis that mixed
    # images would change the first one's output. LiteMedSAM's TinyViT takes the batch as a Python int
    # (``len(x)``), so its batch-axis export fails the check and the one-image export is kept.
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = [encoder(image).float().numpy()]

    def batch_check(run: Run) -> float | None:
        got = run([torch.cat([image, image.flip(-1)]).numpy()])
        return _difference([got[0][:1]], reference) if got and len(got[0]) == 2 else None

    def image_check(run: Run) -> float | None:
        return _difference(run([image.numpy()]), reference)

    names = ("image",), ("embedding",)
    return [Variant("batch axis", (image,), *names, {"image": {0: "batch"}, "embedding": {0: "batch"}}, batch_check),
            Variant("one image", (image,), *names, None, image_check)]


class RuntimeEncoder:
    """Called like the torch encoder: a ``B x 3 x T x T`` float tensor in, its embeddings out."""

    def __init__(self, run: Run, batch_axis: bool) -> None:
        self.run, self.batch_axis = run, batch_axis

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.detach().cpu().float().numpy())
        if self.batch_axis or len(x) == 1:
            return torch.from_numpy(self.run([x])[0])
        return torch.from_numpy(np.concatenate([self.run([x[i : i + 1]])[0] for i in range(len(x))]))


# -- the mask decoder ------------------------------------------------------------------------------
class _DecoderCore(torch.nn.Module):
    """The mask decoder with the dense positional encoding and the multimask choice fixed."""

    def __init__(self, decoder: torch.nn.Module, image_pe: torch.Tensor, multimask: bool) -> None:
        super().__init__()
        self.decoder, self.multimask = decoder, multimask
        self.register_buffer("image_pe", image_pe)

    def forward(self, features: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder(image_embeddings=features, image_pe=self.image_pe, sparse_prompt_embeddings=sparse,
                            dense_prompt_embeddings=dense, multimask_output=self.multimask)


Decoder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def decoder_runtime(encoder_runtime: str, precision: str) -> tuple[str, str] | None:
    """What runs the mask decoder beside an encoder on ``encoder_runtime`` in ``precision``: ONNX Runtime in
    fp32 (0.074 s per box against torch's 0.113 s, one thread), or OpenVINO in bf16 or fp16 beside an
    OpenVINO encoder in that precision (0.057 s against 0.098 s in fp32, both runtimes); None for torch."""
    if encoder_runtime == "torch":
        return None
    if encoder_runtime == "openvino" and precision != "fp32":
        return "openvino", precision
    return "onnxruntime", "fp32"  # ONNX Runtime runs fp32 on the CPU, whatever was asked of it


def fast_decoder(decoder: torch.nn.Module, image_pe: torch.Tensor, multimask: bool, key: str,
                 threads: int | None = None, runtime: str = "onnxruntime", precision: str = "fp32") -> Decoder | None:
    """The mask decoder on ``runtime`` (features, sparse and dense prompt embeddings in; low-resolution
    logits and IoU estimates out), or None (after one warning line) where it cannot run there."""
    if not _importable(runtime):
        return None
    try:
        core = _DecoderCore(decoder, image_pe.detach().clone(), multimask).eval()
        exported = cached_export(core, f"{key}|decoder multimask={multimask}", [_decoder_variant(core)])
        return RuntimeDecoder(_session(runtime, exported.path, threads or torch.get_num_threads(), precision))
    except Exception as exc:
        log.warning("SAM decoder: %s is not usable for %s (%s); using torch", runtime, key, first_line(exc))
        return None


def _decoder_variant(core: _DecoderCore) -> Variant:
    generator = torch.Generator().manual_seed(0)
    channels, height, width = core.image_pe.shape[1:]

    def inputs(prompts: int, tokens: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(1, channels, height, width, generator=generator),
                torch.randn(prompts, tokens, channels, generator=generator),
                torch.randn(prompts, channels, height, width, generator=generator))

    cases = [inputs(1, 2), inputs(3, 7)]  # a box alone; three boxes with five points each
    with torch.inference_mode():
        references = [[t.float().numpy() for t in core(*case)] for case in cases]

    def check(run: Run) -> float | None:
        diffs = [_difference(run([t.numpy() for t in case]), ref) for case, ref in zip(cases, references, strict=True)]
        return None if None in diffs else max(diffs)

    axes = {"sparse": {0: "prompts", 1: "tokens"}, "dense": {0: "prompts"}, "logits": {0: "prompts"},
            "iou": {0: "prompts"}}
    return Variant("prompt axes", cases[0], ("features", "sparse", "dense"), ("logits", "iou"), axes, check)


class RuntimeDecoder:
    def __init__(self, run: Run) -> None:
        self.run = run

    def __call__(self, features: torch.Tensor, sparse: torch.Tensor,
                 dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        arrays = [np.ascontiguousarray(t.detach().cpu().float().numpy()) for t in (features, sparse, dense)]
        logits, iou = self.run(arrays)
        return torch.from_numpy(logits), torch.from_numpy(iou)


# -- exports and their cache -----------------------------------------------------------------------
def export_folder() -> Path:
    return CACHE_DIR / "encoders"


def cached_export(module: torch.nn.Module, key: str, variants: Sequence[Variant]) -> Exported:
    """The ONNX export of ``module`` for ``key``, from the cache when its recorded hash matches, else
    exported now (the first variant whose check passes), and cached: written under a temporary name,
    then renamed, with its SHA-256 recorded beside it."""
    stem = hashlib.sha256(f"{key}|torch {torch.__version__}|opset {OPSET}".encode()).hexdigest()[:20]
    path = export_folder() / f"{stem}.onnx"
    found = _read_record(path)
    if found is not None:
        return found
    if path.exists():
        log.warning("SAM: cached export %s does not match its record; exporting again", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=".export-", suffix=".onnx")
    os.close(handle)
    try:
        for variant in variants:
            stats["exports"] += 1
            _export(module, variant, scratch)
            diff = variant.check(_checker(scratch))
            if diff is not None:
                break
        else:
            raise ExportFailed("its export does not reproduce torch's output")
        digest = sha256_of(scratch)
        os.replace(scratch, path)
    finally:
        Path(scratch).unlink(missing_ok=True)
    record = {"sha256": digest, "variant": variant.label, "max_abs_diff": diff, "key": key,
              "torch": torch.__version__, "opset": OPSET}
    _write_atomic(path.with_suffix(".json"), json.dumps(record, indent=1))
    log.info("SAM: exported %s to %s (%s, largest difference %.1e)", key.split("|")[-1], path, variant.label, diff)
    return Exported(path, variant.label, diff)


def _read_record(path: Path) -> Exported | None:
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        if path.is_file() and sha256_of(path) == meta["sha256"]:
            return Exported(path, str(meta["variant"]), float(meta["max_abs_diff"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _export(module: torch.nn.Module, variant: Variant, path: str) -> None:
    with warnings.catch_warnings():  # the tracer's warnings about Python values: the check decides
        warnings.simplefilter("ignore")
        torch.onnx.export(module, variant.example, path, opset_version=OPSET, dynamo=False,
                          input_names=list(variant.inputs), output_names=list(variant.outputs),
                          dynamic_axes=variant.axes)


def _checker(path: str) -> Run:
    """ONNX Runtime on an export, for its check; a failure to run becomes an empty answer."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # inputs the export cannot take are an answer here, not an error to print
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        try:
            return list(session.run(None, dict(zip(names, inputs, strict=True))))
        except Exception:
            return []

    return run


def _difference(got: list[np.ndarray], reference: list[np.ndarray]) -> float | None:
    """Largest difference of ``got`` from ``reference``, or None when a shape or a value disagrees."""
    if len(got) != len(reference) or any(g.shape != r.shape for g, r in zip(got, reference, strict=True)):
        return None
    diff = max(float(np.abs(g - r).max()) for g, r in zip(got, reference, strict=True))
    scale = max(1.0, *(float(np.abs(r).max()) for r in reference))
    return diff if diff <= EXPORT_TOLERANCE * scale else None


def _write_atomic(path: Path, text: str) -> None:
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=".record-")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(scratch, path)


# -- the runtimes ----------------------------------------------------------------------------------
def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _usable(runtime: str, device: str) -> str:
    """``runtime``, or torch (after one warning line) where it cannot run."""
    if runtime == "torch":
        return runtime
    if not str(device).startswith("cpu"):
        log.warning("SAM encoder: %s runs on the CPU only; device %s uses torch", runtime, device)
        return "torch"
    if not _importable(runtime):
        log.warning("SAM encoder: %s is not installed; using torch", runtime)
        return "torch"
    return runtime


def _session(runtime: str, path: Path, threads: int, precision: str) -> Run:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; choose from {', '.join(PRECISIONS)}")
    if runtime == "openvino":
        return _OpenVinoModel(_openvino_core().compile_model(str(path), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": _OPENVINO_HINT[precision]}))
    import onnxruntime

    if precision != "fp32":
        log.warning("SAM encoder: onnxruntime runs fp32 on the CPU (precision %s ignored)", precision)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda inputs: list(session.run(None, dict(zip(names, inputs, strict=True))))


# OpenVINO's compiled models must go before its Core and its CPU plugin: left to the interpreter's
# teardown, the order is arbitrary and a process can end with a crash after its work is done. One
# Core per process, and every compiled model released at exit, before the modules go.
_compiled: weakref.WeakSet[_OpenVinoModel] = weakref.WeakSet()


@functools.cache
def _openvino_core():  # openvino is imported only where it runs
    import openvino

    atexit.register(_release_openvino)
    return openvino.Core()


def _release_openvino() -> None:
    for model in list(_compiled):
        model.compiled = None
    _compiled.clear()
    _openvino_core.cache_clear()


class _OpenVinoModel:
    """A compiled OpenVINO model called like the other runtimes' sessions."""

    def __init__(self, compiled) -> None:
        self.compiled, self.outputs = compiled, range(len(compiled.outputs))
        _compiled.add(self)

    def __call__(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.compiled is None:
            raise RuntimeError("SAM encoder: the OpenVINO model was released at exit")
        result = self.compiled(list(inputs))
        return [np.asarray(result[i]) for i in self.outputs]
