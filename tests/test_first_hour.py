"""What a new user meets first: the version, messages cut only between words, a listing that reads
the store without creating one, manifests with absolute URIs, a reader's own reason for a bad file,
and no library deprecation noise unless ``-v``."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from medclipsam.cli import main
from medclipsam.domain.cohort import read_cohort
from medclipsam.domain.images import read_image, read_mask
from medclipsam.errors import InputError, describe, shorten
from medclipsam.models.biomedclip import offline_help

WORDS = "the quick brown fox jumps over the lazy dog " * 20


@pytest.mark.parametrize("limit", [10, 37, 100, 299])
def test_shorten_cuts_between_words(limit):
    out = shorten(WORDS, limit)
    assert len(out) <= limit and out.endswith("\u2026")
    kept = out[:-1]
    assert WORDS.startswith(kept) and WORDS[len(kept)] == " "  # the next character of the text is a space
    assert kept.split()[-1] in WORDS.split()


def test_shorten_leaves_short_text_and_cuts_one_long_word():
    assert shorten("a short message", 300) == "a short message"
    assert shorten("x" * 500, 20) == "x" * 19 + "\u2026"
    long = ValueError("reason " + "word " * 200)
    assert describe(long).startswith("ValueError: reason word") and describe(long).endswith("word\u2026")


def test_version_option():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"medclipsam {importlib.metadata.version('medclipsam')}"


def test_models_list_reads_only_and_names_the_store(tmp_path, monkeypatch, tracking_uri):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    missing = CliRunner().invoke(main, ["models", "list"])
    assert missing.exit_code == 2
    assert f"no MLflow store at {empty / 'mlflow.db'}" in missing.output and "Traceback" not in missing.output
    assert list(empty.iterdir()) == []  # no mlflow.db, nothing else
    listed = CliRunner().invoke(main, ["models", "list", "--tracking-uri", tracking_uri])
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines()[:2] == [f"store: {tracking_uri}", "no registered models"]
    assert list(empty.iterdir()) == []


def test_hub_models_come_with_their_download_command():
    text = offline_help("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    assert ("`hf download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 --local-dir "
            "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`") in text


def _png(path: Path) -> Path:
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)).save(path)
    return path


def test_relative_manifest_paths_are_recorded_absolute(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "c0.png")
    _png(data / "c0_gt.png")
    (data / "cohort.csv").write_text("uri,gt_uri\nc0.png,c0_gt.png\n")
    monkeypatch.chdir(tmp_path)
    (case,) = read_cohort("data/cohort.csv")
    assert case.uri == str(data / "c0.png") and case.gt_uri == str(data / "c0_gt.png")
    (folder_case,) = read_cohort("data/c0.png", gt_uri="data")
    assert folder_case.uri == str(data / "c0.png") and os.path.isabs(folder_case.gt_uri)


def test_a_bad_png_says_why(tmp_path):
    good = _png(tmp_path / "good.png").read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    text = tmp_path / "text.png"
    text.write_text("not pixels at all")
    for reader, what in ((read_image, "image"), (read_mask, "mask")):
        with pytest.raises(InputError) as cut:
            reader(str(truncated))
        assert str(cut.value) == f"{truncated}: cannot read {what} (image file is truncated)"
        with pytest.raises(InputError) as wrong:
            reader(str(text))
        assert str(wrong.value) == f"{text}: cannot read {what} (not a PNG image, or an encoding the reader lacks)"


def test_future_warnings_only_with_v(tmp_path):
    """The default LiteMedSAM's imports (torch.jit, timm) warn with FutureWarning; -v shows them."""
    image = _png(tmp_path / "c0.png")
    (tmp_path / "boxes.csv").write_text("case_id,slice,x0,y0,x1,y1\nc0,,10,10,40,40\n")
    outputs = {}
    for flags in ([], ["-v"]):
        command = [str(Path(sys.executable).parent / "medclipsam"), *flags, "segment", "--input", str(image), "--boxes",
                   str(tmp_path / "boxes.csv"), "--output", str(tmp_path / f"out{len(flags)}")]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
        assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-1000:]}\n{done.stderr[-3000:]}"
        outputs[bool(flags)] = done.stderr
    assert "FutureWarning" not in outputs[False]
    assert "FutureWarning" in outputs[True]
