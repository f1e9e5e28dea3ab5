"""Putting a case's slice rows back together: one mask with the source geometry, one record.

Slices of a volume may reach different writer tasks in any order. Each slice is staged under
``<output>/.staging/<case_id>/`` (atomically); the writer that sees the last slice arrive
assembles the case. Writers that race to the last slice write identical files, so the outcome
is the same whoever wins. A case is complete when ``<output>/records/<case_id>.json`` exists; it
is written last, after the mask, so a killed run never leaves a record without its mask. The
single-process runner has every row of a case at once and calls ``finish_case`` directly.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from .. import storage
from ..domain.images import MedicalImage, mask_extension, read_mask, write_mask
from ..domain.mask_files import MaskOutput, write_case_masks
from ..domain.records import STATUS_ERROR, STATUS_NO_PROMPTS, STATUS_NO_TARGET, STATUS_OK, CaseRecord, write_record
from ..errors import StorageUnavailable
from ..eval.evaluation import score_mask
from ..eval.metrics import dice
from ..eval.overlays import overlay_png, overlay_slice, strip_slices
from ..ops.postprocess import clean_volume
from ..ops.slicing import assemble_mask, take_slice
from ..prompts.types import SlicePrompts
from ..storage.outputs import COARSE, OVERLAYS, PROMPTS, SALIENCY, STAGING, STRIPS, case_file
from . import flags
from .slices import ARRAY_FIELDS, SOURCE_TEXT, SliceRow


@dataclass(frozen=True)
class AssemblySettings:
    output: str
    source: str  # rows.SOURCE_TEXT, SOURCE_LABELS or SOURCE_FILES
    parameters: str = "{}"  # JSON of every setting, recorded per case
    tolerance: float = 2.0  # NSD tolerance: pixels (2D) or millimetres (volumes)
    save_prompts: bool = False  # also write prompts/<case_id>.json
    min_box_fill: float = 0.05  # a mask filling less of its prompt box is warned of (pipeline.flags)
    strip_slices: int = 8  # slices of a drawn volume in its strip
    masks: MaskOutput = field(default_factory=MaskOutput)  # the formats each mask is written in
    clean_3d: tuple[int, bool] | None = None  # a volume's mask: 3D components kept, holes filled (propagation)


def prompt_record(prompts: dict[int | None, SlicePrompts]) -> str:
    """JSON of the prompts per slice ("" for a 2D image), as recorded in the manifest."""
    ordered = sorted(prompts.items(), key=lambda item: -1 if item[0] is None else item[0])
    return json.dumps({("" if k is None else str(k)): p.to_record() for k, p in ordered})


def _packed(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask.astype(bool))


def _unpacked(bits: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


def _stage_bytes(row: SliceRow) -> bytes:
    """A slice as a compressed ``.npz``: bit-packed masks, a float16 map, the other fields as JSON."""
    arrays = {"mask": _packed(row.mask), "mask_shape": np.asarray(row.mask.shape)}
    if row.image.size:
        arrays["image"] = row.image
    if row.saliency.size:
        arrays["saliency"] = row.saliency.astype(np.float16)
    for name in ("coarse", "oracle_mask"):
        if getattr(row, name).size:
            arrays[name] = _packed(getattr(row, name))
    meta = {k: v for k, v in row.to_columns().items() if k not in ARRAY_FIELDS}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta=np.asarray(json.dumps(meta)), **arrays)
    return buffer.getvalue()


def _unstage(data: bytes) -> SliceRow:
    with np.load(io.BytesIO(data)) as npz:
        columns = json.loads(str(npz["meta"]))
        shape = tuple(int(v) for v in npz["mask_shape"])
        columns["mask"] = _unpacked(npz["mask"], shape)
        if "image" in npz:
            columns["image"] = npz["image"]
        if "saliency" in npz:
            columns["saliency"] = npz["saliency"].astype(np.float32)
        for name in ("coarse", "oracle_mask"):
            if name in npz:
                columns[name] = _unpacked(npz[name], shape)
    return SliceRow.from_columns(columns)


def collect_slice(row: SliceRow, settings: AssemblySettings) -> CaseRecord | None:
    """Stage one slice row; return the case's record once its last slice is in, else None."""
    if row.n_slices == 1:
        return finish_case([row], settings)
    folder = case_file(settings.output, STAGING, row.case_id, "")
    storage.write_bytes_atomic(storage.join(folder, f"{row.slice:06d}.npz"), _stage_bytes(row))
    staged = [u for u in storage.list_files(folder) if not storage.basename(u).startswith(".")]
    if len(staged) < row.n_slices:
        return None
    rows = [_unstage(data) for data in storage.read_many(staged).values()]
    return finish_case(sorted(rows, key=lambda r: r.slice), settings)


