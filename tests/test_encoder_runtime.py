"""SAM's image encoder on OpenVINO and ONNX Runtime: the same embeddings and masks as torch for the
real LiteMedSAM and a seeded random ViT-B in segment_anything's layout, one export per weights
(reused from the cache, redone when the weights change or the cached file does not match its
record), and torch with one warning line whenever a runtime is missing or an export fails.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from medclipsam.config import SamConfig
from medclipsam.models import encoder_runtime
from medclipsam.models.sam_backends import build_segmenter, segmenter_for
from medclipsam.prompts.types import SlicePrompts
from medclipsam.segment.sam import segment_images

RUNTIMES = ("openvino", "onnxruntime")


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    """Exports made by this module go to a folder of its own (the user's cache is left alone)."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setattr(encoder_runtime, "CACHE_DIR", folder)
        yield folder


def scenes(n: int, h: int = 150, w: int = 190) -> list[np.ndarray]:
    """Grey images with one bright textured ellipse each, as H x W x 3 uint8."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:h, :w]
    out = []
    for i in range(n):
        inside = ((yy - 60 - 8 * i) / 30) ** 2 + ((xx - 90 + 10 * i) / 42) ** 2 <= 1
        grey = np.clip(np.where(inside, 185, 65) + rng.normal(0, 14, (h, w)), 0, 255).astype(np.uint8)
        out.append(np.repeat(grey[..., None], 3, axis=-1))
    return out


BOX = np.array([[45.0, 25.0, 140.0, 100.0]])


def _same_masks(reference, other, images, box=BOX, min_clear: float = 0.99) -> None:
    """Masks identical wherever torch's logit is clear of 0 by more than 1e-3 (``min_clear`` of the pixels
    at least: random weights leave many logits near 0)."""
    for a, b in zip(reference.embed(images), other.embed(images), strict=True):
        p_ref, _ = reference.decode(a, box)
        p_other, _ = other.decode(b, box)
        logit = np.log(p_ref) - np.log1p(-p_ref)
        clear = np.abs(logit) > 1e-3
        assert clear.mean() > min_clear
        np.testing.assert_array_equal((p_ref > 0.5)[clear], (p_other > 0.5)[clear])


@pytest.fixture(scope="module")
def lite_runtimes(export_cache):
    torch_model = build_segmenter("litemedsam")
    before = encoder_runtime.stats["exports"]
    fast = {name: build_segmenter("litemedsam", runtime=name) for name in RUNTIMES}
    return torch_model, fast, encoder_runtime.stats["exports"] - before


def test_litemedsam_embeddings_and_masks_equal_torch(lite_runtimes):
    reference, fast, exports = lite_runtimes
    assert exports == 1  # one export, shared by both runtimes
    images = scenes(3)
    expected = [e.features for e in reference.embed(images)]
    for name, segmenter in fast.items():
        assert segmenter.runtime == name and segmenter.encode is not segmenter.image_encoder
        got = [e.features for e in segmenter.embed(images)]
        for a, b in zip(expected, got, strict=True):
            assert b.shape == a.shape == (1, 256, 64, 64) and b.dtype == torch.float32
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
        _same_masks(reference, segmenter, images)


def test_batched_and_unbatched_embeddings_agree(lite_runtimes):
    reference, fast, _ = lite_runtimes
    images = scenes(3)
    for segmenter in (reference, *fast.values()):
        together = segmenter.embed(images, batch_size=3)
        alone = [segmenter.embed([image], batch_size=1)[0] for image in images]
        for a, b in zip(together, alone, strict=True):
            torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=0)


def test_the_export_is_reused_and_redone_when_the_weights_change(lite_runtimes, export_cache, tmp_path):
    reference, _, _ = lite_runtimes
    before = encoder_runtime.stats["exports"]
    again = build_segmenter("litemedsam", runtime="onnxruntime")
    assert encoder_runtime.stats["exports"] == before and again.runtime == "onnxruntime"  # from the cache
    # other weights: one tensor of the encoder changed, saved in the real layout
    state = {f"{part}.{key}": value.clone() for part in ("image_encoder", "prompt_encoder", "mask_decoder")
             for key, value in getattr(reference, part).state_dict().items()}
    first = next(k for k in state if k.startswith("image_encoder.") and state[k].dtype.is_floating_point)
    state[first] = state[first] * 1.5
    path = tmp_path / "lite_changed.pth"
    torch.save(state, path)
    changed = build_segmenter("litemedsam", checkpoint=str(path), runtime="onnxruntime")
    assert encoder_runtime.stats["exports"] == before + 1 and changed.runtime == "onnxruntime"
    torch_changed = build_segmenter("litemedsam", checkpoint=str(path))
    images = scenes(1)
    want, got = torch_changed.embed(images)[0].features, changed.embed(images)[0].features
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert float((got - reference.embed(images)[0].features).abs().max()) > 1e-2  # the new weights are in it
    assert len(list(export_cache.glob("encoders/*.onnx"))) == 2


class Tiny(torch.nn.Module):
    """A small conv encoder: the cache's logic without a real network's export time."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def test_a_cached_export_that_does_not_match_its_record_is_redone(export_cache, caplog):
    encoder = Tiny().eval()
    before = encoder_runtime.stats["exports"]
    first, used = encoder_runtime.fast_encoder(encoder, "onnxruntime", "tiny a", 32)
    assert used == "onnxruntime" and encoder_runtime.stats["exports"] == before + 1
    exported = encoder_runtime.cached_export(encoder, "tiny a", 32)
    assert exported.dynamic_batch  # a plain conv net keeps its batch axis
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(first(x), encoder(x), atol=1e-5, rtol=0)
    exported.path.write_bytes(exported.path.read_bytes() + b"\0")  # tampered or damaged in the cache
    with caplog.at_level(logging.WARNING):
        again, used = encoder_runtime.fast_encoder(encoder, "onnxruntime", "tiny a", 32)
    assert used == "onnxruntime" and encoder_runtime.stats["exports"] == before + 2
    assert "does not match its record; exporting again" in caplog.text
    with torch.inference_mode():
        torch.testing.assert_close(again(x), encoder(x), atol=1e-5, rtol=0)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_missing_runtime_is_one_warning_and_torch(export_cache, monkeypatch, caplog):
    monkeypatch.setattr(encoder_runtime, "_importable", lambda name: name != "openvino")
    assert encoder_runtime.resolve_runtime("auto", "cpu") == "onnxruntime"  # auto takes the next one
    assert encoder_runtime.resolve_runtime("auto", "cuda:0") == "torch"
    encoder = Tiny().eval()
    with caplog.at_level(logging.WARNING):
        used_encoder, used = encoder_runtime.fast_encoder(encoder, "openvino", "tiny b", 32)
    assert used == "torch" and used_encoder is encoder
    assert _warnings(caplog) == ["SAM encoder: openvino is not installed; using torch"]


