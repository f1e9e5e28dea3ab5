"""``weak predict``: every case of a cohort through the ensemble, on Ray Data or in one process.

Per case (``predict_case``, the one stage both runners call): read the image, the mean foreground
probability of the members, mask = p > threshold written with the source geometry as ``segment``
writes masks, the binary entropy and the case's uncertainty, optional ``prob/`` and ``entropy/``
maps (``.npy``, image-shaped float32), DSC/NSD/HD95 against the ground truth when there is one,
and the case's record, written last. Cases whose record exists are skipped on a rerun; the
manifest (with an ``uncertainty`` column) is rewritten from all records at the end.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .. import storage
from ..domain.cohort import CohortCase, read_cohort
from ..domain.images import read_image, read_mask
from ..domain.mask_files import MaskOutput, check_dicom_sources, write_case_masks
from ..domain.records import STATUS_ERROR, WARNING_SEPARATOR, CaseRecord, record_from_dict, write_record
from ..errors import InputError, StorageUnavailable
from ..eval.evaluation import score_mask
from ..runs.case_run import CaseRun, run_cases
from ..runs.pins import ModelPin, pin_registered
from ..runs.ray_session import ensure_ray, pool_device
from ..runs.tracking import use_store
from ..storage.access import check_output_folder, reading
from ..storage.outputs import case_file
from .dataset import nnunet_input
from .ensemble import Ensemble, EnsembleFolder, resolve_ensemble
from .settings import WeakConfig
from .uncertainty import binary_entropy, case_uncertainty

PROB, ENTROPY = "prob", "entropy"
BACKEND = "nnunet-ensemble"


@dataclass(frozen=True)
class PredictSettings:
    output: str
    threshold: float
    members: str
    save_maps: bool
    tolerance: float
    parameters: str  # JSON, recorded per case
    masks: MaskOutput = field(default_factory=MaskOutput)  # the formats each mask is written in


def _save_array(array: np.ndarray, uri: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32))
    storage.write_bytes_atomic(uri, buffer.getvalue())


def predict_case(ensemble: Ensemble, case: CohortCase, settings: PredictSettings) -> CaseRecord:
    """One case through the ensemble; a failure becomes an error record (the run goes on)."""
    folder = ensemble.folder
    record = CaseRecord(case_id=case.case_id, source_uri=case.uri, gt_uri=case.gt_uri, backend=BACKEND,
                        checkpoint=folder.uri, checkpoint_sha256=folder.sha256, parameters=settings.parameters)
    try:
        start = time.perf_counter()
        image = read_image(case.uri)
        record.n_slices = image.array.shape[0] if image.is_volume else 1
        record.seconds_read = time.perf_counter() - start
        start = time.perf_counter()
        p = ensemble.probability(*nnunet_input(image), image.is_volume)
        record.seconds_predict = time.perf_counter() - start
        start = time.perf_counter()
        mask = p > settings.threshold
        entropy = binary_entropy(p)
        record.uncertainty = case_uncertainty(entropy, mask)
        written = write_case_masks(mask, image, case.uri, settings.output, case.case_id, settings.masks, p)
        record.mask_uri, record.mask_formats, record.warnings = (written.mask_uri, ",".join(written.formats),
                                                                 WARNING_SEPARATOR.join(written.warnings))
        if settings.save_maps:
            _save_array(p, case_file(settings.output, PROB, case.case_id, ".npy"))
            _save_array(entropy, case_file(settings.output, ENTROPY, case.case_id, ".npy"))
        if case.gt_uri:
            try:
                scores = score_mask(mask, record.mask_uri, read_mask(case.gt_uri, like=image),
                                    settings.tolerance)
                record.dsc, record.nsd, record.hd95 = scores.dsc, scores.nsd, scores.hd95
            except StorageUnavailable:  # not the truth's fault: the case fails, and a resume scores it
                raise
            except Exception as exc:  # the mask stands; only its scores are missing
                record.error = f"ground truth: {exc}"
        record.n_prompted_slices = int(mask.reshape(record.n_slices, -1).any(axis=1).sum())
        record.seconds_write = time.perf_counter() - start
    except Exception as exc:
        record.status, record.error = STATUS_ERROR, str(exc)
    try:
        write_record(record, settings.output)
    except Exception as exc:  # unrecorded, so a resume redoes the case; an outage stops the run
        record.status, record.error = STATUS_ERROR, f"its record could not be written: {exc}"
    return record


class EnsembleStage:
    """A Ray Data actor: loads the ensemble once, then predicts one case per row."""

    def __init__(self, model: str, tracking_uri: str, config: dict, settings: PredictSettings, device: str) -> None:
        use_store(tracking_uri or None)  # models:/ URIs resolve against the driver's registry
        p = WeakConfig.model_validate(config).prediction
        self.ensemble = Ensemble(resolve_ensemble(model), settings.members, device, p.tile_step_size,
                                 p.use_gaussian, p.use_mirroring)
        self.settings = settings

    def __call__(self, row: dict) -> dict:
        case = CohortCase(row["case_id"], row["uri"], (), row["gt_uri"])
        return asdict(predict_case(self.ensemble, case, self.settings))


@dataclass
class WeakPredictResult:
    output: str
    model: str
    records: Sequence[CaseRecord]  # this run's (read from the manifest when used)
    counts: dict[str, int]  # the whole output's
    n_skipped: int
    seconds: float
    version: str = ""  # the registry version, when the model was a models:/ URI


def _settings(folder: EnsembleFolder, output: str, config: WeakConfig, threshold: float | None,
              members: str | None, save_maps: bool, case_id_tag: str | None = None,
              gt_segment: str | None = None) -> PredictSettings:
    chosen = members or folder.manifest.get("default_members", config.ensemble.members)
    t = float(threshold if threshold is not None else folder.manifest.get("threshold", config.ensemble.threshold))
    p = config.prediction
    parameters = {"model": folder.uri, "sha256": folder.sha256, "threshold": t, "members": chosen,
                  "n_members": len(folder.members(chosen)), "tile_step_size": p.tile_step_size,
                  "use_gaussian": p.use_gaussian, "use_mirroring": p.use_mirroring}
    if case_id_tag:  # it renames the cases: a resume with another tag would mix two namings
        parameters["case_id_tag"] = case_id_tag
    if gt_segment:  # another segment is another truth
        parameters["gt_segment"] = gt_segment
    masks = MaskOutput(tuple(config.output.mask_format), config.output.segment.segment(),
                       "medclipsam weak ensemble")
    return PredictSettings(output, t, chosen, save_maps, p.nsd_tolerance, json.dumps(parameters, sort_keys=True),
                           masks)


def run_weak_predict(model: str, input_uri: str, output: str, config: WeakConfig, gt: str | None = None,
                     threshold: float | None = None, members: str | None = None, save_maps: bool = False,
                     runner: str = "ray", tracking_uri: str = "",
                     progress: Callable[[int, int, CaseRecord], None] | None = None,
                     connect: Callable[[], None] | None = None, case_id_tag: str | None = None,
                     gt_segment: str | None = None) -> WeakPredictResult:
    """Predict every case not done yet; write the manifest of the whole output.

    ``model``: a ``models:/`` URI (pinned to its version once, at the start, in MLflow's current
    store), the output folder of ``weak train``, or its ``ensemble/`` folder. The cohort and the
    model are resolved first, so that a wrong path stops the run before ``connect`` joins or starts
    Ray (and only when there are cases to do)."""
    start = time.perf_counter()
    output = storage.absolute(output)
    # pinned once: the actors load this version whatever the alias does meanwhile; a folder is made
    # absolute, since the actors resolve it again from their own working directory
    pin = pin_registered("ensemble", model) or ModelPin("ensemble", model, storage.absolute(model))
    with reading(input_uri, "cohort"):
        cases = read_cohort(input_uri, gt, case_id_tag, gt_segment)
    if not cases:
        raise InputError(f"{input_uri}: no cases")
    check_dicom_sources(MaskOutput(tuple(config.output.mask_format)), [c.uri for c in cases], probabilities=True)
    check_output_folder(output)  # before the ensemble is fetched and loaded
    folder = resolve_ensemble(pin.uri)
    pin = replace(pin, sha256=folder.sha256)
    settings = _settings(folder, output, config, threshold, members, save_maps, case_id_tag, gt_segment)
    outcome = run_cases(CaseRun(output, settings.parameters, (pin,)), cases,
                        lambda todo: _run(todo, pin.uri, folder, config, settings, runner, tracking_uri),
                        progress=progress, connect=connect if runner == "ray" else None)
    return WeakPredictResult(output, pin.uri, outcome.new, outcome.counts, outcome.n_skipped,
                             time.perf_counter() - start, pin.version)


def _run(cases: list[CohortCase], model: str, folder: EnsembleFolder, config: WeakConfig,
         settings: PredictSettings, runner: str, tracking_uri: str) -> Iterator[CaseRecord]:
    if not cases:
        return
    p = config.prediction
    device = pool_device(p.num_gpus)
    if runner == "local":
        ensemble = Ensemble(folder, settings.members, device, p.tile_step_size, p.use_gaussian, p.use_mirroring)
        for case in cases:
            yield predict_case(ensemble, case, settings)
        return
    import ray

    ensure_ray()
    items = [{"case_id": c.case_id, "uri": c.uri, "gt_uri": c.gt_uri} for c in cases]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000)))
    ds = ds.map(EnsembleStage, fn_constructor_kwargs={"model": model, "tracking_uri": tracking_uri,
                                                      "config": config.model_dump(), "settings": settings,
                                                      "device": device},
                compute=ray.data.ActorPoolStrategy(size=p.actors), num_gpus=p.num_gpus, num_cpus=p.num_cpus)
    for row in ds.iter_rows():
        yield record_from_dict(row)