def case_mask(rows: list[SliceRow], name: str = "mask") -> np.ndarray:
    """One field of a case's rows (``mask``, ``coarse``, ``oracle_mask``) assembled into the source's
    shape and orientation; a row without that plane counts as empty."""
    geometry = rows[0].geometry

    def plane(row: SliceRow) -> np.ndarray:
        value = getattr(row, name)
        return value if value.size else np.zeros(row.mask.shape, bool)

    return assemble_mask(geometry.reference_image(), {r.key: plane(r) for r in rows}, geometry.axis)


def _new_record(rows: list[SliceRow], settings: AssemblySettings) -> CaseRecord:
    first = rows[0]
    return CaseRecord(
        case_id=first.case_id, source_uri=first.uri, gt_uri=first.gt_uri, text_prompt=first.text_prompt,
        prompt_source=settings.source, parameters=settings.parameters, n_slices=first.n_slices,
        backend=first.backend, checkpoint=first.checkpoint, checkpoint_sha256=first.checkpoint_sha256,
        clip_model=first.clip_model, clip_sha256=first.clip_sha256,
        seconds_read=sum(r.seconds_read for r in rows), seconds_saliency=sum(r.seconds_saliency for r in rows),
        seconds_embed=sum(r.seconds_embed for r in rows), seconds_decode=sum(r.seconds_decode for r in rows),
        n_sam_slices=sum(r.sam_ran for r in rows), n_m2ib_slices=sum(r.m2ib_ran for r in rows),
        node=",".join(sorted({r.node for r in rows if r.node})),
    )


def finish_case(rows: list[SliceRow], settings: AssemblySettings) -> CaseRecord:
    """Write the case's mask (and saliency, overlay) and its record; failures become an error record."""
    start = time.perf_counter()
    record = _new_record(rows, settings)
    failed = [r for r in rows if r.error]
    if failed:
        where = f"slice {failed[0].slice}: " if len(rows) > 1 else ""
        record.status, record.error = STATUS_ERROR, where + failed[0].error
        write_record(record, settings.output)
        return record
    try:
        _write_outputs(rows, record, settings)
    except Exception as exc:  # e.g. the output store refused the write
        record.status, record.error = STATUS_ERROR, f"writing outputs: {exc}"
    record.seconds_write = time.perf_counter() - start
    write_record(record, settings.output)
    return record


def _write_outputs(rows: list[SliceRow], record: CaseRecord, settings: AssemblySettings) -> None:
    image = rows[0].geometry.reference_image()
    axis = rows[0].geometry.axis
    prompted = {r.key: r.prompts for r in rows if r.prompts is not None}
    record.prompts = prompt_record(prompted)
    record.n_prompted_slices = len(prompted)
    # text mode: the slices whose map gave prompts (propagated: the sampled ones; only the keys keep them)
    seen = sum(not math.isnan(r.presence) for r in rows) or len(prompted)
    record.n_target_slices = seen if settings.source == SOURCE_TEXT else 0
    masks = {r.key: r.mask for r in rows}
    mask = assemble_mask(image, masks, axis)
    if settings.clean_3d is not None and image.is_volume:
        mask = clean_volume(mask > 0, *settings.clean_3d).astype(mask.dtype)
        masks = {k: take_slice(mask, k, axis) > 0 for k in masks}
    warnings = flags.case_warnings(prompted, masks, record.backend, settings.min_box_fill)
    written = write_case_masks(mask, image, record.source_uri, settings.output, record.case_id, settings.masks)
    record.mask_uri, record.mask_formats = written.mask_uri, ",".join(written.formats)
    record.warnings = flags.SEPARATOR.join([*warnings, *written.warnings])
    _write_intermediates(rows, record, image, axis, settings)
    truth = None
    if record.gt_uri:
        try:
            truth = read_mask(record.gt_uri, like=image)
            scores = score_mask(mask, record.mask_uri, truth, settings.tolerance)
            record.dsc, record.nsd, record.hd95 = scores.dsc, scores.nsd, scores.hd95
            _attribute(rows, record, truth)
        except StorageUnavailable:  # not the truth's fault: the case fails, and a resume scores it
            raise
        except Exception as exc:  # the mask stands; only its scores are missing
            truth, record.error = None, f"ground truth: {exc}"
    pictures = {r.key: r.image for r in rows if r.image.size}
    if pictures:
        _write_overlay(record, masks, prompted, pictures, truth, axis, settings)
    record.status = STATUS_OK if prompted else (STATUS_NO_TARGET if settings.source == SOURCE_TEXT
                                                else STATUS_NO_PROMPTS)


