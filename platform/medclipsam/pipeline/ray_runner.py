"""The Ray Data runner: the case stages wired into one streaming chain.

    cases --read (CPU tasks)--> slice rows --saliency + prompts (actor pool)-->
          --SAM (actor pool)--> --assemble + write (CPU tasks)--> one record per case

With ``--propagate`` a volume is one unit of work: one SAM actor call reads it, in text mode runs
M2IB on its sampled slices, carries the prompts through it, and hands its rows to the write tasks.

Each stage calls a function of ``slices`` / ``stages`` / ``assembly``, exactly as the
single-process runner does; this module only converts Ray batches to slice rows and back
(``rows_to_batch`` / ``batch_to_rows``) and holds the models in actors (each loads its model once).
Pool sizes, GPUs and CPUs per actor come from the config.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np

from ..config import ActorPoolConfig, CoarseMaskConfig, PipelineConfig, SaliencyConfig, SamConfig, VisualPromptConfig
from ..domain.records import CaseRecord, record_from_dict
from ..runs.ray_session import ensure_ray, pool_device
from .cpu_tasks import Contained, read_case, write_slice
from .job import Job
from .pools import pool_sizes, read_blocks
from .slices import SOURCE_TEXT, CaseTask, SliceRow
from .stages import add_key_slice_prompts, add_masks, add_propagated_masks, add_saliency, add_text_prompts

log = logging.getLogger(__name__)


# -- Ray batches <-> rows: the one place slice rows become columns and back --------------------------
def rows_to_batch(rows: list[SliceRow]) -> dict[str, np.ndarray]:
    """Slice rows as a Ray Data numpy batch (``SliceRow.to_columns``: geometry and prompts as JSON text);
    arrays of differing shapes become an object column (Ray's ragged tensors)."""
    return _columns([row.to_columns() for row in rows])


def batch_to_rows(batch: dict[str, np.ndarray]) -> list[SliceRow]:
    """A Ray Data numpy batch as slice rows (the inverse of ``rows_to_batch``)."""
    return [SliceRow.from_columns(item) for item in _batch_items(batch)]


def _batch_items(batch: dict[str, np.ndarray]) -> list[dict]:
    """A Ray Data numpy batch as one dict per row, numpy scalars as Python values."""
    names = list(batch)
    n = len(batch[names[0]]) if names else 0
    return [{name: _plain(batch[name][i]) for name in names} for i in range(n)]


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in rows[0] if rows else []:
        values = [row[name] for row in rows]
        if isinstance(values[0], np.ndarray):
            if len({(v.shape, v.dtype) for v in values}) == 1:
                out[name] = np.stack(values)
            else:
                column = np.empty(len(values), dtype=object)
                column[:] = values
                out[name] = column
        else:
            out[name] = np.asarray(values)
    return out


# -- the model stages: actors that load their model once ------------------------------------------
def _load_clip(clip_uri: str, device: str, tracking_uri: str):
    from ..models.biomedclip import load_clip

    if tracking_uri:  # a models:/ URI resolves against the driver's registry, not the worker's environment
        from ..runs.tracking import use_store

        use_store(tracking_uri)
    return load_clip(clip_uri, device)


class SaliencyStage:
    """M2IB saliency, then the coarse mask and SAM prompts (cheap, and the maps need not travel)."""

    def __init__(self, clip_uri: str, device: str, saliency: SaliencyConfig, coarse: CoarseMaskConfig,
                 visual: VisualPromptConfig, keep_saliency: bool = False, keep_coarse: bool = False,
                 tracking_uri: str = "") -> None:
        self.clip = _load_clip(clip_uri, device, tracking_uri)
        self.saliency, self.coarse, self.visual = saliency, coarse, visual
        self.keep_saliency, self.keep_coarse = keep_saliency, keep_coarse

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = add_saliency(self.clip, batch_to_rows(batch), self.saliency)
        return rows_to_batch(add_text_prompts(rows, self.coarse, self.visual, self.keep_saliency, self.keep_coarse))


def _this_node() -> str:
    """The Ray node this actor lives on (its ID, as ``ray list nodes`` shows it)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def _on_node(rows: list[SliceRow], node: str) -> list[SliceRow]:
    for row in rows:
        row.node = node
    return rows


class SamStage:
    """SAM on the slice rows; each row names the node that ran it (the case's record names them all)."""

    def __init__(self, settings: SamConfig, device: str, attribution: bool = False) -> None:
        from ..models.sam_backends import segmenter_for

        self.segmenter = segmenter_for(settings, device)
        self.settings, self.attribution = settings, attribution
        self.node = _this_node()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = add_masks(self.segmenter, batch_to_rows(batch), self.settings, self.attribution)
        return rows_to_batch(_on_node(rows, self.node))


class PropagationStage(SamStage):
    """SAM along a volume (``--propagate``): the volume is the unit of work, since each slice waits for
    the previous one's mask. The actor reads each case itself (its slices never cross the object
    store) and returns all its slice rows, masks in, for the write stage. In text mode it holds the
    CLIP model too: M2IB on the sampled slices decides where the chains start, in the same call."""

    def __init__(self, settings: SamConfig, device: str, job: Job, read=read_case, tracking_uri: str = "") -> None:
        super().__init__(settings, device)
        self.job, self.read = job, Contained(read, "read")
        self.clip = _load_clip(job.clip, device, tracking_uri) if job.source == SOURCE_TEXT else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: list[SliceRow] = []
        c = self.job.config
        for task in _batch_items(batch):
            rows = [SliceRow.from_columns(columns) for columns in self.read(task, job=self.job)]
            if self.clip is not None:
                rows = add_key_slice_prompts(self.clip, rows, c.saliency, c.coarse, c.visual_prompts, c.propagation,
                                             self.job.keep_saliency, self.job.keep_coarse)
            out.extend(add_propagated_masks(self.segmenter, rows, self.settings, c.propagation))
        return rows_to_batch(_on_node(out, self.node))


def cluster_pool_sizes(job: Job) -> dict[str, int]:
    """Actors per pool for the Ray this process is connected to (``actors: auto`` sized to it)."""
    import ray

    resources = ray.cluster_resources()
    text_pool = job.source == SOURCE_TEXT and not job.propagate  # propagated: M2IB runs in the SAM actors
    return pool_sizes(job.config.pipeline, text_pool, float(resources.get("CPU", 1.0)),
                      float(resources.get("GPU", 0.0)), {k: float(v) for k, v in resources.items()})


def _tracking_uri(job: Job) -> str:
    """The driver's MLflow store for actors that load a CLIP model (a models:/ URI), "" for none."""
    if job.source != SOURCE_TEXT:
        return ""
    from ..runs.tracking import resolve_tracking_uri  # here: MLflow's import costs each SAM actor a second

    return resolve_tracking_uri(job.config.tracking.uri)


def sam_rows_per_call(settings: SamConfig, pipeline: PipelineConfig, device: str) -> int:
    """Slices per SAM actor call: ``sam.batch_size`` (images per encoder call), at least
    ``pipeline.sam_rows_per_call``. Ray Data keeps some bookkeeping in the driver for every block,
    and each call's output is one: more slices a call, less of it per slice."""
    return max(pipeline.sam_rows_per_call or 1, settings.images_per_call(device))


def _placement(pool: ActorPoolConfig) -> dict:
    """What each actor of ``pool`` asks Ray for: its CPUs and GPUs (a GPU pool lands only on GPU
    nodes) and any custom node resources of the config."""
    resources = {"resources": dict(pool.resources)} if pool.resources else {}
    return {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, **resources}


def build_dataset(tasks: list[CaseTask], job: Job, sam_stage: type[SamStage] = SamStage, read=read_case,
                  write=write_slice, propagation_stage: type[PropagationStage] = PropagationStage):
    """The Ray Data chain for ``tasks``; lazy until iterated.

    ``sam_stage`` and ``propagation_stage`` may be subclasses, ``read`` and ``write`` wrappers of the
    CPU tasks: the seams through which tests inject faults (production code reads no test flags)."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    c = job.config
    pipeline = c.pipeline
    sizes = cluster_pool_sizes(job)
    log.info("actor pools: %s", sizes)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    tasks_at_once = TaskPoolStrategy(size=max(1, int(cpus)))
    ds = ray.data.from_items([asdict(t) for t in tasks], override_num_blocks=read_blocks(len(tasks), cpus))
    memory = {"memory": pipeline.write_memory_mb * 2**20} if pipeline.write_memory_mb else {}
    device = pool_device(pipeline.sam.num_gpus, c.sam.device)
    if job.propagate:  # one case per actor call: it reads the volume and carries the prompts through it
        ds = ds.map_batches(propagation_stage, fn_constructor_kwargs={
            "settings": c.sam, "device": device, "job": job, "read": read, "tracking_uri": _tracking_uri(job)},
            compute=ActorPoolStrategy(size=sizes["sam"]), batch_size=1, **_placement(pipeline.sam))
        return ds.flat_map(Contained(write, "write"), fn_kwargs={"settings": job.assembly()},
                           num_cpus=pipeline.task_cpus, compute=tasks_at_once, **memory)
    ds = ds.flat_map(Contained(read, "read"), fn_kwargs={"job": job}, num_cpus=pipeline.task_cpus,
                     compute=tasks_at_once)
    if job.source == SOURCE_TEXT:
        ds = ds.map_batches(SaliencyStage, fn_constructor_kwargs={
            "clip_uri": job.clip, "device": pool_device(pipeline.saliency.num_gpus, c.sam.device),
            "saliency": c.saliency, "coarse": c.coarse, "visual": c.visual_prompts, "keep_saliency": job.keep_saliency,
            "keep_coarse": job.keep_coarse, "tracking_uri": _tracking_uri(job)},
            compute=ActorPoolStrategy(size=sizes["saliency"]), batch_size=c.saliency.batch_size,
            **_placement(pipeline.saliency))
    ds = ds.map_batches(sam_stage, fn_constructor_kwargs={
        "settings": c.sam, "device": device, "attribution": job.attribution},
        compute=ActorPoolStrategy(size=sizes["sam"]), batch_size=sam_rows_per_call(c.sam, pipeline, device),
        **_placement(pipeline.sam))
    return ds.flat_map(Contained(write, "write"), fn_kwargs={"settings": job.assembly()},
                       num_cpus=pipeline.task_cpus, compute=tasks_at_once, **memory)


def run_ray(tasks: list[CaseTask], job: Job, sam_stage: type[SamStage] = SamStage, read=read_case,
            write=write_slice, propagation_stage: type[PropagationStage] = PropagationStage) -> Iterator[CaseRecord]:
    """Yield each case's record as its last slice is written (on the Ray this process is connected to)."""
    if not tasks:
        return
    ensure_ray()
    for row in build_dataset(tasks, job, sam_stage, read, write, propagation_stage).iter_rows():
        yield record_from_dict(row)  # two writers that raced to a case's last slice both yield it: the run keeps one
