"""Turning an input path or URI prefix into a list of cases, keyed by case_id.

A folder is walked down to ``MAX_DEPTH`` levels of sub-folders (a patient/study/series tree):
every DICOM series found is a case, and so is every image file directly in the listed folder.
Loose DICOM files are grouped by their SeriesInstanceUID (read from their headers with pydicom,
pixels unread), so a folder holding several series gives one case per series; a case that is
one series of such a folder has the URI ``<folder>#series=<SeriesInstanceUID>`` (``series_uri``).

Symbolic links in a folder are followed (a cohort is often a folder of links into an archive):
a link to an image file is a case named after the link, a link to a DICOM series folder is a
series. A broken link is skipped and named in the warning that lists skipped entries, and so is
a link back to a folder above it (a loop).
"""

from __future__ import annotations

import logging
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from .. import storage
from ..errors import InputError
from ..storage.retry import is_transient
from .images import (
    DICOM_EXTENSIONS,
    SEG_FILE_SUFFIX,
    case_id_from_uri,
    extension_of,
    is_seg_file,
    is_supported,
    series_uri,
)

log = logging.getLogger(__name__)

HEADER_READERS = 16  # DICOM headers read at once while listing an object store (a round trip each)
MAX_DEPTH = 8  # sub-folder levels walked below the listed folder (patient/study/series needs 3)
MASK_OBJECT_SUFFIXES = (SEG_FILE_SUFFIX, ".rtstruct.dcm")  # a run's DICOM masks beside its mask files: no images
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class DicomFile:
    """A DICOM image file found in a listing: its series, and the case id tag's value ("" without one)."""

    uri: str
    series_uid: str
    series_number: str
    tag_value: str = ""


