"""Text-driven zero-shot segmentation (MedCLIP-SAMv2), one case at a time.

read -> window every slice -> M2IB saliency -> coarse mask -> visual prompts -> SAM -> mask.
Slices without a salient target get an empty mask; a case with none at all is ``no_target``.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import storage
from .case_loop import Progress, record_failure, run_cases
from .images import MedicalImage, mask_extension, read_image, write_mask
from .manifest import STATUS_NO_TARGET, STATUS_OK, CaseRecord
from .models.biomedclip import ClipModel
from .models.sam_backends import PromptableSegmenter
from .prompted_run import SliceSpec, absolute_output, assemble_mask, model_inputs, prompt_record
from .prompts.from_saliency import coarse_mask, visual_prompts
from .prompts.types import SlicePrompts
from .saliency.m2ib import M2IBParams
from .saliency.maps import SaliencyMap, saliency_maps
from .segmentation import SegmentationParams, segment_images


@dataclass(frozen=True)
class TextSettings:
    prompts: tuple[str, ...]
    m2ib: M2IBParams = M2IBParams()
    geometry: str = "crop"
    saliency_batch_size: int = 4
    coarse_method: str = "kmeans"
    coarse_threshold: float = 0.5
    coarse_components: int = 1
    prompt_type: str = "box"
    n_points: int = 5
    n_negative: int = 0
    seed: int = 0
    save_intermediates: bool = False


def text_settings(config, prompts: list[str], save_intermediates: bool = False) -> TextSettings:
    """The text-driven settings of a task config (``config.TaskConfig``)."""
    s, c, v = config.saliency, config.coarse, config.visual_prompts
    return TextSettings(
        prompts=tuple(prompts),
        m2ib=M2IBParams(layer=s.layer, beta=s.beta, steps=s.steps, copies=s.copies, lr=s.lr, seed=s.seed),
        geometry=s.geometry, saliency_batch_size=s.batch_size, coarse_method=c.method,
        coarse_threshold=c.threshold, coarse_components=c.keep_components, prompt_type=v.type,
        n_points=v.n_points, n_negative=v.n_negative, seed=v.seed, save_intermediates=save_intermediates,
    )


@dataclass
class ZeroShotResult:
    masks: list[np.ndarray]
    saliency: list[SaliencyMap]
    coarse: list[np.ndarray]
    prompts: list[SlicePrompts]
    seconds: dict[str, float]


def zero_shot_images(
    clip: ClipModel, segmenter: PromptableSegmenter, images: list[np.ndarray], settings: TextSettings,
    params: SegmentationParams,
) -> ZeroShotResult:
    """Masks for ``H x W x 3`` uint8 images from the text prompts alone."""
    start = time.perf_counter()
    maps = saliency_maps(clip, images, list(settings.prompts), settings.m2ib, settings.geometry,
                         settings.saliency_batch_size)
    saliency_seconds = time.perf_counter() - start
    coarse, prompts = prompts_from_saliency(images, maps, settings)
    masks, seconds = segment_images(segmenter, images, prompts, params)
    return ZeroShotResult(masks, maps, coarse, prompts, {"saliency": saliency_seconds, **seconds})


def prompts_from_saliency(
    images: list[np.ndarray], maps: list[SaliencyMap], settings: TextSettings
) -> tuple[list[np.ndarray], list[SlicePrompts]]:
    """Coarse masks and SAM prompts from saliency maps (empty prompts where nothing stands out)."""
    coarse, prompts = [], []
    for image, saliency in zip(images, maps, strict=True):
        mask = np.zeros(image.shape[:2], dtype=bool)
        if not saliency.constant:
            mask = coarse_mask(saliency.values, settings.coarse_method, settings.coarse_threshold,
                               settings.coarse_components, settings.seed, image)
        coarse.append(mask)
        found = visual_prompts(mask, settings.prompt_type, settings.n_points, settings.n_negative, settings.seed)
        prompts.append(found if found is not None else SlicePrompts())
    return coarse, prompts


def _stack_maps(image: MedicalImage, maps: list[np.ndarray], axis: int) -> np.ndarray:
    return maps[0] if not image.is_volume else np.stack(maps, axis=axis)


def _save_intermediates(
    image: MedicalImage, result: ZeroShotResult, output: str, case_id: str, axis: int, prompts_json: str
) -> None:
    """saliency/<case>.npy (float32, image-shaped), coarse/<case>.png|.nii.gz, prompts/<case>.json."""
    buffer = io.BytesIO()
    np.save(buffer, _stack_maps(image, [m.values for m in result.saliency], axis).astype(np.float32))
    storage.write_bytes_atomic(storage.join(output, "saliency", f"{case_id}.npy"), buffer.getvalue())
    coarse = _stack_maps(image, result.coarse, axis)
    write_mask(coarse.astype(np.uint8) if image.is_volume else coarse, image,
               storage.join(output, "coarse", case_id + mask_extension(image)))
    storage.write_bytes_atomic(storage.join(output, "prompts", f"{case_id}.json"), prompts_json.encode())


def run_text_case(
    clip: ClipModel, segmenter: PromptableSegmenter, case_id: str, uri: str, output: str, spec: SliceSpec,
    settings: TextSettings, params: SegmentationParams,
) -> CaseRecord:
    record = CaseRecord(
        case_id=case_id, source_uri=uri, backend=segmenter.name, checkpoint=segmenter.checkpoint,
        checkpoint_sha256=segmenter.checkpoint_sha256, text_prompt=json.dumps(list(settings.prompts)),
        clip_model=clip.uri, clip_sha256=clip.sha256,
        parameters=json.dumps({"slicing": {"axis": spec.axis, "window": asdict(spec.window)},
                               "text": asdict(settings), "sam": asdict(params)}),
    )
    try:
        t0 = time.perf_counter()
        image = read_image(uri)
        record.seconds_read = time.perf_counter() - t0
        keys = list(range(image.array.shape[spec.axis])) if image.is_volume else [None]
        result = zero_shot_images(clip, segmenter, model_inputs(image, keys, spec), settings, params)
        record.seconds_saliency = result.seconds["saliency"]
        record.seconds_embed, record.seconds_decode = result.seconds["embed"], result.seconds["decode"]
        prompted = {k: p for k, p in zip(keys, result.prompts, strict=True) if not p.is_empty()}
        record.prompts = prompt_record(prompted)
        record.n_prompted_slices = record.n_target_slices = len(prompted)
        t1 = time.perf_counter()
        mask = assemble_mask(image, dict(zip(keys, result.masks, strict=True)), spec.axis)
        record.mask_uri = storage.join(output, "masks", case_id + mask_extension(image))
        write_mask(mask, image, record.mask_uri)
        if settings.save_intermediates:
            _save_intermediates(image, result, output, case_id, spec.axis, record.prompts)
        record.seconds_write = time.perf_counter() - t1
        record.status = STATUS_OK if prompted else STATUS_NO_TARGET
    except Exception as exc:  # one bad case must not stop the cohort; its error goes in the manifest
        record_failure(record, exc)
    return record


def run_text(
    clip: ClipModel, segmenter: PromptableSegmenter, cases: dict[str, str], output: str, spec: SliceSpec,
    settings: TextSettings, params: SegmentationParams, progress: Progress | None = None,
) -> list[CaseRecord]:
    """Segment every case from the text prompts; write masks, optional intermediates and the manifest."""
    output = absolute_output(output)

    def run_one(case_id: str, uri: str) -> CaseRecord:
        return run_text_case(clip, segmenter, case_id, uri, output, spec, settings, params)

    return run_cases(cases, run_one, output, progress)

