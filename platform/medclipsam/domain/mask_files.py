"""A case's mask in each file format asked for (``output.mask_format``, ``--mask-format``).

One NIfTI or PNG mask is always written, since scoring, ``evaluate``, the report and weak training
read it (``mask_uri``): ``auto`` (NIfTI 0/1 for a volume, PNG 0/255 for a 2D image), ``nifti`` (NIfTI
0/1 for both) or ``png`` (2D images; a volume gets NIfTI, with a warning). ``dicom-seg`` adds
``<case_id>.seg.dcm``, ``rtstruct`` ``<case_id>.rtstruct.dcm`` and ``fractional-seg`` (a run with
probabilities: ``weak predict``) ``<case_id>.prob.seg.dcm`` beside it for a case whose source is DICOM
(a series folder or a ``.dcm`` file); any other case, or a DICOM source a format cannot cover (an
RTSTRUCT needs patient geometry), gets a warning instead, so one mixed cohort still runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..storage.outputs import MASKS, case_file
from .images import DICOM_EXTENSIONS, MedicalImage, extension_of, mask_extension, write_mask, write_sitk
from .mask_formats import (
    AUTO,
    DICOM_FORMATS,
    FILE_FORMATS,
    FRACTIONAL_SEG,
    NIFTI,
    NO_DICOM_OBJECT,
    NOT_DICOM,
    PNG,
    PNG_VOLUME,
    PROBABILITY_FORMATS,
    RTSTRUCT,
    SUFFIXES,
    Segment,
)


def is_dicom_source(uri: str) -> bool:
    """A ``.dcm`` file or a folder (the only folders a cohort lists are DICOM series), told from the URI."""
    ext = extension_of(uri)
    return ext in DICOM_EXTENSIONS or ext == ""


@dataclass(frozen=True)
class MaskOutput:
    """How a run writes each case's mask (``output`` section of the config)."""

    formats: tuple[str, ...] = (AUTO,)
    segment: Segment = field(default_factory=lambda: Segment("target"))
    description: str = "medclipsam"  # the SEG's series description: the task and the prompt source

    @property
    def dicom_formats(self) -> tuple[str, ...]:
        return tuple(name for name in self.formats if name in DICOM_FORMATS)


def check_dicom_sources(settings: MaskOutput, uris: list[str], probabilities: bool = False) -> None:
    """A DICOM format for a cohort with no DICOM case is a usage error (a mixed cohort is warned of per case),
    and so is a probability format for a run without ``probabilities`` (only weak predict has them)."""
    asked = [name for name in settings.formats if name in PROBABILITY_FORMATS]
    if asked and not probabilities:
        raise InputError(f"--mask-format {','.join(asked)} writes the probabilities of weak predict's ensemble, "
                         "and SAM's masks (segment, pseudolabel) have none; use dicom-seg for a binary SEG")
    if settings.dicom_formats and uris and not any(is_dicom_source(uri) for uri in uris):
        raise InputError(f"--mask-format {','.join(settings.dicom_formats)} writes masks over their DICOM source, "
                         f"and none of the "
                         f"{len(uris)} case(s) is a DICOM series folder or .dcm file (e.g. {', '.join(uris[:2])}); "
                         f"use {', '.join(FILE_FORMATS)}")


@dataclass
class WrittenMasks:
    mask_uri: str
    formats: list[str]  # as written, e.g. ["nifti", "dicom-seg"]
    warnings: list[str]


def _file_format(image: MedicalImage, formats: tuple[str, ...]) -> tuple[str, list[str]]:
    asked = next((name for name in formats if name in FILE_FORMATS), AUTO)
    if asked == PNG and image.is_volume:
        return NIFTI, [f"{PNG_VOLUME}: PNG holds 2D masks, so this volume's mask is NIfTI"]
    if asked == AUTO:
        return (NIFTI if mask_extension(image) == ".nii.gz" else PNG), []
    return asked, []


def write_case_masks(mask: np.ndarray, image: MedicalImage, source_uri: str, output: str, case_id: str,
                     settings: MaskOutput, probability: np.ndarray | None = None) -> WrittenMasks:
    """Write ``mask`` (``image``'s shape; ``image`` read from ``source_uri``) under ``output/masks/`` in
    every format of ``settings``; a probability format writes ``probability`` (``mask``'s shape)."""
    kind, warnings = _file_format(image, settings.formats)
    uri = case_file(output, MASKS, case_id, ".png" if kind == PNG else ".nii.gz")
    if kind == NIFTI and not image.is_volume:  # a 2D NIfTI keeps 0/1, as a volume's does
        write_sitk(sitk.GetImageFromArray((mask > 0).astype(np.uint8)), uri)
    else:
        write_mask(mask, image, uri)
    written = WrittenMasks(uri, [kind], warnings)
    if settings.dicom_formats and not is_dicom_source(source_uri):
        written.warnings.append(f"{NOT_DICOM}: no {', '.join(settings.dicom_formats)}, since the source "
                                f"({extension_of(source_uri)}) is not a DICOM series or file")
        return written
    for name in settings.dicom_formats:
        values = probability if name in PROBABILITY_FORMATS else mask
        if values is None:
            raise ValueError(f"--mask-format {name} needs the case's probabilities, and this run has none")
        try:
            _dicom_writer(name)(values, source_uri, case_file(output, MASKS, case_id, SUFFIXES[name]),
                                settings.segment, settings.description)
        except InputError as exc:  # the case keeps its mask file; the reason is its warning
            written.warnings.append(f"{NO_DICOM_OBJECT}: {exc}")
            continue
        written.formats.append(name)
    return written


def _dicom_writer(name: str) -> Callable[..., None]:
    """The writer of a DICOM format, imported when first due (highdicom takes a second to import)."""
    if name == RTSTRUCT:
        from .rtstruct import write_rtstruct

        return write_rtstruct
    from .dicom_seg import write_dicom_seg, write_probability_seg

    return write_probability_seg if name == FRACTIONAL_SEG else write_dicom_seg
