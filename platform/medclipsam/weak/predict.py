"""``weak predict``: every case of a cohort through the ensemble, on Ray Data or in one process.

Per case (``predict_case``, the one stage both runners call): read the image, the mean foreground
probability of the members, mask = p > threshold written with the source geometry as ``segment``
writes masks, the binary entropy and the case's uncertainty, optional ``prob/`` and ``entropy/``
maps (``.npy``, image-shaped float32), DSC/NSD/HD95 against the ground truth when there is one,
and the case's record, written last. Cases whose record exists are skipped on a rerun; the
manifest (with an ``uncertainty`` column) is rewritten from all records at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from .. import storage
from ..domain.cohort import CohortCase, read_cohort
from ..domain.images import mask_extension, read_image, read_mask, write_mask
from ..domain.records import (
    COMPLETED,
    STATUS_ERROR,
    CaseRecord,
    read_records,
    record_from_dict,
    status_counts,
    write_manifest,
    write_record,
)
from ..errors import InputError, StorageUnavailable
from ..eval.evaluation import score_mask
from ..storage.access import check_output_folder, reading
from ..storage.outputs import MANIFEST, MASKS, RUN_FILE, absolute_output, case_file
from ..storage.registered import is_registered, resolve_registered
from ..storage.retry import stop_on_outage
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
        record.mask_uri = case_file(settings.output, MASKS, case.case_id, mask_extension(image))
        write_mask(mask, image, record.mask_uri)
        if settings.save_maps:
            _save_array(p, case_file(settings.output, PROB, case.case_id, ".npy"))
            _save_array(entropy, case_file(settings.output, ENTROPY, case.case_id, ".npy"))
        if case.gt_uri:
            try:
                scores = score_mask(mask, record.mask_uri, read_mask(case.gt_uri), settings.tolerance)
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
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)  # models:/ URIs resolve against the driver's registry
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
    records: list[CaseRecord]  # this run's
    counts: dict[str, int]  # the whole output's
    n_skipped: int
    seconds: float
    version: str = ""  # the registry version, when the model was a models:/ URI


def _settings(folder: EnsembleFolder, output: str, config: WeakConfig, threshold: float | None,
              members: str | None, save_maps: bool) -> PredictSettings:
    chosen = members or folder.manifest.get("default_members", config.ensemble.members)
    t = float(threshold if threshold is not None else folder.manifest.get("threshold", config.ensemble.threshold))
    p = config.prediction
    parameters = {"model": folder.uri, "sha256": folder.sha256, "threshold": t, "members": chosen,
                  "n_members": len(folder.members(chosen)), "tile_step_size": p.tile_step_size,
                  "use_gaussian": p.use_gaussian, "use_mirroring": p.use_mirroring}
    return PredictSettings(output, t, chosen, save_maps, p.nsd_tolerance, json.dumps(parameters, sort_keys=True))


def run_weak_predict(model: str, input_uri: str, output: str, config: WeakConfig, gt: str | None = None,
                     threshold: float | None = None, members: str | None = None, save_maps: bool = False,
                     runner: str = "ray", tracking_uri: str = "",
                     progress: Callable[[int, int, CaseRecord], None] | None = None,
                     connect: Callable[[], None] | None = None) -> WeakPredictResult:
    """Predict every case not done yet; write the manifest of the whole output.

    The cohort and the model are resolved first, so that a wrong path stops the run before
    ``connect`` joins or starts Ray (and only when there are cases to do)."""
    start = time.perf_counter()
    output = absolute_output(output)
    requested, version = model, ""
    if is_registered(model):  # pinned once: the actors load this version whatever the alias does meanwhile
        ref = resolve_registered(model)
        model, version = ref.uri, ref.version
    else:
        model = absolute_output(model)  # the actors resolve it again, from their own working directory
    with reading(input_uri, "cohort"):
        cases = read_cohort(input_uri, gt)
    if not cases:
        raise InputError(f"{input_uri}: no cases")
    check_output_folder(output)  # before the ensemble is fetched and loaded
    folder = resolve_ensemble(model)
    settings = _settings(folder, output, config, threshold, members, save_maps)
    _record_run(output, {"requested": requested, "uri": model, "version": version, "sha256": folder.sha256},
                settings)
    done = {k: r for k, r in read_records(output).items() if r.status in COMPLETED}
    todo = [c for c in cases if c.case_id not in done]
    records = []
    if todo and runner == "ray" and connect is not None:
        connect()
    storage.remove_temporaries(output)  # what writes an outage cut short left behind
    with contextlib.closing(_run(todo, model, folder, config, settings, runner, tracking_uri)) as stream:
        for number, record in enumerate(stream, start=1):
            records.append(record)
            if progress:
                progress(number, len(todo), record)
            stop_on_outage(record.case_id, record.error, output,
                           len(done) + sum(1 for r in records if r.status in COMPLETED))
    every = read_records(output)
    write_manifest([every[c.case_id] for c in cases if c.case_id in every], storage.join(output, MANIFEST))
    return WeakPredictResult(output, model, records, status_counts(every.values()), len(done),
                             time.perf_counter() - start, version)


def _record_run(output: str, model: dict, settings: PredictSettings) -> None:
    """``run.json``: the model as asked for and as pinned, and the settings; a resume must match them."""
    run_file = storage.join(output, RUN_FILE)
    if storage.exists(run_file):
        before = json.loads(storage.read_bytes(run_file))
        if before.get("settings") != json.loads(settings.parameters):
            raise InputError(f"{run_file}: this output was written with {before.get('model', {}).get('uri')} and "
                             "other settings; pass the same model and options to resume, or use a new --output")
    storage.write_bytes_atomic(run_file, json.dumps({"model": model, "settings": json.loads(settings.parameters)},
                                                    indent=2).encode())


def _run(cases: list[CohortCase], model: str, folder: EnsembleFolder, config: WeakConfig,
         settings: PredictSettings, runner: str, tracking_uri: str) -> Iterator[CaseRecord]:
    if not cases:
        return
    p = config.prediction
    device = "cuda" if p.num_gpus > 0 else "cpu"
    if runner == "local":
        ensemble = Ensemble(folder, settings.members, device, p.tile_step_size, p.use_gaussian, p.use_mirroring)
        for case in cases:
            yield predict_case(ensemble, case, settings)
        return
    import ray

    if not ray.is_initialized():
        ray.init()
    items = [{"case_id": c.case_id, "uri": c.uri, "gt_uri": c.gt_uri} for c in cases]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000)))
    ds = ds.map(EnsembleStage, fn_constructor_kwargs={"model": model, "tracking_uri": tracking_uri,
                                                      "config": config.model_dump(), "settings": settings,
                                                      "device": device},
                concurrency=p.actors, num_gpus=p.num_gpus, num_cpus=p.num_cpus)
    for row in ds.iter_rows():
        yield record_from_dict(row)
