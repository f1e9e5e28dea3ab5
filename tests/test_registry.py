"""The promotion gate, pinned model versions and secrets, against a real ``mlflow server`` (sqlite
backend, artifacts on the moto S3 server) with small CLIP models registered as fine-tuning does.

Four tiny BiomedCLIP-shaped models with different random weights are versions 1-4 of one
registered model, and version 5 is a copy of version 2's weights (a tie). The evaluation set is
four labelled disc images; every evaluation runs the text-driven pipeline with LiteMedSAM.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from disc_cohort import disc_images
from registry_models import SECRET_MARKERS, register_clip
from tiny_clip import save_tiny_biomedclip

from medclipsam.cli import main
from medclipsam.config import parse_config

NAME = "tiny-clip"
PROMPT = "a bright round disc"
# M2IB at 2 steps of 2 copies, not 10 of 10: a gate's evaluation is the same pipeline at any setting,
# and each version's evaluation then takes seconds, not half a minute
TASK = {"task": "discs", "text": {"prompts": [PROMPT]}, "saliency": {"steps": 2, "copies": 2}}
OUTPUTS: list[str] = []  # everything the commands printed, checked for secrets at the end


def invoke(args: list[str]):
    result = CliRunner().invoke(main, args)
    OUTPUTS.append(result.output)  # stdout and stderr
    return result


@pytest.fixture(scope="module")
def reg(mlflow_server, tmp_path_factory):
    from mlflow import MlflowClient

    uri, artifacts, log = mlflow_server
    root = tmp_path_factory.mktemp("registry")
    folders = [save_tiny_biomedclip(root / f"clip-seed{seed}", seed=seed) for seed in range(4)]
    versions = [register_clip(folder, NAME, uri) for folder in folders]
    versions.append(register_clip(folders[1], NAME, uri))  # v5: the same weights as v2
    assert versions == ["1", "2", "3", "4", "5"]
    data = disc_images(root / "eval", 4, size=64, seed=3)
    task = root / "task.yaml"
    task.write_text(yaml.safe_dump(TASK))
    return SimpleNamespace(uri=uri, artifacts=artifacts, log=log, root=root, folders=folders, data=data, task=task,
                           work=root / "evaluations", client=MlflowClient(uri))


def promote(reg, version: str, *extra: str):
    return invoke(["models", "promote", NAME, "--version", version, "--eval-set", str(reg.data), "--config",
                   str(reg.task), "--work-dir", str(reg.work), "--tracking-uri", reg.uri, *extra])


def holder(reg) -> str | None:
    try:
        return reg.client.get_model_version_by_alias(NAME, "champion").version
    except Exception:
        return None


def recorded_scores(reg) -> dict[str, float]:
    """The DSC each version got on the evaluation set, from its tags (one evaluation key here)."""
    scores = {}
    for v in reg.client.search_model_versions(f"name = '{NAME}'"):
        keys = [k for k in v.tags if k.startswith("medclipsam.eval.") and k.endswith(".dsc")]
        assert len(keys) <= 1
        if keys:
            scores[v.version] = float(v.tags[keys[0]])
    return scores


def direct_score(reg, folder: Path, output: Path) -> float:
    """The mean DSC of a model folder (not the registry), through run_job: the gate's reference."""
    from medclipsam.pipeline.job import Job
    from medclipsam.pipeline.run import run_job

    config = parse_config({**TASK, "text": {"prompts": [PROMPT], "clip_model": str(folder)}})
    result = run_job(Job(config, str(reg.data / "images"), str(output), "text", str(reg.data / "labels")),
                     "local", track=False, resume=False)
    return sum(r.dsc if math.isfinite(r.dsc) else 0.0 for r in result.records) / 4


def test_eval_set_must_be_labelled(tmp_path):
    from medclipsam.errors import InputError
    from medclipsam.registry.evalset import read_eval_set

    with pytest.raises(InputError, match="an evaluation set is a cohort manifest"):
        read_eval_set(str(tmp_path))
    data = disc_images(tmp_path / "set", 3, size=64)
    (data / "labels" / "c1.png").unlink()
    with pytest.raises(InputError, match=r"the evaluation set .* no ground truth for c1"):
        read_eval_set(str(data))
    manifest = tmp_path / "set.csv"
    manifest.write_text(f"case_id,uri,gt_uri\nc0,{data}/images/c0.png,{data}/labels/c0.png\n"
                        f"c2,{data}/images/c2.png,{tmp_path}/gone.png\n")
    with pytest.raises(InputError, match=r"gone\.png: no such file"):
        read_eval_set(str(manifest))


