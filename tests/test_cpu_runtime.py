"""SAM on OpenVINO and ONNX Runtime: the same embeddings, decoder outputs and masks as torch for the
real LiteMedSAM and a seeded random segment_anything ViT (ViT-B's blocks, two deep), one export per weights
(reused from the cache, redone when the weights change or the cached file does not match its
record), and torch with one warning line whenever a runtime is missing or an export fails.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from medclipsam.config import SamConfig
from medclipsam.models import cpu_runtime
from medclipsam.models.sam_backends import build_segmenter, segmenter_for
from medclipsam.prompts.types import SlicePrompts
from medclipsam.segment.sam import segment_images

RUNTIMES = ("openvino", "onnxruntime")


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    """Exports made by this module go to a folder of its own (the user's cache is left alone)."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("cache")
        patch.setattr(cpu_runtime, "CACHE_DIR", folder)
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


def records(folder: Path) -> list[dict]:
    """The records of the exports in a cache folder."""
    return [json.loads(p.read_text()) for p in sorted((folder / "encoders").glob("*.json"))]


def _kinds(folder: Path) -> list[tuple[str, str]]:
    return sorted((r["key"].split("|")[-1], r["variant"]) for r in records(folder))


@pytest.fixture(scope="module")
def lite_runtimes(export_cache):
    torch_model = build_segmenter("litemedsam")
    fast = {name: build_segmenter("litemedsam", runtime=name) for name in RUNTIMES}
    return torch_model, fast, _kinds(export_cache)


def test_litemedsam_embeddings_and_masks_equal_torch(lite_runtimes, export_cache):
    reference, fast, kinds = lite_runtimes
    # one export of the encoder, shared by both runtimes; TinyViT takes its batch as a Python int
    assert kinds == [("encoder 256", "one image")]
    images = scenes(3)
    expected = [e.features for e in reference.embed(images)]
    for name, segmenter in fast.items():
        assert segmenter.runtime == name and segmenter.encode is not segmenter.image_encoder
        got = [e.features for e in segmenter.embed(images)]
        for a, b in zip(expected, got, strict=True):
            assert b.shape == a.shape == (1, 256, 64, 64) and b.dtype == torch.float32
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
        _same_masks(reference, segmenter, images)
    assert ("decoder multimask=False", "prompt axes") in _kinds(export_cache)  # made on the first decode


def test_the_decoder_on_onnxruntime_equals_torch_for_every_prompt_shape(lite_runtimes):
    reference, fast, _ = lite_runtimes
    segmenter = fast["openvino"]
    (image,) = scenes(1)
    (a,) = reference.embed([image])
    (b,) = segmenter.embed([image])
    b = type(b)(a.features, b.original_size)  # the same embedding in both: the decoder alone is compared
    boxes = np.array([[45.0, 25.0, 140.0, 100.0], [20.0, 20.0, 90.0, 120.0], [100.0, 40.0, 180.0, 140.0]])
    points = np.array([[[90.0, 60.0], [30.0, 130.0]]] * 3)
    labels = np.array([[1, 0]] * 3)
    shapes = [dict(boxes=boxes[:1]), dict(boxes=boxes, points=points, point_labels=labels),
              dict(points=points[:1], point_labels=labels[:1]), dict(boxes=boxes[:2], multimask=True)]
    for kwargs in shapes:
        p_ref, iou_ref = reference.decode(a, **kwargs)
        p_got, iou_got = segmenter.decode(b, **kwargs)
        assert p_got.shape == p_ref.shape and iou_got.shape == iou_ref.shape
        np.testing.assert_allclose(iou_got, iou_ref, atol=1e-4)
        logit = np.log(p_ref) - np.log1p(-p_ref)
        clear = np.abs(logit) > 1e-3
        np.testing.assert_array_equal((p_ref > 0.5)[clear], (p_got > 0.5)[clear])
        np.testing.assert_allclose(p_got, p_ref, atol=1e-4)
    assert set(segmenter._decoders) == {False, True} and all(segmenter._decoders.values())


def test_openvino_in_bf16_runs_the_decoder_too_and_keeps_the_masks(lite_runtimes, export_cache):
    reference, _, _ = lite_runtimes
    before = cpu_runtime.stats["exports"]
    half = build_segmenter("litemedsam", runtime="openvino", precision="bf16")
    assert cpu_runtime.stats["exports"] == before  # the fp32 export is compiled in bf16, not exported again
    assert cpu_runtime.decoder_runtime("openvino", "bf16") == ("openvino", "bf16")
    assert cpu_runtime.decoder_runtime("onnxruntime", "bf16") == ("onnxruntime", "fp32")  # ORT has no bf16 here
    assert cpu_runtime.decoder_runtime("torch", "bf16") is None
    images = scenes(3)
    agree = []  # DSC of each bf16 mask with torch's (sam_cpu.py's real slices: 99.994 % identical pixels)
    for a, b in zip(reference.embed(images), half.embed(images), strict=True):
        assert b.features.dtype == torch.float32
        relative = float((a.features - b.features).norm() / a.features.norm())
        assert 1e-4 < relative < 0.1, relative  # bf16 (fp32 runtimes: 1e-6), and near fp32
        p_ref, _ = reference.decode(a, BOX)
        p_half, _ = half.decode(b, BOX)
        want, got = p_ref > 0.5, p_half > 0.5
        agree.append(2 * np.sum(want & got) / (want.sum() + got.sum()))
    # bf16 moves a few pixels of these noisy edges (the third scene: 100 of its 3,243, none more than
    # 5 pixels from torch's edge), the same mask otherwise
    assert min(agree) >= 0.98, agree
    decoder = half._decoders[False]
    assert isinstance(decoder, cpu_runtime.RuntimeDecoder) and isinstance(decoder.run, cpu_runtime._OpenVinoModel)


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
    before = cpu_runtime.stats["exports"]
    again = build_segmenter("litemedsam", runtime="onnxruntime")
    again.decode(again.embed(scenes(1))[0], BOX)
    assert cpu_runtime.stats["exports"] == before and again.runtime == "onnxruntime"  # from the cache
    encoders = [r for r in records(export_cache) if r["key"].endswith("encoder 256")]
    # other weights: one tensor of the encoder changed, saved in the real layout
    state = {f"{part}.{key}": value.clone() for part in ("image_encoder", "prompt_encoder", "mask_decoder")
             for key, value in getattr(reference, part).state_dict().items()}
    first = next(k for k in state if k.startswith("image_encoder.") and state[k].dtype.is_floating_point)
    state[first] = state[first] * 1.5
    path = tmp_path / "lite_changed.pth"
    torch.save(state, path)
    changed = build_segmenter("litemedsam", checkpoint=str(path), runtime="onnxruntime")
    assert changed.runtime == "onnxruntime"
    assert cpu_runtime.stats["exports"] == before + 2  # the batch-axis try, then the one-image export
    torch_changed = build_segmenter("litemedsam", checkpoint=str(path))
    images = scenes(1)
    want, got = torch_changed.embed(images)[0].features, changed.embed(images)[0].features
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert float((got - reference.embed(images)[0].features).abs().max()) > 1e-2  # the new weights are in it
    now = [r for r in records(export_cache) if r["key"].endswith("encoder 256")]
    assert len(now) == len(encoders) + 1 and {r["sha256"] for r in now} > {r["sha256"] for r in encoders}


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
    before = cpu_runtime.stats["exports"]
    first, used = cpu_runtime.fast_encoder(encoder, "onnxruntime", "tiny a", 32)
    assert used == "onnxruntime" and cpu_runtime.stats["exports"] == before + 1
    (record,) = [r for r in records(export_cache) if r["key"].startswith("tiny a")]
    assert record["variant"] == "batch axis" and first.batch_axis  # a plain conv net keeps its batch axis
    path = next(p for p in (export_cache / "encoders").glob("*.onnx") if cpu_runtime.sha256_of(p) == record["sha256"])
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(first(x), encoder(x), atol=1e-5, rtol=0)
    path.write_bytes(path.read_bytes() + b"\0")  # tampered or damaged in the cache
    with caplog.at_level(logging.WARNING):
        again, used = cpu_runtime.fast_encoder(encoder, "onnxruntime", "tiny a", 32)
    assert used == "onnxruntime" and cpu_runtime.stats["exports"] == before + 2
    assert "does not match its record; exporting again" in caplog.text
    with torch.inference_mode():
        torch.testing.assert_close(again(x), encoder(x), atol=1e-5, rtol=0)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_missing_runtime_is_one_warning_and_torch(export_cache, monkeypatch, caplog):
    monkeypatch.setattr(cpu_runtime, "_importable", lambda name: name != "openvino")
    assert cpu_runtime.resolve_runtime("auto", "cpu") == "onnxruntime"  # auto takes the next one
    assert cpu_runtime.resolve_runtime("auto", "cuda:0") == "torch"
    encoder = Tiny().eval()
    with caplog.at_level(logging.WARNING):
        used_encoder, used = cpu_runtime.fast_encoder(encoder, "openvino", "tiny b", 32)
    assert used == "torch" and used_encoder is encoder
    assert _warnings(caplog) == ["SAM encoder: openvino is not installed; using torch"]


def test_a_failed_export_is_one_warning_and_torch_masks(export_cache, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(cpu_runtime, "CACHE_DIR", tmp_path)  # nothing exported yet

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
    """segment_anything's ViT-B, two blocks deep (one windowed, one global: the kinds of its twelve),
    with seeded random weights, saved as its state dict; ``vit_b`` builds that depth while it runs.

    The export and both runtimes see every operator of the full depth; twelve blocks took four
    minutes of a loaded CI machine for no other check."""
    from dataclasses import replace

    from segment_anything.build_sam import _build_sam

    from medclipsam.models import sam_backends

    def shallow():
        return _build_sam(encoder_embed_dim=768, encoder_depth=2, encoder_num_heads=12,
                          encoder_global_attn_indexes=[1])

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sam_backends.BACKENDS, "vit_b", replace(sam_backends.BACKENDS["vit_b"], build=shallow))
        torch.manual_seed(0)
        model = shallow()
        assert [block.window_size for block in model.image_encoder.blocks] == [14, 0]
        path = tmp_path_factory.mktemp("vit_b") / "sam_vit_b_random.pth"
        torch.save(model.state_dict(), path)
        yield str(path)


def test_vit_b_on_both_runtimes_equals_torch(random_vit_b_file, export_cache):
    reference = build_segmenter("vit_b", random_vit_b_file)
    before = cpu_runtime.stats["exports"]
    fast = {name: build_segmenter("vit_b", random_vit_b_file, runtime=name) for name in RUNTIMES}
    assert cpu_runtime.stats["exports"] == before + 1
    (record,) = [r for r in records(export_cache) if r["key"].startswith(f"vit_b {reference.checkpoint_sha256}")]
    assert record["variant"] == "batch axis"  # segment_anything's ViT keeps the batch symbolic
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
