"""Reading box and point prompts from CSV files, validated row by row.

Boxes: ``case_id,slice,x0,y0,x1,y1``; points: ``case_id,slice,x,y,label``. ``slice`` is empty
for 2D images and the index along the slicing axis for volumes; x is the column and y the row.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..domain.cohort import read_csv_rows
from ..domain.images import read_mask
from ..domain.inputs import list_cases
from ..errors import PromptError
from .from_mask import label_boxes
from .types import SlicePrompts

BOX_COLUMNS = ("case_id", "slice", "x0", "y0", "x1", "y1")
POINT_COLUMNS = ("case_id", "slice", "x", "y", "label")


@dataclass(frozen=True)
class PromptRow:
    """One CSV row, remembered with where it came from for error messages."""

    source: str
    line: int
    case_id: str
    slice_index: int | None
    values: tuple[float, ...]

    @property
    def where(self) -> str:
        return f"{self.source} line {self.line}"


def _read_rows(uri: str, columns: tuple[str, ...]) -> list[PromptRow]:
    """Rows of a prompt CSV, read as ``read_csv_rows`` reads any input CSV (encodings, trailing
    commas, blank lines), each remembering its physical line for later messages."""
    header, records = read_csv_rows(uri, "prompt file", PromptError)
    missing = [c for c in columns if c not in header]
    if missing:
        raise PromptError(f"{uri}: missing column(s) {', '.join(missing)}; expected header {','.join(columns)}")
    rows: list[PromptRow] = []
    for number, raw in records:
        where = f"{uri} line {number}"
        case_id = raw["case_id"]
        if not case_id:
            raise PromptError(f"{where}: empty case_id")
        slice_text = raw["slice"]
        slice_index: int | None = None
        if slice_text:
            try:
                slice_index = int(slice_text)
            except ValueError:
                raise PromptError(f"{where}: slice '{slice_text}' is not an integer") from None
            if slice_index < 0:
                raise PromptError(f"{where}: slice {slice_index} is negative")
        values = []
        for column in columns[2:]:
            try:
                value = float(raw[column])
            except ValueError:
                raise PromptError(f"{where}: {column} '{raw[column]}' is not a number") from None
            if not math.isfinite(value):
                raise PromptError(f"{where}: {column} is not finite")
            values.append(value)
        rows.append(PromptRow(uri, number, case_id, slice_index, tuple(values)))
    if not rows:  # a run with it would write empty masks and call them done
        raise PromptError(f"{uri}: no prompt rows, only the header; give one row per prompt "
                          f"({','.join(columns)})")
    return rows


def read_box_rows(uri: str) -> list[PromptRow]:
    rows = _read_rows(uri, BOX_COLUMNS)
    for row in rows:
        x0, y0, x1, y1 = row.values
        if x1 <= x0 or y1 <= y0:
            raise PromptError(f"{row.where}: box needs x1 > x0 and y1 > y0, got ({x0}, {y0}, {x1}, {y1})")
    return rows


def read_point_rows(uri: str) -> list[PromptRow]:
    rows = _read_rows(uri, POINT_COLUMNS)
    for row in rows:
        if row.values[2] not in (0.0, 1.0):
            raise PromptError(f"{row.where}: label must be 1 (foreground) or 0 (background), got {row.values[2]}")
    return rows


#: prompts per case: slice index (None for 2D) -> rows
CasePromptRows = dict[int | None, list[PromptRow]]


def group_by_case(
    box_rows: list[PromptRow], point_rows: list[PromptRow]
) -> dict[str, tuple[CasePromptRows, CasePromptRows]]:
    """{case_id: (boxes by slice, points by slice)}."""
    grouped: dict[str, tuple[CasePromptRows, CasePromptRows]] = defaultdict(
        lambda: (defaultdict(list), defaultdict(list))
    )
    for row in box_rows:
        grouped[row.case_id][0][row.slice_index].append(row)
    for row in point_rows:
        grouped[row.case_id][1][row.slice_index].append(row)
    return dict(grouped)


def check_case_ids(box_rows: list[PromptRow], point_rows: list[PromptRow], case_ids: set[str]) -> None:
    """Every prompt row must name an input case."""
    unknown = [row for row in box_rows + point_rows if row.case_id not in case_ids]
    if unknown:
        known = sorted(case_ids)

        def nearest(case_id: str) -> str:
            close = difflib.get_close_matches(case_id, known, n=3, cutoff=0.6)
            return f" (nearest: {', '.join(close)})" if close else ""

        listed = "; ".join(f"{row.where}: case_id '{row.case_id}'{nearest(row.case_id)}" for row in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        shown = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
        raise PromptError(f"prompt rows name cases that match no input: {listed}{more}; the input's cases are "
                          f"{shown}")


def prompts_for_case(
    boxes: CasePromptRows, points: CasePromptRows, image_shape: tuple[int, ...], is_volume: bool, axis: int
) -> dict[int | None, SlicePrompts]:
    """Validate a case's rows against its image and turn them into prompts per slice.

    image_shape is the array shape (``H x W[ x C]`` for 2D, ``Z x Y x X`` for volumes).
    """
    if is_volume:
        n_slices = image_shape[axis]
        plane = tuple(s for i, s in enumerate(image_shape) if i != axis)
    else:
        n_slices = 0
        plane = tuple(image_shape[:2])
    height, width = plane
    out: dict[int | None, SlicePrompts] = {}
    for key in set(boxes) | set(points):
        checks = [(row, row.values[:4]) for row in boxes.get(key, [])]
        checks += [(row, row.values[:2]) for row in points.get(key, [])]
        for row, coords in checks:
            if is_volume and row.slice_index is None:
                raise PromptError(f"{row.where}: case '{row.case_id}' is a volume; give the slice index")
            if not is_volume and row.slice_index is not None:
                raise PromptError(f"{row.where}: case '{row.case_id}' is a 2D image; leave slice empty")
            if is_volume and row.slice_index >= n_slices:
                raise PromptError(
                    f"{row.where}: slice {row.slice_index} outside 0..{n_slices - 1} along axis {axis}"
                )
            xs, ys = coords[0::2], coords[1::2]
            if min(xs) < 0 or max(xs) > width - 1 or min(ys) < 0 or max(ys) > height - 1:
                raise PromptError(
                    f"{row.where}: prompt {tuple(coords)} lies outside the image "
                    f"(x in 0..{width - 1}, y in 0..{height - 1})"
                )
        box_array = np.array([r.values for r in boxes.get(key, [])], dtype=np.float64).reshape(-1, 4)
        point_array = np.array([r.values[:2] for r in points.get(key, [])], dtype=np.float64).reshape(-1, 2)
        labels = np.array([r.values[2] for r in points.get(key, [])], dtype=np.int64)
        out[key] = SlicePrompts(box_array, point_array, labels)
    return out


def oracle_boxes_csv(labels_uri: str, axis: int = 0, margin: float = 0.0) -> str:
    """A boxes CSV (``case_id,slice,x0,y0,x1,y1``) with one box per labelled slice of every label."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(BOX_COLUMNS)
    for case_id, uri in list_cases(labels_uri).items():
        for index, prompts in label_boxes(read_mask(uri), axis, margin).items():
            writer.writerow([case_id, "" if index is None else index, *(f"{v:g}" for v in prompts.boxes[0])])
    return buffer.getvalue()