def _attribute(rows: list[SliceRow], record: CaseRecord, truth: MedicalImage) -> None:
    """Stage attribution: the DSC of the coarse mask and of SAM prompted with the truth's boxes
    (the rows carry ``oracle_mask`` only when attribution was asked for)."""
    if not any(r.oracle_mask.size for r in rows):
        return
    for name, score in (("coarse", "dsc_coarse"), ("oracle_mask", "dsc_oracle")):
        setattr(record, score, dice(case_mask(rows, name) > 0, truth.array > 0))


def _stacked(image: MedicalImage, planes: list[np.ndarray], axis: int) -> np.ndarray:
    return np.stack(planes, axis=axis) if image.is_volume else planes[0]


def _write_intermediates(rows: list[SliceRow], record: CaseRecord, image: MedicalImage, axis: int,
                         settings: AssemblySettings) -> None:
    """saliency/<case>.npy (float32, image-shaped), coarse/<case>.png|.nii.gz, prompts/<case>.json."""
    if any(r.saliency.size for r in rows):
        maps = [r.saliency if r.saliency.size else np.zeros(r.mask.shape, np.float32) for r in rows]
        buffer = io.BytesIO()
        np.save(buffer, _stacked(image, maps, axis).astype(np.float32))
        storage.write_bytes_atomic(case_file(settings.output, SALIENCY, record.case_id, ".npy"), buffer.getvalue())
    if any(r.coarse.size for r in rows):
        coarse = _stacked(image, [r.coarse if r.coarse.size else np.zeros(r.mask.shape, bool) for r in rows], axis)
        write_mask(coarse.astype(np.uint8) if image.is_volume else coarse, image,
                   case_file(settings.output, COARSE, record.case_id, mask_extension(image)))
    if settings.save_prompts:
        storage.write_bytes_atomic(case_file(settings.output, PROMPTS, record.case_id, ".json"),
                                   record.prompts.encode())


def _write_overlay(record: CaseRecord, masks: dict, prompts: dict, pictures: dict, truth, axis: int,
                   settings: AssemblySettings) -> None:
    """The overlay of the case's fullest slice; for a volume, also the strip of its prompted slices (of
    its segmented ones when propagated)."""
    if None in masks:  # a 2D image
        truth_slices = {None: truth.array} if truth is not None else None
        key = None
    else:
        truth_slices = ({k: take_slice(truth.array, k, axis) for k in masks} if truth is not None else None)
        key = overlay_slice(masks, truth_slices)

    def picture(k: int | None) -> bytes:
        return overlay_png(pictures[k], masks[k], truth_slices[k] if truth_slices else None, prompts.get(k))

    if key in pictures:
        storage.write_bytes_atomic(case_file(settings.output, OVERLAYS, record.case_id, ".png"), picture(key))
    if key is None:
        return
    shown = set(prompts)
    if settings.clean_3d is not None:  # propagated: the strip follows the chain, not only its key slices
        shown |= {k for k in masks if masks[k].any()}
    for k in strip_slices([k for k in shown if k in pictures], key, settings.strip_slices):
        if k in pictures:
            storage.write_bytes_atomic(case_file(settings.output, STRIPS, record.case_id, f".slice{k:04d}.png"),
                                       picture(k))
