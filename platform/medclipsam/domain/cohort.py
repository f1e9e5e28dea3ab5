"""The cases of a pseudo-labelling run: a URI prefix to list, or a manifest table.

A manifest is CSV or Parquet with a ``uri`` column (the case image or DICOM series folder) and,
optionally, ``case_id``, ``prompt`` (one sentence, or a JSON list of sentences for an ensemble)
and ``gt_uri`` (a ground-truth mask to score against). Relative URIs are relative to the
manifest's folder. Nothing is read here beyond listings: a missing object becomes an error row
of the run, not a failure of the whole plan.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import InputError, MedClipSamError
from ..storage.outputs import check_case_id, quoted
from .images import case_id_from_uri, is_seg_file, segment_uri
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


#: how much of a CSV file the error messages point at: (physical line, {column: stripped value})
CsvRows = list[tuple[int, dict[str, str]]]


def _read_input(uri: str, what: str, error: type[MedClipSamError]) -> bytes:
    """The bytes of an input file; a missing file, a folder or an unreadable one is one ``error``."""
    try:
        return storage.read_bytes(uri)
    except IsADirectoryError:
        raise error(f"{uri} is a folder; give the {what} file itself") from None
    except FileNotFoundError:
        if storage.isdir(uri):  # an object store's prefix
            raise error(f"{uri} is a folder; give the {what} file itself") from None
        raise error(f"{uri}: {what} not found") from None
    except OSError as exc:
        raise error(f"{uri}: {what} cannot be read ({exc.strerror or exc})") from None


def decode_text(data: bytes) -> str:
    """Text as editors and spreadsheets save it: UTF-8 with or without a BOM, UTF-16 or UTF-32 with a
    BOM, and latin-1 when the bytes are not valid UTF-8 (every byte string is latin-1, so that is last).

    Raises ValueError with the reason when the bytes are not text.
    """
    for bom, encoding, name in ((codecs.BOM_UTF32_LE, "utf-32", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
                                (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"), (codecs.BOM_UTF16_BE, "utf-16", "UTF-16")):
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                raise ValueError(f"not valid {name} though it starts with a {name} byte-order mark") from None
    if b"\x00" in data:
        raise ValueError("not a text file (it holds NUL bytes; UTF-16 text needs its byte-order mark, "
                         "or save it as UTF-8)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _csv_problem(exc: csv.Error) -> str:
    text = str(exc)
    if text == "unexpected end of data":
        return "a quoted value is not closed"
    if text.startswith("field larger than field limit"):
        return f"a value is longer than {csv.field_size_limit()} characters"
    return f"not valid CSV ({text})"


def read_csv_rows(uri: str, what: str, error: type[MedClipSamError] = InputError) -> tuple[list[str], CsvRows]:
    """The header and rows of a CSV file, each row with its physical line (1-based, counting the header
    and blank lines) so that messages point where an editor does.

    Blank lines and rows of only commas are skipped, trailing empty columns (a comma at the end of
    every line, as spreadsheets write) are dropped, and a short row is padded with empty values;
    a row with more values than the header, a repeated column or broken quoting is one ``error``.
    """
    try:
        text = decode_text(_read_input(uri, what, error))
    except ValueError as exc:
        raise error(f"{uri}: {exc}") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows: CsvRows = []
    end = 0  # the physical line the last record ended on
    try:
        for fields in reader:
            line, end = end + 1, reader.line_num
            if not any(f.strip() for f in fields):
                continue
            if header is None:
                header = [f.strip() for f in fields]
                while not header[-1]:
                    header.pop()
                repeated = next((h for i, h in enumerate(header) if h and h in header[:i]), None)
                if repeated:
                    raise error(f"{uri} line {line}: column '{repeated}' appears twice in the header")
                continue
            values = len(fields)
            while values and not fields[values - 1].strip():
                values -= 1
            if values > len(header):
                raise error(f"{uri} line {line}: {values} values, but the header has {len(header)} columns")
            padded = [f.strip() for f in fields[: len(header)]] + [""] * max(0, len(header) - len(fields))
            rows.append((line, {name: value for name, value in zip(header, padded, strict=True) if name}))
    except csv.Error as exc:
        raise error(f"{uri} line {end + 1}: {_csv_problem(exc)}") from None
    return header or [], rows


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _manifest_rows(uri: str) -> tuple[list[str], list[tuple[str, int, dict]]]:
    """The columns and rows of a manifest, each row with how to point at it: ("line", physical line)
    in a CSV file, ("row", 1-based row) in a Parquet table."""
    if not uri.lower().endswith(".parquet"):
        header, rows = read_csv_rows(uri, "manifest")
        return header, [("line", line, row) for line, row in rows]
    data = _read_input(uri, "manifest", InputError)
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{uri}: not a readable Parquet manifest ({exc})") from None
    return table.column_names, [("row", number, row) for number, row in enumerate(table.to_pylist(), start=1)]


def parse_prompt(text: str, where: str) -> tuple[str, ...]:
    """One sentence, or a JSON list of sentences.

    Empty (blank, or ``[]``) means no sentences of its own: the case takes the run's (``--prompt`` or
    the config's ``text.prompts``), and the plan refuses a text-mode case left with none. A long
    sentence is kept whole, since BiomedCLIP's tokenizer truncates it at its context length.
    """
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
    """The cases of a manifest, sorted by case_id; every problem names the file and the row's line.

    An empty ``prompt`` leaves the case without sentences of its own (it takes the run's), and a
    ``case_id`` (given, or taken from the file name) must be a plain name, since it names output files.
    """
    columns, rows = _manifest_rows(uri)
    column = next((c for c in URI_COLUMNS if c in columns), None)
    if column is None:
        raise InputError(f"{uri}: manifest needs a column named one of {', '.join(URI_COLUMNS)}; "
                         f"found {', '.join(c for c in columns if c) or 'none'}")
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    cases: dict[str, tuple[int, CohortCase]] = {}
    for kind, number, row in rows:
        where = f"{uri} {kind} {number}"
        case_uri = _resolve(_text(row.get(column)), base)
        if not case_uri:
            raise InputError(f"{where}: empty {column}")
        case_id = _text(row.get("case_id")) or case_id_from_uri(case_uri)
        check_case_id(case_id, where)
        if case_id in cases:
            first, earlier = cases[case_id]
            raise InputError(f"{where}: case_id {quoted(case_id)} appears twice ({kind}s {first} and {number}: "
                             f"{earlier.uri} and {case_uri})")
        cases[case_id] = number, CohortCase(case_id, case_uri, parse_prompt(_text(row.get("prompt")), where),
                                            _resolve(_text(row.get("gt_uri")), base))
    if not cases:
        raise InputError(f"{uri}: manifest has no rows")
    return [cases[k][1] for k in sorted(cases)]


def _some(names, limit: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_cohort(input_uri: str, gt_uri: str | None = None, case_id_tag: str | None = None,
                gt_segment: str | None = None) -> list[CohortCase]:
    """The cases of ``input_uri`` (prefix, folder, file or manifest), sorted by case_id.

    ``gt_uri`` (a folder or prefix of masks) pairs ground truth by case_id with cases that have none.
    ``case_id_tag`` (a DICOM keyword) names the listed DICOM cases by that tag's value; the truth is
    listed by file name as always, so its masks are named by those values. ``gt_segment`` (a segment
    number or label) picks the segment of every DICOM SEG truth, in its ``gt_uri`` (``segment_uri``).
    """
    if is_manifest(input_uri):
        if case_id_tag:
            raise InputError(f"{input_uri}: a manifest names its cases (its case_id column, else the file name), so "
                             f"the case id tag {case_id_tag} applies to a listed folder only")
        cases = read_cohort_manifest(input_uri)
    else:
        cases = [CohortCase(case_id, uri) for case_id, uri in list_cases(input_uri, case_id_tag).items()]
        for case in cases:
            check_case_id(case.case_id, case.uri)
    if gt_uri:
        truths = list_cases(gt_uri)
        if len(cases) == 1 and len(truths) == 1 and not storage.isdir(gt_uri):  # one image, one mask: a pair
            truths = {cases[0].case_id: next(iter(truths.values()))}
        if not any(c.gt_uri or c.case_id in truths for c in cases):
            raise InputError(f"{gt_uri}: no ground truth here has a case's id (masks pair with images by case_id, "
                             f"the file name without its extension): masks {_some(truths)}; cases "
                             f"{_some(c.case_id for c in cases)}")
        cases = [c if c.gt_uri else CohortCase(c.case_id, c.uri, c.prompts, truths.get(c.case_id, ""))
                 for c in cases]
    if gt_segment:
        cases = _with_segment(cases, gt_segment)
    # recorded in the manifest and read by Ray workers: independent of the working directory
    return [CohortCase(c.case_id, storage.absolute(c.uri), c.prompts, c.gt_uri and storage.absolute(c.gt_uri))
            for c in cases]


def _with_segment(cases: list[CohortCase], segment: str) -> list[CohortCase]:
    if not any(is_seg_file(c.gt_uri) for c in cases):
        raise InputError(f"--gt-segment {segment} picks a segment of DICOM SEG truths (<case_id>.seg.dcm), and no "
                         f"case's ground truth is one (e.g. {_some(c.gt_uri or '(none)' for c in cases)})")
    return [CohortCase(c.case_id, c.uri, c.prompts, segment_uri(c.gt_uri, segment)) if is_seg_file(c.gt_uri) else c
            for c in cases]


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
