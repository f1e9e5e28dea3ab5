"""Task configs: every shipped YAML is valid; typos and wrong types name the file and key; a bare
name finds the YAMLs shipped in the package."""

from importlib import resources
from pathlib import Path

import pytest

from medclipsam.config import TaskConfig, load_config, load_model, packaged_configs, resolve_config
from medclipsam.errors import InputError
from medclipsam.finetune.settings import FinetuneConfig, load_finetune_config
from medclipsam.weak.settings import WeakConfig, load_weak_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"  # a link to platform/medclipsam/configs, the package data
PACKAGED = Path(str(resources.files("medclipsam").joinpath("configs")))
TASK_NAMES = [n for n in packaged_configs() if n != "finetune" and not n.startswith("weak")]


def _model_of(name: str) -> type:
    """Which settings model a shipped YAML is for (README: finetune.yaml and weak*.yaml are not task configs)."""
    if name == "finetune":
        return FinetuneConfig
    return WeakConfig if name.startswith("weak") else TaskConfig


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


def test_packaged_configs_are_the_checkout_configs():
    # configs/ at the repository root is a link to the package data, so both spellings are one file set
    assert CONFIGS.is_symlink() and CONFIGS.resolve() == PACKAGED.resolve()
    names = sorted(p.stem for p in PACKAGED.glob("*.yaml"))
    assert packaged_configs() == names
    assert {"demo", "breast_ultrasound", "finetune", "weak", "weak_cpu_smoke"} <= set(names)


@pytest.mark.parametrize("name", packaged_configs())
def test_every_packaged_config_loads_with_its_model(name):
    model = _model_of(name)
    by_name = load_model(name, model)
    assert isinstance(by_name, model)
    assert by_name == load_model(PACKAGED / f"{name}.yaml", model) == load_model(f"{name}.yaml", model)
    # the commands' own loaders take the same names
    loader = {FinetuneConfig: load_finetune_config, WeakConfig: load_weak_config, TaskConfig: load_config}[model]
    assert loader(name) == by_name
    if model is TaskConfig:
        assert by_name.task  # a task config names its task
    else:  # and the other YAMLs are not task configs: they fail that model, naming the name
        with pytest.raises(InputError, match=rf"^{name}: invalid configuration"):
            load_config(name)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_bare_name_is_the_packaged_file(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the name is looked up in the package, not next to the working directory
    from_file = load_config(CONFIGS / f"{name}.yaml")
    assert load_config(name) == from_file
    assert load_config(f"{name}.yaml") == from_file
    resolved = resolve_config(name)
    assert Path(resolved).resolve() == (PACKAGED / f"{name}.yaml").resolve()
    assert load_config(resolved) == from_file


def test_resolve_keeps_paths_and_uris(tmp_path, monkeypatch):
    for uri in ("s3://bucket/configs/breast_ultrasound.yaml", "configs/breast_ultrasound.yaml",
                str(tmp_path / "breast_ultrasound.yaml")):
        assert resolve_config(uri) == uri
    # a bare name that is a file in the working directory is that file, not the packaged one
    monkeypatch.chdir(tmp_path)
    Path("breast_ultrasound.yaml").write_text("task: my_own\n")
    assert resolve_config("breast_ultrasound.yaml") == "breast_ultrasound.yaml"
    assert load_config("breast_ultrasound.yaml").task == "my_own"
    assert load_config("breast_ultrasound").task == "breast_ultrasound"


@pytest.mark.parametrize("name", ["breast_ultrasund", "nope.yaml"])
def test_unknown_name_lists_the_packaged_configs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for call in (lambda: load_config(name), lambda: resolve_config(name), lambda: load_weak_config(name)):
        with pytest.raises(InputError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"{name}: config file not found")
        assert all(n in message for n in packaged_configs())
