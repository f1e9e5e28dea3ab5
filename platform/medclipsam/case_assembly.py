"""Putting a case's slice rows back together: one mask with the source geometry, one record.

Slices of a volume may reach different writer tasks in any order. Each slice is staged under
``<output>/.staging/<case_id>/`` (atomically); the writer that sees the last slice arrive
assembles the case. Writers that race to the last slice write identical files, so the outcome
is the same whoever wins. A case is complete when ``<output>/records/<case_id>.json`` exists; it
is written last, after the mask, so a killed run never leaves a record without its mask.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import storage
from .evaluation import score_mask
from .images import mask_extension, read_mask, write_mask
from .manifest import STATUS_ERROR, STATUS_NO_PROMPTS, STATUS_NO_TARGET, STATUS_OK, CaseRecord, record_from_dict
from .overlays import overlay_png, overlay_slice
from .prompted_run import assemble_mask, prompt_record
from .prompts.types import SlicePrompts
from .slice_rows import SOURCE_TEXT, Row, reference_image
from .slicing import take_slice

MASKS, RECORDS, STAGING, OVERLAYS, SALIENCY = "masks", "records", ".staging", "overlays", "saliency"
ARRAY_COLUMNS = ("image", "saliency", "mask")


@dataclass(frozen=True)
class AssemblySettings:
    output: str
    source: str  # slice_rows.SOURCE_TEXT or SOURCE_LABELS
    parameters: str = "{}"  # JSON of every setting, recorded per case
    tolerance: float = 2.0  # NSD tolerance: pixels (2D) or millimetres (volumes)


def record_uri(output: str, case_id: str) -> str:
    return storage.join(output, RECORDS, f"{case_id}.json")


def write_record(record: CaseRecord, output: str) -> None:
    storage.write_bytes_atomic(record_uri(output, record.case_id), json.dumps(asdict(record)).encode())


def read_records(output: str) -> dict[str, CaseRecord]:
    """Every case record already written under ``output`` (an empty dict for a new output)."""
    folder = storage.join(output, RECORDS)
    if not storage.exists(folder):
        return {}
    uris = [u for u in storage.list_files(folder) if u.endswith(".json") and not storage.basename(u).startswith(".")]
    records = {}
    for data in storage.read_many(uris).values():
        record = record_from_dict(json.loads(data))
        records[record.case_id] = record
    return records


def _stage_bytes(row: Row) -> bytes:
    arrays = {"mask": np.packbits(row["mask"].astype(bool)), "mask_shape": np.asarray(row["mask"].shape)}
    if row["image"].size:
        arrays["image"] = row["image"]
    if row.get("saliency") is not None and row["saliency"].size:
        arrays["saliency"] = row["saliency"].astype(np.float16)
    meta = {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items() if k not in ARRAY_COLUMNS}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta=np.asarray(json.dumps(meta)), **arrays)
    return buffer.getvalue()


def _unstage(data: bytes) -> Row:
    with np.load(io.BytesIO(data)) as npz:
        row = json.loads(str(npz["meta"]))
        shape = tuple(int(v) for v in npz["mask_shape"])
        row["mask"] = np.unpackbits(npz["mask"], count=int(np.prod(shape))).reshape(shape).astype(bool)
        row["image"] = npz["image"] if "image" in npz else np.zeros((0, 0, 3), np.uint8)
        row["saliency"] = npz["saliency"].astype(np.float32) if "saliency" in npz else np.zeros((0, 0), np.float32)
    return row


def collect_slice(row: Row, settings: AssemblySettings) -> CaseRecord | None:
    """Stage one slice row; return the case's record once its last slice is in, else None."""
    n_slices = int(row["n_slices"])
    if n_slices == 1:
        return finish_case([row], settings)
    folder = storage.join(settings.output, STAGING, str(row["case_id"]))
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
    record.mask_uri = storage.join(settings.output, MASKS, record.case_id + mask_extension(image))
    write_mask(mask, image, record.mask_uri)
    if any(r["saliency"].size for r in rows if r.get("saliency") is not None):
        maps = [r["saliency"] if r["saliency"].size else np.zeros(r["mask"].shape, np.float32) for r in rows]
        buffer = io.BytesIO()
        np.save(buffer, np.stack(maps, axis=axis) if image.is_volume else maps[0])
        storage.write_bytes_atomic(storage.join(settings.output, SALIENCY, f"{record.case_id}.npy"), buffer.getvalue())
    truth = None
    if record.gt_uri:
        try:
            truth = read_mask(record.gt_uri)
            scores = score_mask(mask, record.mask_uri, truth, settings.tolerance)
            record.dsc, record.nsd, record.hd95 = scores.dsc, scores.nsd, scores.hd95
        except Exception as exc:  # the mask stands; only its scores are missing
            truth, record.error = None, f"ground truth: {exc}"
    pictures = {_key(r): r["image"] for r in rows if r["image"].size}
    if pictures:
        _write_overlay(record, masks, pictures, truth, axis, settings.output)
    record.status = STATUS_OK if prompted else (STATUS_NO_TARGET if settings.source == SOURCE_TEXT
                                                else STATUS_NO_PROMPTS)


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
    storage.write_bytes_atomic(storage.join(output, OVERLAYS, f"{record.case_id}.png"), png)
