"""Fine-tuning parts without Ray: retrieval metrics, pairs, schedule, freezing, settings."""

import numpy as np
import pytest
import torch

from medclipsam.errors import InputError
from medclipsam.finetune.pairs import read_pairs, split_pairs
from medclipsam.finetune.retrieval import retrieval_metrics
from medclipsam.finetune.settings import load_finetune_config
from medclipsam.finetune.trainer import warmup_cosine


def brute_retrieval(v, t, order, batch, k):
    hits = {"i2t": 0, "t2i": 0}
    total = 0
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        if len(idx) < 2:
            continue
        for direction in ("i2t", "t2i"):
            for qi, q in enumerate(idx):
                scores = [float((v[q] if direction == "i2t" else t[q]) @ (t[c] if direction == "i2t" else v[c]))
                          for c in idx]
                better = sum(1 for s in scores if s > scores[qi])
                hits[direction] += better < k
        total += len(idx)
    return {d: h / total for d, h in hits.items()}


def test_retrieval_matches_brute_force():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(23, 5))
    t = v + rng.normal(scale=1.2, size=(23, 5))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    got = retrieval_metrics(torch.tensor(v), torch.tensor(t), batch=10, shuffles=2, seed=3)
    rng3 = np.random.default_rng(3)
    orders = [rng3.permutation(23) for _ in range(2)]
    for k in (1, 2):
        expected = [brute_retrieval(v, t, order, 10, k) for order in orders]
        assert got[f"i2t_top{k}"] == pytest.approx(np.mean([e["i2t"] for e in expected]))
        assert got[f"t2i_top{k}"] == pytest.approx(np.mean([e["t2i"] for e in expected]))
    perfect = retrieval_metrics(torch.eye(6), torch.eye(6), batch=50, shuffles=1)
    assert perfect == {"i2t_top1": 1.0, "i2t_top2": 1.0, "t2i_top1": 1.0, "t2i_top2": 1.0}


def test_pairs_filter_short_captions_and_split(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("img,text\na.png,short\nb.png,  a long enough caption here  \nc.png,another caption long enough\n"
                    "d.png,\n")
    table, dropped = read_pairs(str(path), "img", "text", min_caption_chars=20)
    assert dropped == 2 and table.column_names == ["image", "caption"]
    assert table["caption"].to_pylist() == ["a long enough caption here", "another caption long enough"]
    train, val = split_pairs(table, 0.5, seed=1)
    assert sorted(train["image"].to_pylist() + val["image"].to_pylist()) == ["b.png", "c.png"]
    with pytest.raises(InputError, match="missing column"):
        read_pairs(str(path), "image", "caption")


def test_warmup_then_cosine():
    factor = warmup_cosine(100, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(55) == pytest.approx(0.5) and factor(100) == pytest.approx(0.0)


def test_finetune_config_validation(tmp_path):
    from pathlib import Path

    config = load_finetune_config(str(Path(__file__).parents[1] / "configs" / "finetune.yaml"))
    assert config.loss.name == "dhn_nce" and config.loss.temperature == 0.6 and config.loss.beta1 == 0.15
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: {name: triplet}\n")
    with pytest.raises(InputError, match=r"loss\.name"):
        load_finetune_config(str(bad))
    old = tmp_path / "old.yaml"  # configs written before the promotion gate moved aliases
    old.write_text("registry: {model_name: m, alias: champion}\n")
    with pytest.raises(InputError, match=r"registry\.alias is no longer read.*medclipsam models promote"):
        load_finetune_config(str(old))


def test_a_run_ray_train_gives_up_on_is_started_once_more():
    from ray.exceptions import RayActorError
    from ray.train import ControllerError

    from medclipsam.finetune.trainer import fit_resuming

    class Trainer:
        def __init__(self, outcomes: list):
            self.outcomes, self.fits = outcomes, 0

        def __call__(self):
            return self

        def fit(self):
            self.fits += 1
            outcome = self.outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

    lost_worker = Trainer([ControllerError(RayActorError()), "resumed"])
    assert fit_resuming(lost_worker) == "resumed" and lost_worker.fits == 2
    twice = Trainer([ControllerError(RayActorError()), ControllerError(RayActorError()), "never"])
    with pytest.raises(ControllerError):  # once only: a worker that keeps dying is the run's failure
        fit_resuming(twice)
    assert twice.fits == 2
    other = Trainer([ControllerError(ValueError("a callback failed")), "never"])
    with pytest.raises(ControllerError, match="a callback failed"):
        fit_resuming(other)
    assert other.fits == 1
