"""Masks as DICOM Segmentation objects (BINARY SEG, through highdicom), so that a mask computed on a
DICOM scan goes back to where the scan came from: a PACS, OHIF or 3D Slicer shows it over the series.

Each frame references the source slice it was computed on (its SOP instance and image position), the
SEG keeps the source's patient, study and frame of reference, and gets series and instance UIDs of its
own. The source slices are given in the order of the volume ``read_image`` returns, so the mask's
``z`` index is that slice's frame; slices with no foreground are left out of the SEG. A FRACTIONAL
(PROBABILITY) SEG holds weak predict's probabilities the same way, so a viewer can show doubt as well.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from .. import __version__, storage
from .dicom_sources import save_dataset, source_datasets
from .mask_formats import Segment

MANUFACTURER = "medclipsam"
SEG_SERIES_NUMBER = 900  # after the scanner's own series, as viewers list them
PROBABILITY_SERIES_NUMBER = 902  # the binary SEG's 900 and the RTSTRUCT's 901 come first
MAX_FRACTIONAL_VALUE = 255  # a probability p is stored as round(255 p): steps of 1/255


def _frames(mask: np.ndarray, sources: list[pydicom.Dataset], uri: str, fractional: bool) -> np.ndarray:
    """``mask`` as one frame per source slice (a 2D mask of a single-frame image gets one): binary, or
    probabilities in [0, 1] for a FRACTIONAL SEG."""
    frames = mask[np.newaxis] if mask.ndim == 2 else mask
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if frames.shape != (len(sources), rows, columns):
        raise ValueError(f"{uri}: mask shape {mask.shape} does not fit {len(sources)} slice(s) of "
                         f"{rows} x {columns}")
    if fractional:
        return np.clip(np.nan_to_num(frames.astype(np.float32)), 0.0, 1.0)
    return (frames > 0).astype(np.uint8)


def segmentation(mask: np.ndarray, sources: list[pydicom.Dataset], segment: Segment, description: str,
                 uri: str = "", fractional: bool = False) -> hd.seg.Segmentation:
    """The BINARY SEG of ``mask`` over ``sources`` (with ``fractional``, the PROBABILITY SEG of the
    probabilities ``mask``): one segment, its algorithm medclipsam (AI, AUTOMATIC)."""
    algorithm = hd.AlgorithmIdentificationSequence(name=MANUFACTURER, version=__version__,
                                                    family=codes.cid7162.ArtificialIntelligence)
    described = hd.seg.SegmentDescription(
        segment_number=1, segment_label=segment.label[:64], segmented_property_category=Code(*segment.category),
        segmented_property_type=Code(*segment.property_type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
    kind = {"segmentation_type": hd.seg.SegmentationTypeValues.BINARY}
    if fractional:
        kind = {"segmentation_type": hd.seg.SegmentationTypeValues.FRACTIONAL,
                "fractional_type": hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
                "max_fractional_value": MAX_FRACTIONAL_VALUE}
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=_frames(mask, sources, uri, fractional), **kind,
        segment_descriptions=[described], series_instance_uid=hd.UID(),
        series_number=PROBABILITY_SERIES_NUMBER if fractional else SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=MANUFACTURER,
        software_versions=__version__, device_serial_number="none", series_description=description[:64],
        omit_empty_frames=True)


def write_dicom_seg(mask: np.ndarray, source_uri: str, uri: str, segment: Segment, description: str,
                    fractional: bool = False) -> None:
    """Write ``mask`` (``read_image(source_uri)``'s shape) as a SEG at ``uri``, atomically."""
    with storage.local_copy(source_uri) as local:
        seg = segmentation(mask, source_datasets(local, source_uri), segment, description, source_uri, fractional)
    save_dataset(seg, uri)


def write_probability_seg(probability: np.ndarray, source_uri: str, uri: str, segment: Segment,
                          description: str) -> None:
    """Write ``probability`` as a FRACTIONAL SEG, so a viewer shows where the model is unsure."""
    write_dicom_seg(probability, source_uri, uri, segment, f"{description} (probability)", fractional=True)
