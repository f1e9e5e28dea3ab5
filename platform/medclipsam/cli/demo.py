"""``medclipsam demo``: the sample volumes through the Ray pipeline, with the embedded defaults."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import MedClipSamError
from .common import CaseProgress, fail, print_scores, sam_options, start_ray, summarise_run, task_config


@click.command()
@click.option("--output", default="demo_output", show_default=True, help="Output folder or URI.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Sample data cache folder.")
@click.option("--clip-model", default=None,
              help="CLIP model URI for the text-driven run, e.g. a local BiomedCLIP copy "
                   "[default: the config's text.clip_model, BiomedCLIP from the hub].")
@click.option("--address", default=None, help="Ray cluster address [default: a local Ray].")
@sam_options
def demo(output: str, cache_dir: str | None, clip_model: str | None, address: str | None, config_path: str | None,
         **overrides) -> None:
    """Pseudo-label the sample volumes with the Ray pipeline, text-driven (box prompts from labels if offline)."""
    from ..models.biomedclip import offline_help
    from ..pipeline.demo import DEMO_CONFIG, demo_job
    from ..pipeline.run import run_job

    progress = CaseProgress(every_case=True)
    try:
        config = task_config(config_path or DEMO_CONFIG, **overrides)
        job, problem = demo_job(config, output, Path(cache_dir) if cache_dir else None, clip_model)
        if problem:
            click.echo(f"BiomedCLIP is not available ({problem}): running the same Ray pipeline with box prompts "
                       f"from the labels instead (an oracle upper bound, not zero-shot). {offline_help(job.clip)} "
                       "Then: medclipsam demo --clip-model <that folder>")
        result = run_job(job, "ray", progress, connect=lambda: start_ray(address))
    except MedClipSamError as exc:
        fail(str(exc), exc.exit_code)
    finally:
        progress.close()
    print_scores(result.records)
    summarise_run(result)  # and where the report is
