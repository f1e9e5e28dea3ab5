"""M2IB saliency (multi-modal information bottleneck), batched over images.

A bottleneck after vision block L keeps, per token and feature, a fraction lambda = sigmoid(alpha)
of the signal and replaces the rest with noise: Z = lambda * x + (1 - lambda) * eps, eps ~ N(0, 1).
Per image, alpha (tokens x hidden, initialised to 5) minimises

    beta * mean(KL) - mean over noise copies of cos(text embedding, image embedding(Z)),
    KL = -1/2 (1 + log sigma^2 - mu^2 - sigma^2), mu = lambda * x, sigma = 1 - lambda,

with Adam. The map is the KL summed over hidden features, prefix (CLS) tokens dropped, on the
patch grid. As in the published code, the map comes from the last forward pass, i.e. from alpha
after ``steps - 1`` updates (the final update is never used, so it is not computed here).

Batching: each image has its own alpha and its loss depends on nothing else, so summing the
losses gives every alpha the gradient it would get alone, and Adam acts element by element.
Every image sees the same noise sequence (one generator seeded with ``seed``), so an image's map
does not depend on the batch it is in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import SaliencyConfig
from .vision_split import VisionSplit


def kl_elements(lam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Element-wise KL( N(lambda x, (1 - lambda)^2) || N(0, 1) )."""
    mu = lam * x
    var = (1.0 - lam) ** 2
    return -0.5 * (1.0 + torch.log(var) - mu**2 - var)


def bottleneck_terms(
    split: VisionSplit, tokens: torch.Tensor, alpha: torch.Tensor, noise: torch.Tensor, text: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL ``BxNxD``, cosine ``BxC`` and loss ``B`` for tokens ``BxNxD``, alpha ``BxNxD``, noise ``CxNxD``."""
    b, n, d = tokens.shape
    copies = noise.shape[0]
    lam = torch.sigmoid(alpha)
    z = lam[:, None] * tokens[:, None] + (1.0 - lam[:, None]) * noise[None]
    emb = split.suffix(z.reshape(b * copies, n, d)).reshape(b, copies, -1)
    cos = F.cosine_similarity(emb, text.to(emb.dtype)[None, None], dim=-1)
    kl = kl_elements(lam, tokens)
    loss = beta * kl.mean(dim=(1, 2)) - cos.mean(dim=1)
    return kl, cos, loss


def m2ib_maps(split: VisionSplit, pixels: torch.Tensor | None, text: torch.Tensor, params: SaliencyConfig,
              tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Saliency on the patch grid, ``B x gh x gw`` (not normalised), for normalised pixels ``Bx3xSxS``.

    ``tokens``: the image tower's output after the bottleneck layer (``split.prefix(pixels)``), when
    the caller has it already; they depend only on the image and the layer.
    """
    if tokens is None:
        with torch.no_grad():
            tokens = split.prefix(pixels)
    alpha = torch.full_like(tokens, params.init, requires_grad=True)
    optimiser = torch.optim.Adam([alpha], lr=params.lr)
    generator = torch.Generator(device=tokens.device).manual_seed(params.seed)
    shape = (params.copies, *tokens.shape[1:])
    for _ in range(params.steps - 1):
        noise = torch.randn(shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
        _, _, loss = bottleneck_terms(split, tokens, alpha, noise, text, params.beta)
        optimiser.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimiser.step()
    with torch.no_grad():
        kl = kl_elements(torch.sigmoid(alpha), tokens)
        per_token = kl.sum(dim=-1)[:, split.num_prefix_tokens :]
        return per_token.reshape(tokens.shape[0], *split.grid_size)