def test_gate_promotes_only_a_better_version(reg):
    from medclipsam.registry.evalset import read_eval_set

    first = promote(reg, "1")
    assert first.exit_code == 0, first.output
    assert "promoted: tiny-clip@champion -> v1 (no version held the alias" in first.output
    assert holder(reg) == "1"

    outcomes = {}
    for candidate in ("3", "2", "4"):
        before = holder(reg)
        result = promote(reg, candidate)
        assert result.exit_code in (0, 3), result.output
        outcomes[candidate] = (before, result.exit_code, holder(reg))
    scores = recorded_scores(reg)
    assert set(scores) == {"1", "2", "3", "4"}
    for candidate, (before, code, after) in outcomes.items():
        wins = scores[candidate] - scores[before] >= 0.01 and scores[candidate] > scores[before]
        assert (code, after) == ((0, candidate) if wins else (3, before)), (candidate, scores)
        tags = reg.client.get_model_version(NAME, candidate).tags
        assert tags["medclipsam.promotion.champion.decision"] == ("promoted" if wins else "kept")
        assert float(tags["medclipsam.promotion.champion.candidate_dsc"]) == pytest.approx(scores[candidate], abs=1e-6)
        assert float(tags["medclipsam.promotion.champion.holder_dsc"]) == pytest.approx(scores[before], abs=1e-6)
        assert tags["medclipsam.promotion.champion.holder_version"] == before
        assert tags["medclipsam.promotion.champion.eval_set"] == str(reg.data)
        run = reg.client.get_run(tags["medclipsam.promotion.champion.run_id"])
        assert run.data.metrics["candidate_dsc"] == pytest.approx(scores[candidate], abs=1e-6)
        assert run.data.params["holder_version"] == before and run.data.tags["decision"] == tags[
            "medclipsam.promotion.champion.decision"]
    decisions = [code for _, code, _ in outcomes.values()]
    assert 0 in decisions and 3 in decisions, scores  # both a win and a refusal happened
    assert holder(reg) == max(scores, key=scores.get)

    # The recorded scores are the pipeline's: a version against a run of its folder, outside the registry
    assert scores["3"] == pytest.approx(direct_score(reg, reg.folders[2], reg.root / "direct-3"), abs=1e-6)

    # The evaluation set's hash is of its content: a changed label changes it
    sha = reg.client.get_model_version(NAME, "2").tags["medclipsam.promotion.champion.eval_set_sha256"]
    assert sha == read_eval_set(str(reg.data)).sha256
    changed = reg.root / "eval-changed"
    shutil.copytree(reg.data, changed)
    label = changed / "labels" / "c0.png"
    label.write_bytes(label.read_bytes() + b"\0")
    assert read_eval_set(str(changed)).sha256 != sha

    # A tie (v5 has v2's weights) is not a win
    if holder(reg) != "2":
        assert promote(reg, "2", "--margin", "0").exit_code == 0
    tie = promote(reg, "5", "--margin", "0")
    assert tie.exit_code == 3 and holder(reg) == "2", tie.output
    assert recorded_scores(reg)["5"] == scores["2"]
    assert "does not beat v2" in tie.output


