"""The README's demo: the sample volumes as a cohort, each with the prompts of the task config that
fits it, pseudo-labelled text-driven. Where BiomedCLIP cannot be had, the same pipeline runs with
boxes from the labels: those scores are an oracle-prompt upper bound for the SAM backend, not a
zero-shot result.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..config import TaskConfig, load_config
from ..domain.inputs import list_cases
from ..models.biomedclip import hub_problem
from ..storage.samples import fetch_samples
from .job import Job
from .slices import SOURCE_LABELS, SOURCE_TEXT

# The demo's settings and, by case_id prefix, the task config whose prompts fit each sample volume:
# names of configs shipped in the package (medclipsam/configs/), so an installed wheel finds them.
DEMO_CONFIG = "demo"
SAMPLE_TASKS = {"brain": "brain_tumor_mri", "breast": "breast_mri", "lung": "lung_nodule_ct"}


def demo_cohort_csv(samples: Path) -> str:
    """A cohort manifest of the sample volumes: uri, gt_uri, and the fitting task config's prompts."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case_id", "uri", "gt_uri", "prompt"])
    labels = list_cases(str(samples / "labels"))
    for case_id, uri in list_cases(str(samples / "images")).items():
        task = next((name for prefix, name in SAMPLE_TASKS.items() if case_id.startswith(prefix)), None)
        config = load_config(task) if task else None
        prompts = config.text.prompts if config and config.text else []
        writer.writerow([case_id, uri, labels.get(case_id, ""), json.dumps(prompts) if prompts else ""])
    return buffer.getvalue()


def demo_job(config: TaskConfig, output: str, cache_dir: Path | None = None,
             clip_model: str | None = None) -> tuple[Job, str | None]:
    """The demo's job on the fetched sample cohort, and why it fell back to label boxes (None if it did not)."""
    uri = clip_model or (config.text.clip_model if config.text else "")
    problem = hub_problem(uri) if uri else "the config names no CLIP model"
    root = fetch_samples(cache_dir)
    cohort = root / "cohort.csv"
    cohort.write_text(demo_cohort_csv(root))
    source = SOURCE_LABELS if problem else SOURCE_TEXT
    return Job(config, str(cohort), output, source, clip_uri=clip_model), problem
