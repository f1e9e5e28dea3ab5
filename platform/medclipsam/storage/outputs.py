"""The layout of a run's output folder, and the per-case records that mark a case complete.

    <output>/masks/<case_id>.png|.nii.gz   the mask, with the source geometry
    <output>/saliency/<case_id>.npy        saliency maps (optional), image-shaped float32
    <output>/coarse/<case_id>.png|.nii.gz  coarse masks (optional)
    <output>/prompts/<case_id>.json        SAM prompts per slice (optional)
    <output>/overlays/<case_id>.png        contour pictures of the first cases (one slice of a volume)
    <output>/strips/<case_id>.slice<k>.png the same for the prompted slices of those volumes (the report's)
    <output>/records/<case_id>.json        the case's manifest row, written last
    <output>/records/parts/*.parquet       the driver's copy of the records, a thousand a part
    <output>/manifest.parquet              every record of the run
    <output>/run.json                      the settings of the run (a resume must match them)
"""

from __future__ import annotations

import posixpath

from .. import storage
from ..errors import InputError

MASKS, SALIENCY, COARSE, PROMPTS = "masks", "saliency", "coarse", "prompts"
OVERLAYS, STRIPS, RECORDS, STAGING = "overlays", "strips", "records", ".staging"
MANIFEST, RUN_FILE = "manifest.parquet", "run.json"


def quoted(text: str) -> str:
    """``text`` in quotes for a message, its control characters escaped so they cannot garble a terminal."""
    return "'" + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text) + "'"


def check_case_id(case_id: str, where: str) -> None:
    """Refuse a case_id that is not a plain file name: it names the case's output files, so ``/``,
    ``\\``, ``..`` or an absolute path would write outside the output folder, a leading dot would hide
    its record from a resume (and clash with temporary names), and control characters garble listings.
    """
    if (not case_id or case_id.startswith(".") or "/" in case_id or "\\" in case_id
            or any(ord(c) < 32 or ord(c) == 127 for c in case_id)):
        raise InputError(f"{where}: case_id {quoted(case_id)} is not a plain name (it names output files, so it may "
                         "not be empty, start with '.', or hold '/', '\\' or control characters)")


def case_file(output: str, folder: str, case_id: str, suffix: str) -> str:
    """``<output>/<folder>/<case_id><suffix>``; the last guard that no case writes outside its output."""
    check_case_id(case_id, f"output {output}")
    uri = storage.join(output, folder, f"{case_id}{suffix}")
    inside = posixpath.normpath(storage.join(output, folder))
    if posixpath.dirname(posixpath.normpath(uri)) != inside:
        raise InputError(f"output {output}: case_id {quoted(case_id)} would write outside {inside}")
    return uri


def record_uri(output: str, case_id: str) -> str:
    return case_file(output, RECORDS, case_id, ".json")


