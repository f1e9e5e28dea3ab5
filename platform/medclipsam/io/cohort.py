"""The cases of a pseudo-labelling run: a URI prefix to list, or a manifest table.

A manifest is CSV or Parquet with a ``uri`` column (the case image or DICOM series folder) and,
optionally, ``case_id``, ``prompt`` (one sentence, or a JSON list of sentences for an ensemble)
and ``gt_uri`` (a ground-truth mask to score against). Relative URIs are relative to the
manifest's folder. Nothing is read here beyond listings: a missing object becomes an error row
of the run, not a failure of the whole plan.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import InputError
from . import storage
from .images import case_id_from_uri
from .inputs import list_cases

MANIFEST_EXTENSIONS = (".csv", ".parquet")
URI_COLUMNS = ("uri", "image_uri", "case_uri")


@dataclass(frozen=True)
class CohortCase:
    case_id: str
    uri: str
    prompts: tuple[str, ...] = ()  # empty: the config's text prompts
    gt_uri: str = ""


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_EXTENSIONS)


def _read_table(uri: str) -> pa.Table:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise InputError(f"{uri}: manifest not found") from None
    try:
        if uri.lower().endswith(".parquet"):
            return pq.read_table(io.BytesIO(data))
        options = pacsv.ConvertOptions(strings_can_be_null=False, column_types={
            c: pa.string() for c in ("case_id", "prompt", "gt_uri", *URI_COLUMNS)})
        return pacsv.read_csv(io.BytesIO(data), convert_options=options)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{uri}: not a readable manifest ({exc})") from None


def parse_prompt(text: str, where: str) -> tuple[str, ...]:
    """One sentence, or a JSON list of sentences."""
    text = (text or "").strip()
    if not text:
        return ()
    if text.startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: prompt looks like a JSON list but is not valid JSON ({exc})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise InputError(f"{where}: prompt must be a sentence or a JSON list of sentences")
        return tuple(prompts)
    return (text,)


def _resolve(uri: str, base: str) -> str:
    if not uri or "://" in uri or uri.startswith("/"):
        return uri
    return storage.join(base, uri)


def read_cohort_manifest(uri: str) -> list[CohortCase]:
    table = _read_table(uri)
    column = next((c for c in URI_COLUMNS if c in table.column_names), None)
    if column is None:
        raise InputError(f"{uri}: manifest needs a column named one of {', '.join(URI_COLUMNS)}; "
                         f"found {', '.join(table.column_names) or 'none'}")
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    cases: dict[str, CohortCase] = {}
    for line, row in enumerate(table.to_pylist(), start=2):
        where = f"{uri} row {line - 1}" if uri.lower().endswith(".parquet") else f"{uri} line {line}"
        case_uri = _resolve(str(row.get(column) or "").strip(), base)
        if not case_uri:
            raise InputError(f"{where}: empty {column}")
        case_id = str(row.get("case_id") or "").strip() or case_id_from_uri(case_uri)
        if case_id in cases:
            raise InputError(f"{where}: case_id '{case_id}' appears twice ({cases[case_id].uri} and {case_uri})")
        cases[case_id] = CohortCase(case_id, case_uri, parse_prompt(str(row.get("prompt") or ""), where),
                                    _resolve(str(row.get("gt_uri") or "").strip(), base))
    if not cases:
        raise InputError(f"{uri}: manifest has no rows")
    return [cases[k] for k in sorted(cases)]


def read_cohort(input_uri: str, gt_uri: str | None = None) -> list[CohortCase]:
    """The cases of ``input_uri`` (prefix, folder, file or manifest), sorted by case_id.

    ``gt_uri`` (a folder or prefix of masks) pairs ground truth by case_id with cases that have none.
    """
    if is_manifest(input_uri):
        cases = read_cohort_manifest(input_uri)
    else:
        cases = [CohortCase(case_id, uri) for case_id, uri in list_cases(input_uri).items()]
    if gt_uri:
        truths = list_cases(gt_uri)
        cases = [c if c.gt_uri else CohortCase(c.case_id, c.uri, c.prompts, truths.get(c.case_id, ""))
                 for c in cases]
    return cases


def read_labelled_cohort(input_uri: str, gt_uri: str | None, purpose: str) -> list[CohortCase]:
    """``read_cohort``, for work that scores every case: no cases, or a case without its ground
    truth, is an InputError that says what needed it (``purpose``)."""
    cases = read_cohort(input_uri, gt_uri)
    if not cases:
        raise InputError(f"{input_uri}: no cases")
    unlabelled = [c.case_id for c in cases if not c.gt_uri]
    if unlabelled:
        raise InputError(f"{purpose} scores every case against its truth; no ground truth for "
                         f"{', '.join(unlabelled[:5])} (give --gt, labels/, or a gt_uri column)")
    return cases
