"""The ``medclipsam`` command line: one module per command group, each a thin layer over
``pipeline``, ``finetune``, ``weak`` and ``eval``. Importing it loads neither torch nor Ray; each command
imports what it needs when it runs.
"""

from __future__ import annotations

import faulthandler
import io
import logging
import os
import warnings

import click

from ..errors import MedClipSamError
from ..storage.fetch import INSECURE_ENV
from .common import fail, redact_logs, unexpected
from .data import data
from .demo import demo
from .evaluate import evaluate
from .finetune import finetune
from .models import models
from .pseudolabel import pseudolabel, report
from .segment import segment
from .tune import tune
from .weak import weak


class _Commands(click.Group):
    """The command group; an exception that escapes a command is reported as one sentence."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort,
                SystemExit, KeyboardInterrupt):
            raise
        except MedClipSamError as exc:  # one a command did not catch itself (e.g. while writing its results)
            fail(str(exc), exc.exit_code)
        except Exception as exc:  # a defect or an unforeseen environment failure, not an input error
            unexpected(exc, bool(ctx.params.get("verbose")))


def _report_native_crashes() -> None:
    """A native crash (a runtime's plugin, a driver) says where, not just an exit code; only where
    stderr is a real file (not under a test runner's captured stream)."""
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        pass


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medclipsam", message="medclipsam %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages, and show Ray's own progress and logs.")
@click.option("--allow-insecure-download", is_flag=True,
              help="Fetch model files from plain http:// URLs too (refused by default: the weights could be "
                   f"replaced on the way). Same as {INSECURE_ENV}=1.")
@click.pass_context
def main(context: click.Context, verbose: bool, allow_insecure_download: bool) -> None:
    """Text-driven and prompted medical image segmentation (MedCLIP-SAMv2)."""
    context.obj = {"verbose": verbose}
    _report_native_crashes()
    if allow_insecure_download:  # an environment variable, so Ray workers started from here see it too
        os.environ[INSECURE_ENV] = "1"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    redact_logs()
    if verbose:  # only this package's debug messages, not every library's
        logging.getLogger("medclipsam").setLevel(logging.DEBUG)
    else:
        # torch's and timm's deprecation notices say nothing a user can act on; -v shows them. In
        # the environment too, so Ray workers started from here are as quiet.
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
        # MLflow logs its store migrations and new experiments at INFO through a handler of its own
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own progress only


for command in (segment, evaluate, finetune, data, pseudolabel, report, tune, weak, models, demo):
    main.add_command(command)


if __name__ == "__main__":
    main()
