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
import time
from dataclasses import dataclass

import numpy as np

from .. import storage
from ..domain.images import MedicalImage, mask_extension, read_mask, write_mask
from ..domain.records import STATUS_ERROR, STATUS_NO_PROMPTS, STATUS_NO_TARGET, STATUS_OK, CaseRecord, write_record
from ..errors import StorageUnavailable
from ..eval.evaluation import score_mask
from ..eval.metrics import dice
from ..eval.overlays import overlay_png, overlay_slice
from ..ops.slicing import assemble_mask, take_slice
from ..prompts.types import SlicePrompts
from ..storage.outputs import COARSE, MASKS, OVERLAYS, PROMPTS, SALIENCY, STAGING, case_file
from .slices import NO_IMAGE, NO_MAP, NO_MASK, SOURCE_TEXT, Row, reference_image

ARRAY_COLUMNS = ("image", "saliency", "coarse", "mask", "oracle_mask")


@dataclass(frozen=True)
class AssemblySettings:
    output: str
    source: str  # rows.SOURCE_TEXT, SOURCE_LABELS or SOURCE_FILES
    parameters: str = "{}"  # JSON of every setting, recorded per case
    tolerance: float = 2.0  # NSD tolerance: pixels (2D) or millimetres (volumes)
    save_prompts: bool = False  # also write prompts/<case_id>.json


def prompt_record(prompts: dict[int | None, SlicePrompts]) -> str:
    """JSON of the prompts per slice ("" for a 2D image), as recorded in the manifest."""
    ordered = sorted(prompts.items(), key=lambda item: -1 if item[0] is None else item[0])
    return json.dumps({("" if k is None else str(k)): p.to_record() for k, p in ordered})


def _stage_bytes(row: Row) -> bytes:
    arrays = {"mask": np.packbits(row["mask"].astype(bool)), "mask_shape": np.asarray(row["mask"].shape)}
    if row["image"].size:
        arrays["image"] = row["image"]
    if row.get("saliency") is not None and row["saliency"].size:
        arrays["saliency"] = row["saliency"].astype(np.float16)
    for column in ("coarse", "oracle_mask"):
        if row.get(column) is not None and row[column].size:
            arrays[column] = np.packbits(row[column].astype(bool))
    meta = {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items() if k not in ARRAY_COLUMNS}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta=np.asarray(json.dumps(meta)), **arrays)
    return buffer.getvalue()


def _unstage(data: bytes) -> Row:
    with np.load(io.BytesIO(data)) as npz:
        row = json.loads(str(npz["meta"]))
        shape = tuple(int(v) for v in npz["mask_shape"])
        row["mask"] = np.unpackbits(npz["mask"], count=int(np.prod(shape))).reshape(shape).astype(bool)
        row["image"] = npz["image"] if "image" in npz else NO_IMAGE
        row["saliency"] = npz["saliency"].astype(np.float32) if "saliency" in npz else NO_MAP
        for column in ("coarse", "oracle_mask"):
            row[column] = (np.unpackbits(npz[column], count=int(np.prod(shape))).reshape(shape).astype(bool)
                           if column in npz else NO_MASK)
    return row


def collect_slice(row: Row, settings: AssemblySettings) -> CaseRecord | None:
    """Stage one slice row; return the case's record once its last slice is in, else None."""
    n_slices = int(row["n_slices"])
    if n_slices == 1:
        return finish_case([row], settings)
    folder = case_file(settings.output, STAGING, str(row["case_id"]), "")
    storage.write_bytes_atomic(storage.join(folder, f"{int(row['slice']):06d}.npz"), _stage_bytes(row))
    staged = [u for u in storage.list_files(folder) if not storage.basename(u).startswith(".")]
    if len(staged) < n_slices:
        return None
    rows = [_unstage(data) for data in storage.read_many(staged).values()]
    return finish_case(sorted(rows, key=lambda r: r["slice"]), settings)


def _key(row: Row) -> int | None:
    return None if int(row["slice"]) < 0 else int(row["slice"])


def _new_record(rows: list[Row], settings: AssemblySettings) -> CaseRecord:
    first = rows[0]
    return CaseRecord(
        case_id=str(first["case_id"]), source_uri=str(first["uri"]), gt_uri=str(first["gt_uri"]),
        text_prompt=str(first["prompt"]), prompt_source=settings.source, parameters=settings.parameters,
        n_slices=int(first["n_slices"]), backend=str(first.get("backend", "")),
        checkpoint=str(first.get("checkpoint", "")), checkpoint_sha256=str(first.get("checkpoint_sha256", "")),
        clip_model=str(first.get("clip_model", "")), clip_sha256=str(first.get("clip_sha256", "")),
        seconds_read=sum(float(r["seconds_read"]) for r in rows),
        seconds_saliency=sum(float(r.get("seconds_saliency", 0.0)) for r in rows),
        seconds_embed=sum(float(r.get("seconds_embed", 0.0)) for r in rows),
        seconds_decode=sum(float(r.get("seconds_decode", 0.0)) for r in rows),
    )


