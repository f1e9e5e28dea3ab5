"""``medclipsam models``: the registry as a team uses it: list versions and their recorded scores,
promote a version through the evaluation gate, register a whole pipeline."""

from __future__ import annotations

import sys

import click

from ..errors import MedClipSamError
from .common import CaseProgress, fail, start_ray, task_config

tracking_option = click.option(
    "--tracking-uri", default=None,
    help="MLflow tracking/registry URI [default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working "
         "directory].")
EXIT_KEPT = 3  # the gate ran and kept the candidate out


def _client(tracking_uri: str | None):
    from ..runs.tracking import current_store, registry_client

    client = registry_client(tracking_uri)
    return client, current_store()


@click.group()
def models() -> None:
    """Registered models: list them, promote a version through the evaluation gate, register pipelines."""


@models.command("list")
@click.argument("name", required=False)
@tracking_option
def list_models(name: str | None, tracking_uri: str | None) -> None:
    """Registered models (without NAME), or NAME's versions with their aliases and recorded scores."""
    from ..registry.listing import describe_model, describe_models
    from ..runs.tracking import current_store, registry_client
    from ..storage import redact_uri

    try:
        client = registry_client(tracking_uri, read_only=True)
        lines = describe_model(client, name) if name else describe_models(client)
    except MedClipSamError as exc:
        fail(str(exc), exc.exit_code)
    click.echo(f"store: {redact_uri(current_store())}")
    for line in lines:
        click.echo(line)


@models.command()
@click.argument("name")
@click.option("--version", "version", required=True, help="The candidate version.")
@click.option("--eval-set", default=None,
              help="Labelled cases: a folder with images/ and labels/, or a cohort manifest with a gt_uri column "
                   "(path or URI). Needed unless --force.")
@click.option("--metric", type=click.Choice(["dsc", "nsd"]), default="dsc", show_default=True,
              help="Mean over the cases (a failed case counts 0); higher wins.")
@click.option("--margin", type=click.FloatRange(0.0), default=0.01, show_default=True,
              help="The candidate must beat the holder by at least this much.")
@click.option("--alias", default="champion", show_default=True, help="The alias to move.")
@click.option("--config", "config_path", default=None,
              help="CLIP models: the task config (prompts and settings) both versions run with; weak ensembles: "
                   "an optional weak YAML (its prediction section). Not for pipelines, which bring their own.")
@click.option("--force", is_flag=True, help="Move the alias without evaluating (needs --reason).")
@click.option("--reason", default="", help="Why, with --force; recorded on the version and in the MLflow run.")
@click.option("--ray", "use_ray", is_flag=True, help="Evaluate on Ray (Ray Data actor pools) instead of in-process.")
@click.option("--address", default=None, help="With --ray: the cluster address [default: a local Ray].")
@click.option("--work-dir", default=None,
              help="Keep each evaluation's masks and manifest here (a rerun resumes them) [default: temporary].")
@tracking_option
def promote(name: str, version: str, eval_set: str | None, metric: str, margin: float, alias: str,
            config_path: str | None, force: bool, reason: str, use_ray: bool, address: str | None,
            work_dir: str | None, tracking_uri: str | None) -> None:
    """Move ALIAS to VERSION of NAME only if it beats the current holder on a labelled set.

    Both versions run through the same pipeline on the same cases; the scores, the evaluation set's
    content hash and the decision are recorded on the version (tags) and in an MLflow run. Exit 0 when
    the alias holds the candidate afterwards, 3 when the gate kept it out.
    """
    if force and not reason.strip():
        fail("--force needs --reason TEXT: a forced promotion records why")
    if not force and not eval_set:
        fail("give --eval-set URI (labelled cases to compare the versions on), or --force --reason TEXT")
    from ..registry.gate import KEPT, Request
    from ..registry.gate import promote as run_gate

    progress = CaseProgress()
    try:
        request = Request(name, version, alias, metric, margin, force, reason)
        client, uri = _client(tracking_uri)
        plan = None if force else _plan(client, uri, name, version, eval_set, config_path, use_ray, address,
                                        work_dir, progress)
        decision = run_gate(client, request, plan, say=lambda line: click.echo(line, err=True))
    except MedClipSamError as exc:
        fail(str(exc), exc.exit_code)
    finally:
        progress.close()
    for score in (decision.candidate_score, decision.holder_score):
        if score is not None:
            click.echo(f"v{score.version}: DSC {score.dsc:.4f}, NSD {score.nsd:.4f} "
                       f"({score.n_cases} case(s), {score.n_failed} without a mask)")
    run = f"; MLflow run {decision.run_id}" if decision.run_id else ""
    click.echo(f"{decision.outcome}: {name}@{alias} -> v{decision.alias_holder} ({decision.reason}){run}")
    if decision.outcome == KEPT:
        sys.exit(EXIT_KEPT)


def _plan(client, uri, name, version, eval_set, config_path, use_ray, address, work_dir, progress):
    from ..registry.evalset import read_eval_set
    from ..registry.version_scores import EvalPlan, model_kind
    from ..runs.tracking import KIND_CLIP, KIND_PIPELINE, KIND_WEAK

    kind = model_kind(client, name, version)
    task = weak = None
    if kind == KIND_CLIP and config_path:
        task = task_config(config_path)
    elif kind == KIND_PIPELINE and config_path:
        fail(f"{name} is a registered pipeline: it brings its own config; drop --config")
    elif kind == KIND_WEAK and config_path:
        from ..weak.settings import load_weak_config

        weak = load_weak_config(config_path)
    evaluation = read_eval_set(eval_set)
    return EvalPlan(name, kind, evaluation, uri, task, weak, "ray" if use_ray else "local",
                    (lambda: start_ray(address)) if use_ray else None, work_dir, progress)


@models.command("register-pipeline")
@click.argument("name")
@click.option("--config", "config_path", required=True,
              help="The task config (a path, URI or packaged name): its prompts, settings and models.")
@click.option("--clip-model", default=None, help="Override the config's text.clip_model (e.g. models:/NAME@champion).")
@tracking_option
def register_pipeline(name: str, config_path: str, clip_model: str | None, tracking_uri: str | None) -> None:
    """Register a task config with every model pinned (CLIP to a registry version and weights hash, SAM to
    its weights hash) as a new version of NAME; run it with ``pseudolabel --pipeline models:/NAME/V``."""
    from ..registry.pipelines import register_pipeline as register

    try:
        config = task_config(config_path)
        if clip_model:
            if config.text is None:
                fail(f"{config_path}: --clip-model needs a config with a text section")
            config = config.model_copy(update={"text": config.text.model_copy(update={"clip_model": clip_model})})
        _client(tracking_uri)
        version, pipeline = register(name, config, config_path)
    except MedClipSamError as exc:
        fail(str(exc), exc.exit_code)
    clip, sam = pipeline.pins["clip"], pipeline.pins["sam"]
    click.echo(f"CLIP: {clip['uri']} (weights {clip['sha256'][:12]}...)")
    click.echo(f"SAM: {sam['backend']} {sam['checkpoint'] or '(default checkpoint)'} (weights {sam['sha256'][:12]}...)")
    click.echo(f"registered models:/{name}/{version}; run it with: medclipsam pseudolabel --pipeline "
               f"models:/{name}/{version} --input ... --output ...")
