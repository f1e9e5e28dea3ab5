"""The mask file formats' names and the codes a DICOM SEG names its segment with: a vocabulary the
config validates against (so it imports nothing heavy), used by ``mask_files`` and ``dicom_seg``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

AUTO, NIFTI, PNG, DICOM_SEG, RTSTRUCT = "auto", "nifti", "png", "dicom-seg", "rtstruct"
FRACTIONAL_SEG = "fractional-seg"  # weak predict's mean probability, a FRACTIONAL (PROBABILITY) SEG
FILE_FORMATS = (AUTO, NIFTI, PNG)
DICOM_FORMATS = (DICOM_SEG, RTSTRUCT, FRACTIONAL_SEG)  # written over a DICOM source, beside the mask file
PROBABILITY_FORMATS = (FRACTIONAL_SEG,)  # only a run that has probabilities (weak predict) writes these
MASK_FORMATS = (*FILE_FORMATS, *DICOM_FORMATS)
SUFFIXES = {DICOM_SEG: ".seg.dcm", RTSTRUCT: ".rtstruct.dcm", FRACTIONAL_SEG: ".prob.seg.dcm"}
NOT_DICOM = "not DICOM"  # the warnings' kinds (pipeline.flags.summary groups by them)
NO_DICOM_OBJECT = "no DICOM object"
PNG_VOLUME = "png of a volume"


def parse_mask_formats(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"nifti,dicom-seg"`` or a list of names, checked: known names, at most one of auto/nifti/png."""
    names = value.split(",") if isinstance(value, str) else list(value)
    formats = tuple(dict.fromkeys(name.strip().lower() for name in names if name.strip()))
    unknown = [name for name in formats if name not in MASK_FORMATS]
    if unknown:
        raise ValueError(f"unknown mask format {', '.join(unknown)}; choose from {', '.join(MASK_FORMATS)} "
                         "(several: comma-separated)")
    if sum(name in FILE_FORMATS for name in formats) > 1:
        raise ValueError(f"{', '.join(n for n in formats if n in FILE_FORMATS)}: give one of "
                         f"{', '.join(FILE_FORMATS)}, since one mask file per case is what the manifest points to")
    return formats or (AUTO,)


CodeTriple = tuple[str, str, str]  # code value, coding scheme (SCT: SNOMED CT), meaning
ABNORMAL_STRUCTURE: CodeTriple = ("49755003", "SCT", "Morphologically Abnormal Structure")
MASS: CodeTriple = ("4147007", "SCT", "Mass")


@dataclass(frozen=True)
class Segment:
    """What the mask shows, in the codes a viewer displays: its segmented property category and type."""

    label: str
    category: CodeTriple = ABNORMAL_STRUCTURE
    property_type: CodeTriple = MASS