def finish_case(rows: list[Row], settings: AssemblySettings) -> CaseRecord:
    """Write the case's mask (and saliency, overlay) and its record; failures become an error record."""
    start = time.perf_counter()
    record = _new_record(rows, settings)
    failed = [r for r in rows if r["error"]]
    if failed:
        where = f"slice {failed[0]['slice']}: " if len(rows) > 1 else ""
        record.status, record.error = STATUS_ERROR, where + str(failed[0]["error"])
        write_record(record, settings.output)
        return record
    try:
        _write_outputs(rows, record, settings)
    except Exception as exc:  # e.g. the output store refused the write
        record.status, record.error = STATUS_ERROR, f"writing outputs: {exc}"
    record.seconds_write = time.perf_counter() - start
    write_record(record, settings.output)
    return record


def _write_outputs(rows: list[Row], record: CaseRecord, settings: AssemblySettings) -> None:
    geometry = json.loads(rows[0]["geometry"])
    image = reference_image(rows[0]["geometry"])
    axis = int(geometry["axis"])
    prompted = {_key(r): SlicePrompts.from_record(json.loads(r["prompts"])) for r in rows if r["prompts"]}
    record.prompts = prompt_record(prompted)
    record.n_prompted_slices = len(prompted)
    record.n_target_slices = len(prompted) if settings.source == SOURCE_TEXT else 0
    masks = {_key(r): r["mask"] for r in rows}
    mask = assemble_mask(image, masks, axis)
    record.mask_uri = case_file(settings.output, MASKS, record.case_id, mask_extension(image))
    write_mask(mask, image, record.mask_uri)
    _write_intermediates(rows, record, image, axis, settings)
    truth = None
    if record.gt_uri:
        try:
            truth = read_mask(record.gt_uri)
            scores = score_mask(mask, record.mask_uri, truth, settings.tolerance)
            record.dsc, record.nsd, record.hd95 = scores.dsc, scores.nsd, scores.hd95
            _attribute(rows, record, image, axis, truth)
        except StorageUnavailable:  # not the truth's fault: the case fails, and a resume scores it
            raise
        except Exception as exc:  # the mask stands; only its scores are missing
            truth, record.error = None, f"ground truth: {exc}"
    pictures = {_key(r): r["image"] for r in rows if r["image"].size}
    if pictures:
        _write_overlay(record, masks, pictures, truth, axis, settings.output)
    record.status = STATUS_OK if prompted else (STATUS_NO_TARGET if settings.source == SOURCE_TEXT
                                                else STATUS_NO_PROMPTS)


def _attribute(rows: list[Row], record: CaseRecord, image: MedicalImage, axis: int, truth: MedicalImage) -> None:
    """Stage attribution: the DSC of the coarse mask and of SAM prompted with the truth's boxes
    (the rows carry ``oracle_mask`` only when attribution was asked for)."""
    if not any(r.get("oracle_mask") is not None and r["oracle_mask"].size for r in rows):
        return
    def plane(row: Row, column: str) -> np.ndarray:
        value = row.get(column)
        return value if value is not None and value.size else np.zeros(row["mask"].shape, bool)

    for column, field in (("coarse", "dsc_coarse"), ("oracle_mask", "dsc_oracle")):
        assembled = assemble_mask(image, {_key(r): plane(r, column) for r in rows}, axis)
        setattr(record, field, dice(assembled > 0, truth.array > 0))


def _stacked(image: MedicalImage, planes: list[np.ndarray], axis: int) -> np.ndarray:
    return np.stack(planes, axis=axis) if image.is_volume else planes[0]


def _write_intermediates(rows: list[Row], record: CaseRecord, image: MedicalImage, axis: int,
                         settings: AssemblySettings) -> None:
    """saliency/<case>.npy (float32, image-shaped), coarse/<case>.png|.nii.gz, prompts/<case>.json."""
    if any(r.get("saliency") is not None and r["saliency"].size for r in rows):
        maps = [r["saliency"] if r["saliency"].size else np.zeros(r["mask"].shape, np.float32) for r in rows]
        buffer = io.BytesIO()
        np.save(buffer, _stacked(image, maps, axis).astype(np.float32))
        storage.write_bytes_atomic(case_file(settings.output, SALIENCY, record.case_id, ".npy"), buffer.getvalue())
    if any(r.get("coarse") is not None and r["coarse"].size for r in rows):
        coarse = _stacked(image, [r["coarse"] if r["coarse"].size else np.zeros(r["mask"].shape, bool) for r in rows],
                          axis)
        write_mask(coarse.astype(np.uint8) if image.is_volume else coarse, image,
                   case_file(settings.output, COARSE, record.case_id, mask_extension(image)))
    if settings.save_prompts:
        storage.write_bytes_atomic(case_file(settings.output, PROMPTS, record.case_id, ".json"),
                                   record.prompts.encode())


def _write_overlay(record: CaseRecord, masks: dict, pictures: dict, truth, axis: int, output: str) -> None:
    if None in masks:  # a 2D image
        truth_slices = {None: truth.array} if truth is not None else None
        key = None
    else:
        truth_slices = ({k: take_slice(truth.array, k, axis) for k in masks} if truth is not None else None)
        key = overlay_slice(masks, truth_slices)
    if key not in pictures:
        return
    png = overlay_png(pictures[key], masks[key], truth_slices[key] if truth_slices else None)
    storage.write_bytes_atomic(case_file(output, OVERLAYS, record.case_id, ".png"), png)
