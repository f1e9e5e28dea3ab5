"""The work a search shares between its trials: two Ray actors that hold the models and caches.

``SaliencyService`` keeps the tokens before the bottleneck per (CLIP, layer, image) and every map
per (CLIP, saliency settings, sentences, image); ``SamService`` keeps SAM's embedding of every
image and decodes each trial's prompts with ``stages.add_masks``, through a segmenter whose
``embed`` answers from that cache.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ..config import SaliencyConfig, SamConfig
from ..pipeline.slices import SliceRow
from ..pipeline.stages import add_masks
from ..prompts.types import SlicePrompts

Key = tuple[str, int]  # (case_id, slice); slice -1 for a 2D image


def row_key(row: SliceRow) -> Key:
    return (row.case_id, row.slice)


class SaliencyService:
    """CLIP models, tokens and saliency maps for the search's images, each computed once."""

    def __init__(self, images: dict[Key, np.ndarray], device: str, tracking_uri: str = "") -> None:
        from ..saliency.maps import TokenCache

        if tracking_uri:  # a models:/ URI resolves against the driver's registry
            from ..runs.tracking import use_store

            use_store(tracking_uri)
        self.images, self.device = images, device
        self.clips: dict = {}
        self.tokens = TokenCache()
        self.maps: dict[tuple, np.ndarray | None] = {}
        self.computed = 0  # images M2IB ran for

    def maps_for(self, clip_uri: str, settings: dict, sentences: list[str], keys: list[Key],
                 cache: bool = True) -> dict[Key, np.ndarray | None]:
        """Maps in [0, 1] (None where M2IB found no contrast) for ``keys``."""
        from ..models.biomedclip import load_clip
        from ..saliency.maps import saliency_maps

        params = SaliencyConfig.model_validate(settings)
        what = (clip_uri, json.dumps(params.model_dump(exclude={"batch_size"}), sort_keys=True),
                json.dumps(sentences))
        missing = [k for k in keys if not cache or (what, k) not in self.maps]
        if missing:
            if clip_uri not in self.clips:
                self.clips[clip_uri] = load_clip(clip_uri, self.device)
            found = saliency_maps(self.clips[clip_uri], [self.images[k] for k in missing], sentences, params,
                                  keys=missing if cache else None, cache=self.tokens)
            self.computed += len(missing)
            for k, m in zip(missing, found, strict=True):
                self.maps[(what, k)] = None if m.constant else m.values
        return {k: self.maps[(what, k)] for k in keys}

    def m2ib_images(self) -> int:
        return self.computed


class CachedEmbeddings:
    """A SAM segmenter for ``stages.add_masks`` whose ``embed`` returns each image's embedding from a
    cache (an image is embedded alone, once), keyed by the image array the service holds."""

    def __init__(self, segmenter, rows: dict[Key, SliceRow]) -> None:
        self.segmenter = segmenter
        self.name, self.checkpoint = segmenter.name, segmenter.checkpoint
        self.checkpoint_sha256, self.device = segmenter.checkpoint_sha256, segmenter.device
        self.keys = {id(row.image): key for key, row in rows.items()}  # the rows live as long as the service
        self.embeddings: dict[Key, object] = {}
        self.cache = True

    def embed(self, images: Sequence[np.ndarray], batch_size: int = 1) -> list:
        out = []
        for image in images:
            key = self.keys[id(image)]
            if not self.cache or key not in self.embeddings:
                self.embeddings[key] = self.segmenter.embed([image], 1)[0]
            out.append(self.embeddings[key])
        return out

    def decode(self, *args, **kwargs):
        return self.segmenter.decode(*args, **kwargs)


class SamService:
    """SAM with every image embedded once; decodes the prompts each trial sends."""

    def __init__(self, rows: list[SliceRow], settings: dict, device: str) -> None:
        from ..models.sam_backends import segmenter_for

        params = SamConfig.model_validate(settings)
        self.rows = {row_key(row): row for row in rows}
        self.segmenter = CachedEmbeddings(segmenter_for(params, device), self.rows)

    def masks_for(self, prompts: dict[Key, SlicePrompts | None], settings: dict,
                  cache: bool = True) -> dict[Key, np.ndarray]:
        """SAM's mask of each slice under its prompts (all False where it has none)."""
        self.segmenter.cache = cache
        rows = add_masks(self.segmenter, [replace(self.rows[k], prompts=p) for k, p in prompts.items()],
                         SamConfig.model_validate(settings))
        failed = [row.error for row in rows if row.error]
        if failed:  # the trial fails with SAM's own error, as a trial that raised
            raise RuntimeError(failed[0])
        return {row_key(row): row.mask for row in rows}
