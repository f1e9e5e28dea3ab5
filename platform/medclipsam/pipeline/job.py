"""What a run is asked to do, and its plan: the cases, their prompts, and the settings that decide
the masks. Everything here is checked before any model loads, so a bad input costs nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

from .. import storage
from ..config import BIOMEDCLIP_HUB, TaskConfig
from ..domain.cohort import CohortCase, read_cohort
from ..domain.images import read_header
from ..domain.mask_files import MaskOutput, check_dicom_sources
from ..errors import InputError
from ..prompts.csv_prompts import check_case_ids, group_by_case, prompts_for_case, read_box_rows, read_point_rows
from ..runs.pins import ModelPin
from ..storage.access import reading
from ..storage.fetch import check_download
from .assembly import AssemblySettings
from .slices import SOURCE_FILES, SOURCE_LABELS, SOURCE_TEXT, SOURCES, CaseTask, rows_to_json


@dataclass(frozen=True)
class Job:
    """Everything a run needs, from the task config and the command line."""

    config: TaskConfig
    input_uri: str
    output: str
    source: str = SOURCE_TEXT  # where SAM's prompts come from: text, labels or files
    gt_uri: str | None = None  # ground truth to score against (and the boxes of the labels source)
    prompts: tuple[str, ...] = ()  # overrides the config's text prompts
    clip_uri: str | None = None  # overrides the config's text.clip_model
    boxes_csv: str | None = None  # files source
    points_csv: str | None = None
    save_intermediates: bool = False  # saliency maps, coarse masks and prompts of every case
    attribution: bool = False  # also the DSC of the coarse mask and of SAM prompted by the truth's boxes
    pins: tuple[ModelPin, ...] = ()  # models pinned by the caller (a registered pipeline), recorded with the run
    case_id_tag: str | None = None  # a DICOM keyword whose value names the listed DICOM cases
    gt_segment: str | None = None  # the segment (number or label) of DICOM SEG truths that scores

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise InputError(f"unknown prompt source '{self.source}'; choose from {', '.join(SOURCES)}")
        if self.attribution and self.source != SOURCE_TEXT:
            raise InputError("stage attribution compares the text-driven stages: it needs --prompt-source text")
        if self.source == SOURCE_FILES and not (self.boxes_csv or self.points_csv):
            raise InputError("prompts from files need a boxes or a points CSV")
        if self.propagate and self.attribution:
            raise InputError("stage attribution scores every slice's coarse mask and truth-prompted SAM mask; "
                             "--propagate segments only the slices its chains reach: use one or the other")

    @property
    def propagate(self) -> bool:
        """Volumes segmented along chains from their prompted slices (``propagation.enabled``)."""
        return self.config.propagation.enabled

    @property
    def text_prompts(self) -> tuple[str, ...]:
        return self.prompts or tuple(self.config.text.prompts if self.config.text else ())

    @property
    def clip(self) -> str:
        return self.clip_uri or (self.config.text.clip_model if self.config.text else BIOMEDCLIP_HUB)

    def resolved(self) -> Job:
        """The same job with a local output folder made absolute (mask URIs must stand on their own)."""
        return replace(self, output=storage.absolute(self.output))

    def settings_record(self) -> dict:
        """What determines the masks: recorded per case, logged to MLflow, checked on resume."""
        c = self.config
        settings: dict = {"source": self.source, "image": c.image.model_dump(),
                          "sam": c.sam.model_dump(exclude={"device", "batch_size", "runtime"})}
        if self.source == SOURCE_TEXT:
            settings["text"] = {"prompts": list(self.text_prompts), "clip_model": self.clip,
                                "saliency": c.saliency.model_dump(exclude={"batch_size"}),
                                "coarse": c.coarse.model_dump(), "visual_prompts": c.visual_prompts.model_dump()}
        elif self.source == SOURCE_LABELS:
            settings["labels"] = c.oracle.model_dump(exclude=set() if c.oracle.key_slices else {"key_slices"})
        else:
            settings["files"] = {"boxes": self.boxes_csv or "", "points": self.points_csv or ""}
        if self.propagate:
            settings["propagation"] = c.propagation.model_dump()
        if self.case_id_tag:  # it renames the cases: a resume with another tag would mix two namings
            settings["case_id_tag"] = self.case_id_tag
        if self.gt_segment:  # another segment is another truth
            settings["gt_segment"] = self.gt_segment
        return settings

    def parameters(self) -> str:
        return json.dumps(self.settings_record(), sort_keys=True)

    def about(self) -> dict:
        """What the run was, for its manifest's metadata and report: the task config by name and hash,
        the input, where the prompts came from."""
        config = json.dumps(self.config.model_dump(mode="json"), sort_keys=True)
        return {"task": self.config.task, "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
                "settings_sha256": hashlib.sha256(self.parameters().encode()).hexdigest(), "input": self.input_uri,
                "gt": self.gt_uri or "", "source": self.source, "boxes": self.boxes_csv or "",
                "points": self.points_csv or "", "text_prompts": list(self.text_prompts),
                "clip_model": self.clip if self.source == SOURCE_TEXT else "",
                "nsd_tolerance": self.config.pipeline.nsd_tolerance}

    def assembly(self) -> AssemblySettings:
        return AssemblySettings(self.output, self.source, self.parameters(), self.config.pipeline.nsd_tolerance,
                                save_prompts=self.save_intermediates, min_box_fill=self.config.pipeline.min_box_fill,
                                strip_slices=self.config.pipeline.strip_slices, masks=self.mask_output(),
                                clean_3d=self.clean_3d)

    @property
    def clean_3d(self) -> tuple[int, bool] | None:
        """The 3D clean-up of a propagated volume's mask: components kept, holes filled (None: none)."""
        p = self.config.propagation
        return (p.keep_components, p.fill_holes) if p.enabled else None

    def mask_output(self) -> MaskOutput:
        """The mask formats, and what a SEG calls its segment and series (the task and the prompt source)."""
        output = self.config.output
        return MaskOutput(tuple(output.mask_format), output.segment.segment(),
                          f"medclipsam {self.config.task}: {self.source} prompts")

    @property
    def keep_saliency(self) -> bool:
        return self.save_intermediates or self.config.pipeline.save_saliency

    @property
    def keep_coarse(self) -> bool:
        return self.save_intermediates or self.attribution


