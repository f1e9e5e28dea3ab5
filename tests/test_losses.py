"""Contrastive losses against brute-force float64 double loops, finite differences, and 2 workers."""

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from medclipsam.finetune.losses import LOSSES, contrastive_loss, dcl, dhn_nce, gather_features, hn_nce, info_nce


def brute_force(name, v, t, tau=0.6, b1=0.15, b2=0.15):
    """Per-row evaluation of the formulas with explicit loops, in float64."""
    v, t = v.astype(np.float64), t.astype(np.float64)
    n = len(v)

    def direction(a, b, beta):
        total = 0.0
        for i in range(n):
            s = [float(a[i] @ b[j]) / tau for j in range(n)]
            others = [j for j in range(n) if j != i]
            hard = sum(math.exp(beta * s[k]) for k in others)
            weighted = sum((n - 1) * math.exp(beta * s[j]) / hard * math.exp(s[j]) for j in others)
            plain = sum(math.exp(s[j]) for j in others)
            if name == "dhn_nce":
                total += -s[i] + math.log(weighted)
            elif name == "hn_nce":
                total += -s[i] + math.log(math.exp(s[i]) + weighted)
            elif name == "dcl":
                total += -s[i] + math.log(plain)
            else:
                total += -s[i] + math.log(math.exp(s[i]) + plain)
        return total / n

    return direction(v, t, b1) + direction(t, v, b2)


def unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("batch", [2, 7, 16])  # 7: a last batch smaller than the configured 16
def test_losses_equal_brute_force(name, batch):
    rng = np.random.default_rng(batch)
    v, t = unit(rng, batch, 12), unit(rng, batch, 12)
    got = contrastive_loss(name, torch.tensor(v), torch.tensor(t), 0.6, 0.15, 0.3)
    assert float(got) == pytest.approx(brute_force(name, v, t, 0.6, 0.15, 0.3), abs=1e-6)


def test_dhn_nce_public_signature_and_defaults():
    rng = np.random.default_rng(0)
    v, t = torch.tensor(unit(rng, 5, 8)), torch.tensor(unit(rng, 5, 8))
    assert float(dhn_nce(v, t)) == pytest.approx(brute_force("dhn_nce", v.numpy(), t.numpy()), abs=1e-6)
    assert float(dhn_nce(v, t, temperature=0.3, beta1=0.5, beta2=0.0)) == pytest.approx(
        brute_force("dhn_nce", v.numpy(), t.numpy(), 0.3, 0.5, 0.0), abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        dhn_nce(v[:1], t[:1])


@pytest.mark.parametrize("fn", [dhn_nce, hn_nce, dcl, info_nce])
def test_gradients_match_finite_differences(fn):
    rng = np.random.default_rng(3)
    v = torch.tensor(unit(rng, 5, 6), requires_grad=True)
    t = torch.tensor(unit(rng, 5, 6), requires_grad=True)
    assert torch.autograd.gradcheck(fn, (v, t), eps=1e-6, atol=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, images, texts, weights, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = torch.nn.Linear(images.shape[1], 4, bias=False).double()
    model.weight.data.copy_(weights)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = len(images) // world
    local = slice(rank * half, (rank + 1) * half)
    v = torch.nn.functional.normalize(ddp(images[local]), dim=-1)
    t = torch.nn.functional.normalize(texts[local], dim=-1)
    gv, gt = gather_features(v, t)
    loss = dhn_nce(gv, gt)
    loss.backward()
    out[rank] = (float(loss), model.weight.grad.clone())
    dist.destroy_process_group()


def test_two_workers_equal_one_worker_on_the_global_batch():
    rng = np.random.default_rng(5)
    images = torch.tensor(rng.normal(size=(8, 6)))
    texts = torch.tensor(rng.normal(size=(8, 4)))
    weights = torch.tensor(rng.normal(size=(4, 6)))
    model = torch.nn.Linear(6, 4, bias=False).double()
    model.weight.data.copy_(weights)
    loss = dhn_nce(torch.nn.functional.normalize(model(images), dim=-1), torch.nn.functional.normalize(texts, dim=-1))
    loss.backward()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), images, texts, weights, out), nprocs=2, join=True)
    for rank in (0, 1):
        worker_loss, grad = out[rank]
        assert worker_loss == pytest.approx(float(loss.detach()), abs=1e-12)
        torch.testing.assert_close(grad, model.weight.grad, atol=1e-12, rtol=1e-10)
