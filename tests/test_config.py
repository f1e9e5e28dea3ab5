"""Task configs: every shipped YAML is valid; typos and wrong types name the file and key."""

from pathlib import Path

import pytest

from medclipsam.config import load_config
from medclipsam.errors import InputError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_load():
    # every YAML in configs/ is a task config, except finetune.yaml (tests/test_finetune_parts.py)
    # and the weak-stage settings weak*.yaml (tests/test_weak_parts.py)
    names = {p.stem: load_config(p) for p in CONFIGS.glob("*.yaml")
             if p.stem != "finetune" and not p.stem.startswith("weak")}
    assert set(names) >= {"demo", "breast_ultrasound", "brain_tumor_mri", "lung_xray", "lung_ct"}
    assert names["breast_ultrasound"].modality == "ultrasound"
    assert all("ultrasound" in p.lower() for p in names["breast_ultrasound"].text.prompts)
    assert names["lung_xray"].visual_prompts.type == "points" and names["lung_xray"].coarse.keep_components == 2
    assert names["lung_ct"].image.window.preset == "lung" and names["lung_ct"].sam.keep_components == 2
    assert names["brain_tumor_mri"].saliency.beta == 2.0 and names["breast_ultrasound"].saliency.beta == 1.0
    assert names["demo"].sam.backend == "litemedsam"


@pytest.mark.parametrize(
    "text,message",
    [
        ("task: t\nsam:\n  backnd: vit_b\n", r"bad\.yaml: invalid configuration: sam\.backnd: Extra inputs"),
        ("task: t\nsam:\n  threshold: high\n", r"sam\.threshold: Input should be a valid number"),
        ("task: t\nsam:\n  backend: vit_x\n", "unknown SAM backend 'vit_x'"),
        ("task: t\nimage:\n  axis: 3\n", r"image\.axis: Input should be less than or equal to 2"),
        ("task: t\nimage:\n  window: {preset: liver}\n", "unknown CT window preset 'liver'"),
        ("sam: {}\n", "task: Field required"),
        ("- a\n- b\n", "expected a mapping"),
        ("task: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_configs(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_config(path)


def test_missing_config(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
