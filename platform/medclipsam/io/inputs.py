"""Turning an input path or URI prefix into a list of cases, keyed by case_id."""

from __future__ import annotations

import logging

from ..errors import InputError
from . import storage
from .images import DICOM_EXTENSIONS, case_id_from_uri, extension_of, is_supported

log = logging.getLogger(__name__)


def _has_dicom_magic(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _looks_like_dicom_folder(files: list[str]) -> bool:
    """Every file is .dcm/.dicom or has no extension, and the first one is a DICOM file."""
    if not files:
        return False
    plausible = all(f.lower().endswith(DICOM_EXTENSIONS) or "." not in storage.basename(f) for f in files)
    return plausible and _has_dicom_magic(files[0])


def list_cases(uri: str) -> dict[str, str]:
    """{case_id: URI} for a file, a folder/prefix of images, or a DICOM series folder.

    In a folder, every supported image file is a case, and so is every sub-folder holding a
    DICOM series (case_id = folder name). Other files are skipped with a log line. Two inputs
    with the same case_id are an error, since prompts and outputs are keyed by it.
    """
    if not storage.exists(uri):
        raise InputError(f"{uri}: no such file, folder or prefix")
    if not storage.isdir(uri):
        if not is_supported(uri):
            raise InputError(f"{uri}: unsupported extension '{extension_of(uri) or '(none)'}'")
        return {case_id_from_uri(uri): uri}
    files = [f for f in storage.list_files(uri) if not storage.basename(f).startswith(".")]
    if _looks_like_dicom_folder(files):
        return {storage.basename(uri): uri}
    cases: dict[str, str] = {}
    candidates = [f for f in files if is_supported(f) and not f.lower().endswith(DICOM_EXTENSIONS)]
    skipped = [f for f in files if f not in candidates]
    for sub in storage.list_dirs(uri):
        inner = storage.list_files(sub)
        if _looks_like_dicom_folder(inner):
            candidates.append(sub)
    for candidate in candidates:
        case_id = case_id_from_uri(candidate)
        if case_id in cases:
            raise InputError(f"two inputs share case_id '{case_id}': {cases[case_id]} and {candidate}")
        cases[case_id] = candidate
    if skipped:
        log.warning("skipped %d file(s) that are not images: %s", len(skipped), ", ".join(skipped[:5]))
    if not cases:
        raise InputError(f"{uri}: no supported images found")
    return dict(sorted(cases.items()))