def check_against_headers(cases: list[CohortCase], rows: dict, axis: int) -> None:
    """Every prompted case's rows against its image's header (size, slices, 2D or volume): a prompt
    that cannot fit is a usage error now, not an error row after the models have loaded. An image
    whose header cannot be read fails as its own case, as it would unprompted (a lone image: now)."""
    for case in cases:
        if case.case_id in rows:
            try:
                with reading(case.uri, "image"):
                    header = read_header(case.uri)
            except InputError:
                if len(cases) == 1:
                    raise
                continue
            prompts_for_case(*rows[case.case_id], header.shape, header.is_volume, axis)


def plan(job: Job) -> list[CaseTask]:
    """The job's cases with their prompts, sorted by case_id; input errors are raised here."""
    check_download(job.config.sam.checkpoint, "SAM checkpoint")
    if job.source == SOURCE_TEXT:
        check_download(job.clip, "CLIP model")
    with reading(job.input_uri, "cohort"):
        cases = read_cohort(job.input_uri, job.gt_uri, job.case_id_tag, job.gt_segment)
    rows: dict[str, str] = {}
    if job.source == SOURCE_FILES:
        boxes = read_box_rows(job.boxes_csv) if job.boxes_csv else []
        points = read_point_rows(job.points_csv) if job.points_csv else []
        check_case_ids(boxes, points, {c.case_id for c in cases})
        check_against_headers(cases, group_by_case(boxes, points), job.config.image.axis)
        by_case: dict[str, tuple[list, list]] = {c.case_id: ([], []) for c in cases}
        for kind, found in enumerate((boxes, points)):
            for row in found:
                by_case[row.case_id][kind].append(row)
        rows = {case_id: rows_to_json(*lists) for case_id, lists in by_case.items()}
    elif len(cases) == 1:  # one image: whether it can be read at all is known from its header
        read_header(cases[0].uri)
    if job.source == SOURCE_LABELS and not any(c.gt_uri for c in cases):
        raise InputError("--prompt-source labels takes its boxes from the ground truth, and no case has one: give "
                         "--gt or a gt_uri column in the manifest")
    if job.attribution and not any(c.gt_uri for c in cases):
        raise InputError("stage attribution scores against the truth: give --gt or a gt_uri column in the manifest")
    if job.source == SOURCE_TEXT:
        unprompted = [c.case_id for c in cases if not (c.prompts or job.text_prompts)]
        if unprompted:
            raise InputError(f"no text prompt for case(s) {', '.join(unprompted[:5])}: give --prompt, a config "
                             "with text.prompts, or a prompt column in the input manifest")
    check_dicom_sources(job.mask_output(), [c.uri for c in cases])
    drawn = {c.case_id for c in cases[: job.config.pipeline.overlays]}

    def sentences(case: CohortCase) -> str:
        return json.dumps(list(case.prompts or job.text_prompts)) if job.source == SOURCE_TEXT else ""

    return [CaseTask(c.case_id, c.uri, c.gt_uri, sentences(c), c.case_id in drawn, rows.get(c.case_id, ""))
            for c in cases]
