"""Turning an input path or URI prefix into a list of cases, keyed by case_id.

Symbolic links in a folder are followed (a cohort is often a folder of links into an archive):
a link to an image file is a case named after the link, a link to a DICOM series folder is a
series. A broken link is skipped and named in the warning that lists skipped entries.
"""

from __future__ import annotations

import logging

from .. import storage
from ..errors import InputError
from ..storage.retry import is_transient
from .images import DICOM_EXTENSIONS, case_id_from_uri, extension_of, is_seg_file, is_supported

log = logging.getLogger(__name__)


def _has_dicom_magic(uri: str) -> bool:
    fs, path = storage.filesystem(uri)

    def preamble() -> bytes:
        with fs.open(path, "rb") as handle:
            return handle.read(132)

    try:
        return storage.retried(uri, preamble)[128:132] == b"DICM"
    except OSError as exc:
        if is_transient(exc):  # the store did not answer: that says nothing about the file
            raise
        return False


def _looks_like_dicom_folder(files: list[str]) -> bool:
    """Every file is .dcm/.dicom or has no extension, and the first one is a DICOM file; a folder of
    ``<case_id>.seg.dcm`` masks is no series."""
    if not files or any(is_seg_file(f) for f in files):
        return False
    plausible = all(f.lower().endswith(DICOM_EXTENSIONS) or "." not in storage.basename(f) for f in files)
    return plausible and _has_dicom_magic(files[0])


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


def list_cases(uri: str) -> dict[str, str]:
    """{case_id: URI} for a file, a folder/prefix of images, or a DICOM series folder.

    In a folder, every supported image file is a case, and so is every sub-folder holding a
    DICOM series (case_id = folder name) and every ``<case_id>.seg.dcm`` (a DICOM SEG mask, which
    gives way to a mask file of the same case); links to either count as they do. Other files and
    broken links are skipped with a log line. Two inputs with the same case_id are an error,
    since prompts and outputs are keyed by it.
    """
    if not storage.exists(uri):
        raise InputError(f"{uri}: no such file, folder or prefix")
    if not storage.isdir(uri):
        if not is_supported(uri):
            raise InputError(f"{uri}: unsupported extension '{extension_of(uri) or '(none)'}'")
        return {case_id_from_uri(uri): uri}
    files, subfolders, broken = _entries(uri)
    if _looks_like_dicom_folder(files):
        return {storage.basename(uri): uri}
    cases: dict[str, str] = {}
    candidates = [f for f in files if is_seg_file(f) or (is_supported(f) and not f.lower().endswith(DICOM_EXTENSIONS))]
    skipped = [f"{link} (broken link)" for link in broken] + [f for f in files if f not in candidates]
    for sub in subfolders:
        if _looks_like_dicom_folder(_entries(sub)[0]):
            candidates.append(sub)
    for candidate in sorted(candidates, key=is_seg_file):  # a run's masks/: its SEG is a copy of the mask file
        case_id = case_id_from_uri(candidate)
        if case_id in cases and is_seg_file(candidate) and not is_seg_file(cases[case_id]):
            continue
        if case_id in cases:
            raise InputError(f"two inputs share case_id '{case_id}': {cases[case_id]} and {candidate}")
        cases[case_id] = candidate
    if skipped:
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning("skipped %d entr%s that are not usable images: %s%s", len(skipped),
                    "y" if len(skipped) == 1 else "ies", ", ".join(skipped[:5]), more)
    if not cases:
        raise InputError(f"{uri}: no supported images found")
    return dict(sorted(cases.items()))