def test_a_failed_export_is_one_warning_and_torch_masks(export_cache, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(encoder_runtime, "CACHE_DIR", tmp_path)  # nothing exported yet

    def broken(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::nothing' to ONNX opset version 17 is not supported.\nmore")

    monkeypatch.setattr(torch.onnx, "export", broken)
    reference = build_segmenter("litemedsam")
    with caplog.at_level(logging.WARNING):
        segmenter = segmenter_for(SamConfig(runtime="openvino", checkpoint=None))
    assert segmenter.runtime == "torch" and segmenter.encode is segmenter.image_encoder
    (line,) = _warnings(caplog)
    assert line.startswith("SAM encoder: openvino is not usable for litemedsam ") and "aten::nothing" in line
    assert "\n" not in line
    images = scenes(2)
    prompts = [SlicePrompts(boxes=BOX)] * 2
    want, _ = segment_images(reference, images, prompts)
    got, _ = segment_images(segmenter, images, prompts)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def random_vit_b_file(tmp_path_factory):
    """segment_anything's ViT-B with seeded random weights, saved as its state dict (the real layout)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    model = sam_model_registry["vit_b"](checkpoint=None)
    path = tmp_path_factory.mktemp("vit_b") / "sam_vit_b_random.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def test_vit_b_on_both_runtimes_equals_torch(random_vit_b_file, export_cache):
    reference = build_segmenter("vit_b", random_vit_b_file)
    before = encoder_runtime.stats["exports"]
    fast = {name: build_segmenter("vit_b", random_vit_b_file, runtime=name) for name in RUNTIMES}
    assert encoder_runtime.stats["exports"] == before + 1
    assert encoder_runtime.cached_export(reference.image_encoder, f"vit_b {reference.checkpoint_sha256}",
                                         1024).dynamic_batch  # segment_anything's ViT keeps the batch symbolic
    image = scenes(1)[0]
    (expected,) = reference.embed([image])
    p_ref, _ = reference.decode(expected, BOX)
    logit = np.log(p_ref) - np.log1p(-p_ref)
    clear = np.abs(logit) > 1e-3
    assert clear.mean() > 0.5  # random weights leave many logits near 0
    for name, segmenter in fast.items():
        assert segmenter.runtime == name
        together = segmenter.embed([image, image], batch_size=2)  # one call with a batch of 2
        for got in together:
            assert got.features.shape == expected.features.shape == (1, 256, 64, 64)
            torch.testing.assert_close(got.features, expected.features, atol=1e-4, rtol=0)
        p_got, _ = segmenter.decode(together[1], BOX)
        np.testing.assert_array_equal((p_ref > 0.5)[clear], (p_got > 0.5)[clear])
