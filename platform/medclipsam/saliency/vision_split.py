"""A CLIP image tower (open_clip TimmModel around a timm ViT) cut after one block.

``prefix`` runs the patch embedding and blocks ``0..layer``; ``suffix`` runs the rest up to the
projected image embedding. M2IB optimises a bottleneck between the two, so the prefix runs once
per image and only the suffix runs at every optimisation step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ModelError


class VisionSplit:
    def __init__(self, visual: torch.nn.Module, layer: int, cls_only_last_block: bool = True) -> None:
        trunk = getattr(visual, "trunk", None)
        if trunk is None or not hasattr(trunk, "blocks"):
            raise ModelError("M2IB needs an open_clip image tower wrapping a timm ViT (visual.trunk.blocks)")
        depth = len(trunk.blocks)
        if not 0 <= layer < depth:
            raise ModelError(f"M2IB layer {layer} outside 0..{depth - 1} for a {depth}-block image tower")
        self.visual, self.trunk, self.layer = visual, trunk, layer
        self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 1))
        self.grid_size = tuple(trunk.patch_embed.grid_size)
        # Only the CLS token of the last block feeds a 'token'-pooled head: skip the rest.
        self.cls_only = (
            cls_only_last_block
            and layer < depth - 1
            and getattr(trunk, "global_pool", "") == "token"
            and getattr(trunk, "attn_pool", None) is None
            and hasattr(trunk.blocks[-1], "attn")
            and hasattr(trunk.blocks[-1].attn, "qkv")
        )

    def prefix(self, pixels: torch.Tensor) -> torch.Tensor:
        """``Bx3xSxS`` normalised pixels -> tokens ``BxNxD`` after block ``layer``."""
        trunk = self.trunk
        x = trunk.patch_embed(pixels)
        x = trunk._pos_embed(x)
        x = trunk.patch_drop(x)
        x = trunk.norm_pre(x)
        for block in trunk.blocks[: self.layer + 1]:
            x = block(x)
        return x

    def suffix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``BxNxD`` after block ``layer`` -> image embeddings ``BxE`` (not normalised)."""
        trunk = self.trunk
        blocks = list(trunk.blocks[self.layer + 1 :])
        x = tokens
        if self.cls_only:
            for block in blocks[:-1]:
                x = block(x)
            x = _cls_only_block(blocks[-1], x)
        else:
            for block in blocks:
                x = block(x)
        x = trunk.norm(x)
        x = trunk.forward_head(x)
        return self.visual.head(x)


def _cls_only_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm ViT block's output for the first (CLS) token only: ``BxNxD`` -> ``Bx1xD``.

    Keys and values still come from every token; the query, attention output and MLP are
    computed for the CLS token alone.
    """
    attn = block.attn
    b, n, c = x.shape
    h = block.norm1(x)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], weight[:c], None if bias is None else bias[:c])
    kv = F.linear(h, weight[c:], None if bias is None else bias[c:])
    q = q.reshape(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = kv.reshape(b, n, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(b, 1, c)
    out = attn.proj(attn.norm(out))
    y = x[:, :1] + block.drop_path1(block.ls1(out))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))