def test_force_needs_a_reason_and_records_it(reg):
    start = holder(reg)
    bare = invoke(["models", "promote", NAME, "--version", "3", "--force", "--tracking-uri", reg.uri])
    assert bare.exit_code == 2 and "--force needs --reason" in bare.output
    assert holder(reg) == start
    forced = invoke(["models", "promote", NAME, "--version", "3", "--force", "--reason", "rollback drill",
                     "--tracking-uri", reg.uri])
    assert forced.exit_code == 0, forced.output
    assert holder(reg) == "3"
    tags = reg.client.get_model_version(NAME, "3").tags
    assert tags["medclipsam.promotion.champion.decision"] == "forced"
    assert tags["medclipsam.promotion.champion.reason"] == "forced: rollback drill"
    assert tags["medclipsam.promotion.champion.holder_version"] == start
    listing = invoke(["models", "list", NAME, "--tracking-uri", reg.uri])
    assert listing.exit_code == 0
    assert "@champion" in next(line for line in listing.output.splitlines() if line.startswith("v3 "))
    assert "promotion @champion: forced" in listing.output and "score [" in listing.output
    assert "promotion-lock" not in invoke(["models", "list", "--tracking-uri", reg.uri]).output


def test_concurrent_promotions_end_on_the_better(reg, monkeypatch):
    """v1 and v2 are promoted together against the worst holder. The better one moves the alias
    first; the worse one, which also beat the old holder, must notice and lose to the new one."""
    from medclipsam.registry import gate
    from medclipsam.registry.evalset import read_eval_set
    from medclipsam.registry.version_scores import EvalPlan

    scores = recorded_scores(reg)
    worst = min(("1", "2", "3", "4"), key=scores.get)
    better, worse = sorted((v for v in ("1", "2", "3", "4") if v != worst), key=scores.get)[-1:-3:-1]
    assert scores[better] > scores[worse] > scores[worst]
    gate.promote(reg.client, gate.Request(NAME, worst, force=True, reason="concurrency test"), None)
    assert holder(reg) == worst

    evaluation, task = read_eval_set(str(reg.data)), parse_config(yaml.safe_load(reg.task.read_text()))
    first_done = threading.Event()

    class BetterFirst(gate.AliasLock):  # the interleaving that would leave the alias on the worse one
        def __enter__(self):
            if threading.current_thread().name == "worse":
                first_done.wait(300)
            return super().__enter__()

    monkeypatch.setattr(gate, "AliasLock", BetterFirst)
    decisions, said, errors = {}, {"better": [], "worse": []}, []

    def run(role: str, version: str) -> None:
        try:
            work = reg.root / f"work-{role}"
            shutil.copytree(reg.work, work)  # each thread its own copy of the evaluations done so far
            plan = EvalPlan(NAME, "clip", evaluation, reg.uri, task, work_dir=str(work))
            decisions[role] = gate.promote(reg.client, gate.Request(NAME, version, margin=0.0), plan,
                                           say=said[role].append)
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            if role == "better":
                first_done.set()

    threads = [threading.Thread(target=run, args=(role, v), name=role) for role, v in
               (("worse", worse), ("better", better))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert holder(reg) == better
    assert decisions["better"].outcome == "promoted" and decisions["better"].holder == worst
    assert decisions["worse"].outcome == "kept" and decisions["worse"].holder == better
    assert any(f"moved from v{worst} to v{better}" in line for line in said["worse"])


def test_lock_excludes_and_expires(reg):
    import time

    from medclipsam.registry.lock import AliasLock

    order = []
    entered = threading.Event()

    def hold():
        with AliasLock(reg.client, "lock-test"):
            entered.set()
            order.append("a in")
            time.sleep(1.0)
            order.append("a out")

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(30)
    with AliasLock(reg.client, "lock-test"):
        order.append("b in")
    thread.join()
    assert order == ["a in", "a out", "b in"]
    # A lock left by a dead process (its expiry passed) is taken over
    reg.client.create_registered_model("lock-test.promotion-lock", tags={"medclipsam.lock": "dead", "expires": "1"})
    start = time.monotonic()
    with AliasLock(reg.client, "lock-test", timeout=30):
        pass
    assert time.monotonic() - start < 10


def test_run_records_the_resolved_version(reg):
    from medclipsam.errors import InputError
    from medclipsam.models.checkpoints import sha256_of
    from medclipsam.pipeline.job import Job
    from medclipsam.pipeline.run import run_job
    from medclipsam.registry import gate

    gate.promote(reg.client, gate.Request(NAME, "4", force=True, reason="pinning test"), None)
    config = parse_config({**TASK, "text": {"prompts": [PROMPT], "clip_model": f"models:/{NAME}@champion"},
                           "tracking": {"uri": reg.uri, "experiment": "tests-pinning"}})
    output = reg.root / "pinned-run"
    job = Job(config, str(reg.data / "images"), str(output), "text", str(reg.data / "labels"))
    result = run_job(job, "local")
    weights = sha256_of(str(reg.folders[3] / "open_clip_pytorch_model.bin"))

    def check() -> None:
        rows = pq.read_table(output / "manifest.parquet").to_pylist()
        assert {(r["clip_model"], r["clip_sha256"]) for r in rows} == {(f"models:/{NAME}/4", weights)}
        run_file = json.loads((output / "run.json").read_text())
        assert run_file["models"] == [{"role": "clip", "requested": f"models:/{NAME}@champion",
                                       "uri": f"models:/{NAME}/4", "version": "4", "sha256": weights}]
        params = reg.client.get_run(result.run_id).data.params
        assert params["model.clip.version"] == "4" and params["model.clip.sha256"] == weights
        assert params["model.clip.requested"] == f"models:/{NAME}@champion"
        assert params["text.clip_model"] == f"models:/{NAME}/4"

    check()
    gate.promote(reg.client, gate.Request(NAME, "2", force=True, reason="the alias moves on"), None)
    check()  # the records still name version 4
    with pytest.raises(InputError, match=rf"now names models:/{NAME}/2\. Pass models:/{NAME}/4 to resume"):
        run_job(job, "local")


def test_gate_promotes_registered_pipelines(reg):
    """Pipelines are promoted like models: two pipelines that differ only in the pinned CLIP version
    score exactly what those CLIP versions scored with the same task config."""
    clip_scores = recorded_scores(reg)
    for clip in ("1", "2"):
        registered = invoke(["models", "register-pipeline", "discs-pipe", "--config", str(reg.task), "--clip-model",
                             f"models:/{NAME}/{clip}", "--tracking-uri", reg.uri])
        assert registered.exit_code == 0, registered.output
        assert f"registered models:/discs-pipe/{clip}" in registered.output
    common = ["--eval-set", str(reg.data), "--margin", "0", "--tracking-uri", reg.uri]
    with_config = invoke(["models", "promote", "discs-pipe", "--version", "1", "--config", str(reg.task), *common])
    assert with_config.exit_code == 2 and "brings its own config" in with_config.output
    assert invoke(["models", "promote", "discs-pipe", "--version", "1", *common]).exit_code == 0
    second = invoke(["models", "promote", "discs-pipe", "--version", "2", *common])
    tags = reg.client.get_model_version("discs-pipe", "2").tags
    assert float(tags["medclipsam.promotion.champion.candidate_dsc"]) == pytest.approx(clip_scores["2"], abs=1e-6)
    assert float(tags["medclipsam.promotion.champion.holder_dsc"]) == pytest.approx(clip_scores["1"], abs=1e-6)
    wins = clip_scores["2"] > clip_scores["1"]
    assert second.exit_code == (0 if wins else 3), second.output
    assert reg.client.get_model_version_by_alias("discs-pipe", "champion").version == ("2" if wins else "1")


def test_artifacts_on_s3_and_no_secret_anywhere(reg):
    """Runs last: the models' files went to the S3 server, and no marker secret reached any record."""
    import boto3

    bucket, prefix = reg.artifacts.removeprefix("s3://").split("/", 1)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert sum(k.endswith("open_clip_pytorch_model.bin") for k in keys) == 5

    texts = [*OUTPUTS, reg.log.read_text()]
    for path in reg.root.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".parquet", ".yaml", ".csv", ".log"):
            texts.append(path.read_bytes().decode("latin-1"))
    client = reg.client
    experiments = client.search_experiments()
    for run in client.search_runs([e.experiment_id for e in experiments], max_results=1000):
        texts.append(json.dumps({"params": run.data.params, "tags": run.data.tags}))
    for model in client.search_registered_models():
        texts.append(json.dumps(dict(model.tags or {})))
        for v in client.search_model_versions(f"name = '{model.name}'"):
            texts.append(json.dumps(dict(v.tags or {})) + v.source)
    assert len(texts) > 20
    for marker in SECRET_MARKERS.values():
        assert not [t[:200] for t in texts if marker in t]