def check_case_id_tag(keyword: str) -> None:
    """Refuse a case id tag that is not a DICOM keyword with a value (a sequence names nothing)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise InputError(f"case id tag '{keyword}' is not a DICOM keyword (such as SeriesInstanceUID, "
                         "AccessionNumber or PatientID; keywords are case-sensitive)")
    if dictionary_VR(tag) == "SQ":
        raise InputError(f"case id tag '{keyword}' is a sequence, which holds no value to name a case by")


def _value_text(value: object) -> str:
    if isinstance(value, MultiValue | list | tuple):
        return "_".join(str(v) for v in value)
    return "" if value is None else str(value).strip()


def _read_dicom_header(uri: str, keyword: str | None) -> pydicom.Dataset | None:
    """The few header values a listing needs (pixels unread); None for a file that is not DICOM."""
    fs, path = storage.filesystem(uri)
    wanted = ["SeriesInstanceUID", "SeriesNumber", "Rows", "Modality", *([keyword] if keyword else [])]

    def header() -> pydicom.Dataset:
        with fs.open(path, "rb") as handle:
            return pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=wanted)

    try:
        return storage.retried(uri, header)
    except OSError as exc:
        if is_transient(exc):  # the store did not answer: that says nothing about the file
            raise
        return None
    except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, struct.error):
        return None


def dicom_file(uri: str, keyword: str | None = None) -> DicomFile | str:
    """``uri`` as a DICOM image file, or why it is none (a phrase for the listing's warning)."""
    header = _read_dicom_header(uri, keyword)
    if header is None:
        return f"{uri} (not a DICOM file)"
    if "Rows" not in header or _value_text(header.get("Modality")) == "SEG":
        return f"{uri} (a DICOM file with no image)"
    return DicomFile(uri, _value_text(header.get("SeriesInstanceUID")), _value_text(header.get("SeriesNumber")),
                     _value_text(header.get(keyword)) if keyword else "")


def _may_be_dicom(uri: str) -> bool:
    """Named as a DICOM file (``.dcm``, ``.dicom`` or no extension), and not a run's SEG or RTSTRUCT mask."""
    name = storage.basename(uri).lower()
    return not name.endswith(MASK_OBJECT_SUFFIXES) and (name.endswith(DICOM_EXTENSIONS) or "." not in name)


def _entries(uri: str) -> tuple[list[str], list[str], list[str]]:
    """Files (not hidden), sub-folders and broken links directly under ``uri``, sorted, as full URIs.

    fsspec's local listing types a symbolic link as "other" (it does not follow it), so a link
    is looked up again through its target here; one whose target is missing is broken.
    """
    fs, path = storage.filesystem(uri)
    files: list[str] = []
    dirs: list[str] = []
    broken: list[str] = []
    for entry in storage.retried(uri, lambda: fs.ls(path, detail=True)):
        name = entry["name"].rstrip("/")
        kind = entry["type"]
        full = fs.unstrip_protocol(name) if storage.is_remote(uri) else name
        hidden = storage.basename(name).startswith(".")
        if kind == "other" and entry.get("islink"):
            try:
                kind = storage.retried(full, lambda name=name: fs.info(name))["type"]  # a path is followed
            except OSError as exc:  # missing target, a loop, no permission
                if is_transient(exc):
                    raise
                if not hidden:
                    broken.append(full)
                continue
        if kind == "file" and not hidden:
            files.append(full)
        elif kind == "directory" and name != path.rstrip("/") and not hidden:  # .staging, .git, ... are no series
            dirs.append(full)
    return sorted(files), sorted(dirs), sorted(broken)


def _safe_id(value: str) -> str:
    """A tag's value as a case id: characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``."""
    return _UNSAFE.sub("_", value)


@dataclass
class _Listing:
    """What a walk of a folder tree has found so far: (case_id, URI) pairs and what it skipped."""

    root: str
    tag: str | None
    found: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def relative_id(self, uri: str) -> str:
        """The path of ``uri`` below the listed folder, its parts joined by ``_`` ("" for the folder itself)."""
        below = storage.filesystem(uri)[1].rstrip("/")[len(storage.filesystem(self.root)[1].rstrip("/")):]
        return below.strip("/").replace("/", "_")

    def folder_id(self, folder: str) -> str:
        return self.relative_id(folder) or storage.basename(self.root)

    def file_id(self, uri: str) -> str:
        folder = self.relative_id(uri.rstrip("/").rsplit("/", 1)[0])
        return f"{folder}_{case_id_from_uri(uri)}" if folder else case_id_from_uri(uri)

    def add(self, case_id: str, uri: str, first: DicomFile | None = None) -> None:
        """A case; a DICOM one is named by the case id tag of its first file when a tag is given."""
        if self.tag and first is not None:
            if not first.tag_value:
                raise InputError(f"{first.uri}: its DICOM header has no {self.tag} value, and that tag "
                                 f"(--case-id-tag) names the cases")
            case_id = _safe_id(first.tag_value)
        self.found.append((case_id, uri))


def _series_of(listing: _Listing, files: list[str]) -> dict[str, list[DicomFile]]:
    """The DICOM image files among ``files``, grouped by SeriesInstanceUID; the others are skipped.

    Every file's header is read: in an object store (a round trip each) several at once; on a local
    disk one after another, which is faster there (about 1 ms a file)."""
    series: dict[str, list[DicomFile]] = {}
    readers = HEADER_READERS if files and storage.is_remote(files[0]) else 1
    with ThreadPoolExecutor(max_workers=max(1, min(readers, len(files)))) as pool:
        headers = list(pool.map(lambda uri: dicom_file(uri, listing.tag), files))
    for found in headers:
        if isinstance(found, str):
            listing.skipped.append(found)
        else:
            series.setdefault(found.series_uid, []).append(found)
    return series


def _labels(series: dict[str, list[DicomFile]]) -> dict[str, str]:
    """What tells a folder's series apart in their case ids: ``series<SeriesNumber>`` where that number is
    its own among them, else the SeriesInstanceUID."""
    numbers = [files[0].series_number for files in series.values()]
    return {uid: f"series{_safe_id(files[0].series_number)}"
            if files[0].series_number and numbers.count(files[0].series_number) == 1 else uid
            for uid, files in series.items()}


def _add_series(listing: _Listing, folder: str, series: dict[str, list[DicomFile]]) -> None:
    """Each series of a folder as a case: one file is its own case (its path's id, as an image file); a
    series of several files is ``<folder id>_<label>`` with the URI ``<folder>#series=<uid>``."""
    labels = _labels({uid: files for uid, files in series.items() if len(files) > 1})
    for uid, files in series.items():
        if len(files) == 1:
            listing.add(listing.file_id(files[0].uri), files[0].uri, files[0])
        elif not uid:
            listing.skipped += [f"{f.uri} (no SeriesInstanceUID to tell its series)" for f in files]
        else:
            listing.add(f"{listing.folder_id(folder)}_{labels[uid]}", series_uri(folder, uid), files[0])


def _walk(listing: _Listing, folder: str, depth: int, above: frozenset[str]) -> None:
    """List ``folder``: a folder holding only DICOM files of one series is one case (named after the
    folder); otherwise its loose series are cases, and its sub-folders are walked (image files count
    in the listed folder only)."""
    files, subfolders, broken = _entries(folder)
    listing.skipped += [f"{link} (broken link)" for link in broken]
    dicom = [f for f in files if _may_be_dicom(f)]
    others = [f for f in files if not _may_be_dicom(f)]
    if depth == 0:
        for f in others:  # a .rtstruct.dcm or .prob.seg.dcm beside a run's masks: no case, and no surprise
            if is_seg_file(f) or (is_supported(f) and not f.lower().endswith(DICOM_EXTENSIONS)):
                listing.found.append((case_id_from_uri(f), f))
            elif not f.lower().endswith(MASK_OBJECT_SUFFIXES):
                listing.skipped.append(f)
    series = _series_of(listing, dicom)
    if len(series) == 1 and not subfolders and not others:
        listing.add(listing.folder_id(folder), folder, next(iter(series.values()))[0])
        return
    _add_series(listing, folder, series)
    for sub in subfolders:
        real = sub if storage.is_remote(sub) else os.path.realpath(sub)
        if real in above:
            listing.skipped.append(f"{sub} (a link to a folder above it)")
        elif depth + 1 > MAX_DEPTH:
            listing.skipped.append(f"{sub} (more than {MAX_DEPTH} folders deep)")
        else:
            _walk(listing, sub, depth + 1, above | {real})


def _one_file(uri: str, tag: str | None) -> dict[str, str]:
    if not is_supported(uri):
        raise InputError(f"{uri}: unsupported extension '{extension_of(uri) or '(none)'}'")
    if tag and extension_of(uri) in DICOM_EXTENSIONS and not is_seg_file(uri):
        found = dicom_file(uri, tag)
        if isinstance(found, str):
            raise InputError(f"{uri}: not a DICOM image file, so it has no {tag} to name its case by")
        listing = _Listing(uri, tag)
        listing.add(case_id_from_uri(uri), uri, found)
        return dict(listing.found)
    return {case_id_from_uri(uri): uri}


def list_cases(uri: str, case_id_tag: str | None = None) -> dict[str, str]:
    """{case_id: URI} for a file, a folder/prefix of images, or a tree of DICOM series folders.

    In the listed folder, every supported image file is a case, and so is every ``<case_id>.seg.dcm``
    (a DICOM SEG mask, which gives way to a mask file of the same case); below it, every DICOM series
    (``_walk``). A series folder's case id is its path below the listed folder, parts joined by
    ``_``; with ``case_id_tag`` (a DICOM keyword), a DICOM case is named by that tag's value in its
    first file instead. Other files and broken links are skipped with a log line. Two inputs with
    the same case_id are an error, since prompts and outputs are keyed by it.
    """
    if case_id_tag:
        check_case_id_tag(case_id_tag)
    if not storage.exists(uri):
        raise InputError(f"{uri}: no such file, folder or prefix")
    if not storage.isdir(uri):
        return _one_file(uri, case_id_tag)
    listing = _Listing(uri, case_id_tag)
    _walk(listing, uri, 0, frozenset({uri if storage.is_remote(uri) else os.path.realpath(uri)}))
    cases: dict[str, str] = {}
    for case_id, candidate in sorted(listing.found, key=lambda found: is_seg_file(found[1])):  # a run's masks/:
        if case_id in cases and is_seg_file(candidate) and not is_seg_file(cases[case_id]):  # its SEG copies a mask
            continue
        if case_id in cases:
            raise InputError(f"two inputs share case_id '{case_id}': {cases[case_id]} and {candidate}")
        cases[case_id] = candidate
    skipped = listing.skipped
    if skipped:
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning("skipped %d entr%s that are not usable images: %s%s", len(skipped),
                    "y" if len(skipped) == 1 else "ies", ", ".join(skipped[:5]), more)
    if not cases:
        raise InputError(f"{uri}: no supported images found")
    return dict(sorted(cases.items()))
