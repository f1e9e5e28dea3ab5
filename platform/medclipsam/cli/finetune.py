"""``medclipsam finetune``: DHN-NCE fine-tuning of BiomedCLIP on Ray Train, registered in MLflow."""

from __future__ import annotations

import click

from ..errors import MedClipSamError
from .common import fail, joining


@click.command()
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
    from ..finetune.settings import load_finetune_config
    from ..finetune.trainer import run_finetune

    try:
        config = load_finetune_config(config_path)
        # Ray Train's workers write their checkpoints there, from any node
        joining(address, {"--storage": storage or "./finetune_runs"}, config.shared_filesystem)()
        result = run_finetune(config, pairs, workers, gpu, storage, name)
    except MedClipSamError as exc:
        fail(str(exc), exc.exit_code)
    click.echo(f"pairs used: {result.pairs_used} (dropped {result.dropped_short} short captions, "
               f"skipped {result.skipped_images} unreadable images)")
    shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if isinstance(v, float))
    click.echo(f"final epoch: {shown}")
    name = config.registry.model_name
    click.echo(f"registered {result.model_uri}; MLflow run {result.run_id}")
    click.echo(f"promote it with: medclipsam models promote {name} --version {result.version} "
               f"--eval-set LABELLED_SET --config TASK")
    click.echo(f"or use it as it is: medclipsam segment --clip-model {result.model_uri} ...")
