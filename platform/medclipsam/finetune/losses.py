"""Contrastive losses on L2-normalised image and text embeddings ``B x D``.

With S = V T^T / tau, each loss is the image->text term (rows of S) plus the text->image term
(rows of S^T), each averaged over its rows; B is the actual batch size.

- InfoNCE: mean_i [ -S_ii + log sum_j exp(S_ij) ]
- DCL (decoupled): mean_i [ -S_ii + log sum_{j != i} exp(S_ij) ]
- HN-NCE: mean_i [ -S_ii + log( exp(S_ii) + sum_{j != i} w_ij exp(S_ij) ) ]
- DHN-NCE: mean_i [ -S_ii + log sum_{j != i} w_ij exp(S_ij) ]
with hardness weights w_ij = (B - 1) exp(beta S_ij) / sum_{k != i} exp(beta S_ik), beta1 for
image->text and beta2 for text->image.
"""

from __future__ import annotations

import math

import torch

LOSSES = ("dhn_nce", "hn_nce", "dcl", "info_nce")


def _off_diagonal(scores: torch.Tensor) -> torch.Tensor:
    """``B x B`` -> ``B x (B-1)``: each row without its diagonal entry."""
    b = scores.shape[0]
    return scores.masked_select(~torch.eye(b, dtype=torch.bool, device=scores.device)).view(b, b - 1)


def _weighted_negatives(scores: torch.Tensor, beta: float) -> torch.Tensor:
    """log sum_{j != i} w_ij exp(S_ij) per row, computed stably in log space."""
    neg = _off_diagonal(scores)
    return (math.log(neg.shape[1]) + torch.logsumexp((1.0 + beta) * neg, dim=1)
            - torch.logsumexp(beta * neg, dim=1))


def _check(image_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"expected two B x D embeddings, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if image_emb.shape[0] < 2:
        raise ValueError("a contrastive loss needs a batch of at least 2 pairs")


def dhn_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float = 0.6, beta1: float = 0.15,
            beta2: float = 0.15) -> torch.Tensor:
    """Decoupled hard-negative NCE (MedCLIP-SAMv2): the positive is not in the denominator."""
    _check(image_emb, text_emb)
    scores = image_emb @ text_emb.T / temperature
    positive = scores.diagonal()
    v2t = (-positive + _weighted_negatives(scores, beta1)).mean()
    t2v = (-positive + _weighted_negatives(scores.T, beta2)).mean()
    return v2t + t2v


def hn_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float = 0.6, beta1: float = 0.15,
           beta2: float = 0.15) -> torch.Tensor:
    """Hard-negative NCE: as DHN-NCE, with the positive kept in the denominator."""
    _check(image_emb, text_emb)
    scores = image_emb @ text_emb.T / temperature
    positive = scores.diagonal()

    def term(s: torch.Tensor, beta: float) -> torch.Tensor:
        negatives = _weighted_negatives(s, beta)
        return (-positive + torch.logaddexp(positive, negatives)).mean()

    return term(scores, beta1) + term(scores.T, beta2)


def dcl(image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float = 0.6) -> torch.Tensor:
    """Decoupled contrastive loss: InfoNCE without the positive in the denominator."""
    _check(image_emb, text_emb)
    scores = image_emb @ text_emb.T / temperature
    positive = scores.diagonal()
    v2t = (-positive + torch.logsumexp(_off_diagonal(scores), dim=1)).mean()
    t2v = (-positive + torch.logsumexp(_off_diagonal(scores.T), dim=1)).mean()
    return v2t + t2v


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float = 0.6) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (sum of the two directions)."""
    _check(image_emb, text_emb)
    scores = image_emb @ text_emb.T / temperature
    positive = scores.diagonal()
    return (-positive + torch.logsumexp(scores, dim=1)).mean() + (-positive + torch.logsumexp(scores.T, dim=1)).mean()


def gather_features(image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every worker's embeddings (rank order) so the negatives are the global batch.

    Uses the differentiable all-gather: each worker's gradient reaches the worker that computed
    those embeddings, so with DDP's gradient averaging the update equals one worker on the
    global batch. Without an initialised process group (or with one worker) returns the inputs.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image_emb, text_emb
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(image_emb)), torch.cat(all_gather(text_emb))


def contrastive_loss(name: str, image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float = 0.6,
                     beta1: float = 0.15, beta2: float = 0.15) -> torch.Tensor:
    """The named loss on (optionally gathered) embeddings."""
    if name == "dhn_nce":
        return dhn_nce(image_emb, text_emb, temperature, beta1, beta2)
    if name == "hn_nce":
        return hn_nce(image_emb, text_emb, temperature, beta1, beta2)
    if name == "dcl":
        return dcl(image_emb, text_emb, temperature)
    if name == "info_nce":
        return info_nce(image_emb, text_emb, temperature)
    raise ValueError(f"unknown loss '{name}'; choose from {', '.join(LOSSES)}")
