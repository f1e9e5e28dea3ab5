"""``medclipsam data``: the sample data."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import MedClipSamError
from .common import fail


@click.group()
def data() -> None:
    """Sample data."""


@data.command()
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where to keep the samples [default: $MEDCLIPSAM_CACHE or ~/.cache/medclipsam].")
@click.option("--force", is_flag=True, help="Fetch and extract again even if present.")
def samples(cache_dir: str | None, force: bool) -> None:
    """Fetch the sample MR/CT volumes with labels (pyradiomics-bhklab 3.1.4 sdist, via pip)."""
    from ..storage.samples import fetch_samples

    try:
        root = fetch_samples(Path(cache_dir) if cache_dir else None, force=force)
    except MedClipSamError as exc:
        fail(str(exc), exc.exit_code)
    for kind in ("images", "labels"):
        names = sorted(p.name for p in (root / kind).glob("*.nrrd"))
        click.echo(f"{root / kind}: {', '.join(names)}")
