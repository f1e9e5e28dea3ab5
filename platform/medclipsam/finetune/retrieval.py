"""Image-text retrieval accuracy as the paper reports it: top-k within batches of 50, over shuffles."""

from __future__ import annotations

import numpy as np
import torch


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, batch: int = 50, shuffles: int = 5,
                      seed: int = 0, ks: tuple[int, ...] = (1, 2)) -> dict[str, float]:
    """Top-k accuracy image->text and text->image; pair i is image i with text i.

    The pairs are shuffled, cut into batches of ``batch`` (a last batch of fewer than 2 is
    dropped), each batch is ranked on its own, and accuracies are averaged over all queries of
    all shuffles.
    """
    n = image_emb.shape[0]
    image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
    rng = np.random.default_rng(seed)
    hits = {f"{d}_top{k}": 0 for d in ("i2t", "t2i") for k in ks}
    queries = 0
    for _ in range(shuffles):
        order = torch.as_tensor(rng.permutation(n))
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            if len(idx) < 2:
                continue
            sims = image_emb[idx] @ text_emb[idx].T
            target = torch.arange(len(idx))
            for direction, scores in (("i2t", sims), ("t2i", sims.T)):
                # rank of the true match: how many candidates score strictly higher
                rank = (scores > scores[target, target][:, None]).sum(dim=1)
                for k in ks:
                    hits[f"{direction}_top{k}"] += int((rank < k).sum())
            queries += len(idx)
    return {key: value / queries for key, value in hits.items()} if queries else {key: float("nan") for key in hits}
