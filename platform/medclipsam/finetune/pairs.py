"""Image-caption pairs for fine-tuning: a CSV or Parquet table with an image URI and a caption per row."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .. import storage
from ..errors import InputError


def read_pairs(uri: str, image_column: str = "image", caption_column: str = "caption",
               min_caption_chars: int = 20) -> tuple[pa.Table, int]:
    """The pairs with captions of at least ``min_caption_chars`` characters, and how many were dropped."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise InputError(f"{uri}: pairs file not found") from None
    table = pq.read_table(io.BytesIO(data)) if uri.endswith(".parquet") else pacsv.read_csv(io.BytesIO(data))
    missing = [c for c in (image_column, caption_column) if c not in table.column_names]
    if missing:
        raise InputError(f"{uri}: missing column(s) {', '.join(missing)}; has {', '.join(table.column_names)}")
    table = table.select([image_column, caption_column]).rename_columns(["image", "caption"])
    table = table.set_column(1, "caption", pc.utf8_trim_whitespace(pc.cast(table["caption"], pa.string())))
    keep = pc.fill_null(pc.greater_equal(pc.utf8_length(table["caption"]), min_caption_chars), False)
    kept = table.filter(keep)
    return kept, table.num_rows - kept.num_rows


def split_pairs(table: pa.Table, val_fraction: float, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """A seeded random split into training and held-out pairs."""
    order = np.random.default_rng(seed).permutation(table.num_rows)
    n_val = round(table.num_rows * val_fraction)
    return table.take(np.sort(order[n_val:])), table.take(np.sort(order[:n_val]))
