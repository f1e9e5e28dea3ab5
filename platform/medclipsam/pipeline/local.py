"""The single-process runner: the case stages called in a loop, one case at a time.

The same stage functions as the Ray runner, on the same rows; only the wiring differs. Models
load once, after the plan has been checked.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..domain.records import CaseRecord
from ..models.biomedclip import load_clip
from ..models.sam_backends import segmenter_for
from .assembly import finish_case
from .job import Job
from .slices import SOURCE_TEXT, CaseTask, case_slices
from .stages import add_key_slice_prompts, add_masks, add_propagated_masks, add_saliency, add_text_prompts


def run_local(tasks: list[CaseTask], job: Job) -> Iterator[CaseRecord]:
    """Yield each case's record as soon as its mask and record are written."""
    if not tasks:
        return
    c = job.config
    clip = load_clip(job.clip, c.sam.device) if job.source == SOURCE_TEXT else None
    segmenter = segmenter_for(c.sam)
    assembly = job.assembly()
    for task in tasks:
        rows = case_slices(task, c.image, job.source, c.oracle.box_margin, oracle=job.attribution,
                           key_slices=c.oracle.key_slices)
        if job.propagate:
            if clip is not None:
                rows = add_key_slice_prompts(clip, rows, c.saliency, c.coarse, c.visual_prompts, c.propagation,
                                             keep_saliency=job.keep_saliency, keep_coarse=job.keep_coarse)
            yield finish_case(add_propagated_masks(segmenter, rows, c.sam, c.propagation), assembly)
            continue
        if clip is not None:
            rows = add_text_prompts(add_saliency(clip, rows, c.saliency), c.coarse, c.visual_prompts,
                                    keep_saliency=job.keep_saliency, keep_coarse=job.keep_coarse)
        yield finish_case(add_masks(segmenter, rows, c.sam, job.attribution), assembly)
