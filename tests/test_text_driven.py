"""Text-driven zero-shot path with a small BiomedCLIP-shaped model saved in the real layout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from medclipsam.config import SaliencyConfig
from medclipsam.errors import ModelError
from medclipsam.models.biomedclip import BIOMEDCLIP_HUB, load_clip
from medclipsam.ops.transforms import ShortSideCrop
from medclipsam.prompts.from_saliency import coarse_mask, kmeans_foreground, visual_prompts
from medclipsam.saliency.m2ib import bottleneck_terms, kl_elements, m2ib_maps
from medclipsam.saliency.maps import normalise_map, saliency_maps
from medclipsam.saliency.vision_split import VisionSplit

FAST = SaliencyConfig(layer=9, steps=3, copies=2)


def textured(h, w, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


# -- loader ----------------------------------------------------------------------------------
def test_loader_reads_the_saved_weights_through_every_uri_form(tiny_clip_dir, clip, s3_bucket):
    from medclipsam import storage
    from medclipsam.models.checkpoints import sha256_of

    saved = torch.load(tiny_clip_dir / "open_clip_pytorch_model.bin", weights_only=True)
    for name, tensor in clip.model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name])
    assert clip.sha256 == sha256_of(str(tiny_clip_dir / "open_clip_pytorch_model.bin"))
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(str(tiny_clip_dir) + "/", f"{s3_bucket}/models/tiny/", recursive=True)
    reference = clip.text_embedding("an irregular hypoechoic mass")
    for uri in (f"local-dir:{tiny_clip_dir}", f"{s3_bucket}/models/tiny"):
        other = load_clip(uri)
        torch.testing.assert_close(other.text_embedding("an irregular hypoechoic mass"), reference)
        assert other.sha256 == clip.sha256


def test_loader_errors_name_the_uri_and_the_remedy(tmp_path, tiny_clip_dir):
    hub = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    remedy = rf"`hf download {hub} --local-dir .*`; then pass that folder"
    with pytest.raises(ModelError, match=rf"{hub}: cannot be loaded \(RuntimeError: .*\)\. .*" + remedy):
        load_clip(BIOMEDCLIP_HUB)
    with pytest.raises(ModelError, match=r"nowhere: no such directory"):
        load_clip(str(tmp_path / "nowhere"))
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("open_clip_config.json", "open_clip_pytorch_model.bin"):
        (partial / name).write_bytes((tiny_clip_dir / name).read_bytes())
    with pytest.raises(ModelError, match=r"has no config\.json for the text tower"):
        load_clip(str(partial))


def test_prompt_ensemble_is_the_normalised_mean_and_cached(clip, monkeypatch):
    prompts = ["a breast ultrasound with a dark mass", "a hypoechoic breast tumour"]
    with torch.no_grad():
        each = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(prompts)), dim=-1)
    expected = torch.nn.functional.normalize(each.mean(0), dim=-1)
    torch.testing.assert_close(clip.text_embedding(prompts), expected, atol=1e-6, rtol=1e-6)
    calls = []
    monkeypatch.setattr(clip.model, "encode_text", lambda *a, **k: calls.append(1))
    clip.text_embedding(prompts)
    assert calls == []  # served from the cache


# -- M2IB ------------------------------------------------------------------------------------
def test_split_model_equals_the_whole_image_tower(clip):
    pixels = torch.randn(2, 3, 224, 224)
    full = VisionSplit(clip.model.visual, 9, cls_only_last_block=False)
    fast = VisionSplit(clip.model.visual, 9)
    assert fast.cls_only
    with torch.no_grad():
        tokens = full.prefix(pixels)
        torch.testing.assert_close(full.suffix(tokens), clip.model.visual(pixels))
        torch.testing.assert_close(fast.suffix(tokens), full.suffix(tokens), atol=1e-5, rtol=1e-5)


def test_kl_and_loss_equal_direct_evaluation(clip):
    split = VisionSplit(clip.model.visual, 9, cls_only_last_block=False)
    with torch.no_grad():
        tokens = split.prefix(torch.randn(2, 3, 224, 224))
    gen = torch.Generator().manual_seed(1)
    alpha = torch.randn(tokens.shape, generator=gen) * 3
    noise = torch.randn((3, *tokens.shape[1:]), generator=gen)
    text = torch.nn.functional.normalize(torch.randn(64, generator=gen), dim=0)
    with torch.no_grad():
        kl, cos, loss = bottleneck_terms(VisionSplit(clip.model.visual, 9), tokens, alpha, noise, text, beta=2.0)
    lam = torch.sigmoid(alpha).double()
    x = tokens.double()
    # KL of N(lam x, (1 - lam)^2) from N(0, 1), by torch.distributions
    direct_kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(lam * x, 1 - lam), torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(kl.double(), direct_kl, atol=1e-6, rtol=1e-5)
    for b in range(2):
        cosines = []
        for c in range(3):
            z = (lam[b] * x[b] + (1 - lam[b]) * noise[c].double()).float()
            with torch.no_grad():
                emb = split.suffix(z[None])[0].double()
            cosines.append(float(emb @ text.double() / emb.norm()))
        np.testing.assert_allclose(cos[b].numpy(), cosines, atol=1e-5)
        expected = 2.0 * float(direct_kl[b].mean()) - np.mean(cosines)
        assert float(loss[b]) == pytest.approx(expected, abs=1e-4)


def test_map_is_read_before_the_final_update(clip):
    """With one step nothing is updated: the map is the KL at alpha = 5, summed over features."""
    split = VisionSplit(clip.model.visual, 9)
    pixels = torch.randn(1, 3, 224, 224)
    maps = m2ib_maps(split, pixels, clip.text_embedding("x"), SaliencyConfig(steps=1, copies=2))
    with torch.no_grad():
        tokens = split.prefix(pixels)
    expected = kl_elements(torch.sigmoid(torch.tensor(5.0)), tokens).sum(-1)[:, 1:].reshape(1, 14, 14)
    torch.testing.assert_close(maps, expected)


def test_batched_equals_one_at_a_time(clip):
    images = [textured(224, 224, 1), textured(180, 300, 2), textured(400, 120, 3), np.zeros((64, 96, 3), np.uint8)]
    images[3][20:40, 30:60] = 200
    together = saliency_maps(clip, images, "a tumour", FAST.model_copy(update={"batch_size": 4}))
    alone = [saliency_maps(clip, [image], "a tumour", FAST.model_copy(update={"batch_size": 1}))[0] for image in images]
    for a, b, image in zip(together, alone, images, strict=True):
        assert a.values.shape == image.shape[:2] and a.values.dtype == np.float32
        assert a.values.min() == 0.0 and a.values.max() == pytest.approx(1.0)
        np.testing.assert_allclose(a.values, b.values, atol=1e-5)


@pytest.mark.parametrize(("seed", "row0", "col0"), [(4, 2, 8), (5, 8, 1), (7, 0, 0)])
def test_planted_region_holds_the_maximum(clip, seed, row0, col0):
    """The text embedding is planted to match one region: what the region adds to a blank image.

    A random-weight tower carries a weak signal next to the KL term, so beta is 0.1 here.
    """
    split = VisionSplit(clip.model.visual, 9)
    rng = np.random.default_rng(seed)
    blank = torch.zeros(1, 3, 224, 224)
    image = blank.clone()
    image[..., row0 * 16 : (row0 + 4) * 16, col0 * 16 : (col0 + 4) * 16] = torch.from_numpy(
        rng.normal(0, 2, (3, 64, 64)).astype(np.float32))
    region = np.zeros((14, 14), bool)
    region[row0 : row0 + 4, col0 : col0 + 4] = True  # the 4 x 4 patches the texture covers
    with torch.no_grad():
        text = torch.nn.functional.normalize(clip.model.visual(image)[0] - clip.model.visual(blank)[0], dim=0)
    grid = m2ib_maps(split, image, text, SaliencyConfig(steps=10, copies=4, beta=0.1))[0].numpy()
    start = m2ib_maps(split, image, text, SaliencyConfig(steps=1, copies=4, beta=0.1))[0].numpy()
    row, col = np.unravel_index(np.argmax(grid), grid.shape)
    assert region[row, col], (row, col)
    # the optimisation, not the token norms alone, concentrates the map on the region
    contrast = grid[region].mean() / grid[~region].mean()
    assert contrast > 1.5 and contrast > 1.3 * (start[region].mean() / start[~region].mean())


def test_crop_geometry_maps_back_in_place():
    crop = ShortSideCrop(224)
    assert crop.resized_shape(100, 300) == (224, 672) and crop.crop_origin(100, 300) == (0, 224)
    grid = torch.zeros(1, 1, 14, 14)
    grid[0, 0, 6:8, 6:8] = 1.0  # the centre of the crop
    back = crop.invert_masks(grid, (100, 300))[0, 0].numpy()
    row, col = np.unravel_index(np.argmax(back), back.shape)
    assert abs(row - 49.5) <= 3 and abs(col - 149.5) <= 3
    assert back[:, :90].max() == 0 and back[:, 210:].max() == 0  # never seen by the model


def test_constant_map_is_reported_not_divided():
    flat = normalise_map(np.full((5, 7), 3.5))
    assert flat.constant and not flat.values.any()
    ramp = normalise_map(np.arange(12.0).reshape(3, 4))
    assert not ramp.constant and ramp.values[0, 0] == 0 and ramp.values[-1, -1] == 1


# -- coarse masks and prompts ----------------------------------------------------------------
def test_coarse_masks_from_hand_made_maps():
    saliency = np.zeros((20, 30))
    saliency[2:8, 3:10] = 0.9  # large blob
    saliency[12:15, 20:23] = 0.8  # small blob
    saliency += np.linspace(0, 0.05, 30)[None]
    both = np.zeros((20, 30), bool)
    both[2:8, 3:10] = both[12:15, 20:23] = True
    np.testing.assert_array_equal(kmeans_foreground(saliency), both)
    np.testing.assert_array_equal(coarse_mask(saliency, "kmeans", keep_components=2), both)
    largest = np.zeros((20, 30), bool)
    largest[2:8, 3:10] = True
    np.testing.assert_array_equal(coarse_mask(saliency, "kmeans", keep_components=1), largest)
    np.testing.assert_array_equal(coarse_mask(saliency, "threshold", threshold=0.85, keep_components=0), largest)
    assert not coarse_mask(np.zeros((4, 4)), "kmeans").any()


def test_prompts_from_hand_made_masks():
    mask = np.zeros((20, 30), bool)
    mask[2:8, 3:10] = True
    mask[12:15, 20:23] = True
    np.testing.assert_array_equal(visual_prompts(mask, "box").boxes, [[3, 2, 22, 14]])
    np.testing.assert_array_equal(visual_prompts(mask, "boxes").boxes, [[3, 2, 9, 7], [20, 12, 22, 14]])
    pts = visual_prompts(mask, "points", n_points=6, n_negative=3, seed=1)
    assert pts.points.shape == (9, 2) and list(pts.labels) == [1] * 6 + [0] * 3
    xs, ys = pts.points[:, 0].astype(int), pts.points[:, 1].astype(int)
    assert mask[ys[:6], xs[:6]].all() and not mask[ys[6:], xs[6:]].any()
    again = visual_prompts(mask, "points", n_points=6, n_negative=3, seed=1)
    np.testing.assert_array_equal(pts.points, again.points)  # deterministic under a seed
    both = visual_prompts(mask, "box_points", n_points=2, seed=0)
    assert len(both.boxes) == 1 and len(both.points) == 2
    assert visual_prompts(np.zeros((5, 5), bool), "box") is None


# -- pipeline --------------------------------------------------------------------------------
def test_text_pipeline_on_sample_volumes(tmp_path, clip, samples_root):
    from medclipsam.config import load_config
    from medclipsam.domain.records import read_manifest
    from medclipsam.pipeline.job import Job
    from medclipsam.pipeline.run import run_job

    config = load_config(Path(__file__).parents[1] / "configs" / "brain_tumor_mri.yaml")
    config = config.model_copy(update={"saliency": FAST, "sam": config.sam.model_copy(update={"keep_components": 1})})
    cases = {c: str(samples_root / "images" / f"{c}.nrrd") for c in ("breast1", "brain2")}
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("case_id,uri\n" + "".join(f"{c},{u}\n" for c, u in cases.items()))
    job = Job(config, str(cohort), str(tmp_path), "text", clip_uri=clip.uri, save_intermediates=True)
    records = run_job(job, "local", resume=False, track=False).records
    table = {row["case_id"]: row for row in read_manifest(str(tmp_path / "manifest.parquet")).to_pylist()}
    assert sorted(table) == sorted(cases)
    for record in records:
        # the fixture must produce targets, or the slice comparisons below compare empty sets
        assert record.status == "ok", record.error
        row = table[record.case_id]
        assert json.loads(row["text_prompt"]) == config.text.prompts
        assert row["clip_model"] == clip.uri and row["clip_sha256"] == clip.sha256
        params = json.loads(row["parameters"])
        assert params["text"]["saliency"]["steps"] == 3 and params["text"]["visual_prompts"]["type"] == "box"
        source = sitk.ReadImage(cases[record.case_id])
        mask = sitk.ReadImage(str(tmp_path / "masks" / f"{record.case_id}.nii.gz"))
        assert mask.GetSize() == source.GetSize()
        np.testing.assert_allclose(mask.GetSpacing(), source.GetSpacing(), rtol=1e-5)
        values = np.unique(sitk.GetArrayFromImage(mask))
        assert set(values) <= {0, 1}
        saliency = np.load(tmp_path / "saliency" / f"{record.case_id}.npy")
        assert saliency.shape == sitk.GetArrayFromImage(source).shape
        assert 0.0 <= saliency.min() and saliency.max() <= 1.0
        coarse = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "coarse" / f"{record.case_id}.nii.gz")))
        # every prompted slice has a coarse mask; SAM's mask only lies on prompted slices
        prompted = {int(k) for k in json.loads(row["prompts"])}
        assert prompted and row["n_prompted_slices"] == len(prompted)
        saved = json.loads((tmp_path / "prompts" / f"{record.case_id}.json").read_text())
        assert saved == json.loads(row["prompts"]) and all(len(p["boxes"]) == 1 for p in saved.values())
        assert prompted == {z for z in range(coarse.shape[0]) if coarse[z].any()}
        pred = sitk.GetArrayFromImage(mask)
        segmented = {z for z in range(pred.shape[0]) if pred[z].any()}
        assert segmented and segmented <= prompted
        assert row["n_target_slices"] == len(prompted)


def test_cli_text_mode(tmp_path, tiny_clip_dir, samples_root):
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(samples_root / "images" / "brain1.nrrd")))
    grey = np.clip(volume[12] / np.percentile(volume[12], 99.5) * 255, 0, 255).astype(np.uint8)
    inputs = tmp_path / "in"
    inputs.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(inputs / "slice12.png"))
    config = tmp_path / "fast.yaml"
    config.write_text("task: t\nsaliency: {steps: 2, copies: 2}\n")
    result = CliRunner().invoke(main_cli(), [
        "segment", "--config", str(config), "--input", str(inputs), "--output", str(tmp_path / "out"),
        "--prompt", "a brain MRI with a bright tumour", "--clip-model", str(tiny_clip_dir), "--save-intermediates",
    ])
    assert result.exit_code == 0, result.output
    assert "1 case(s): ok=1" in result.output
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "masks" / "slice12.png")))
    assert mask.shape == grey.shape and set(np.unique(mask)) <= {0, 255}
    assert np.load(tmp_path / "out" / "saliency" / "slice12.npy").shape == grey.shape


def main_cli():
    from medclipsam.cli import main

    return main


def test_benchmark_script_agrees_with_the_reference_loop():
    script = Path(__file__).parents[1] / "benchmarks" / "m2ib.py"
    out = subprocess.run(
        [sys.executable, str(script), "--vision", "vit_tiny_patch16_224", "--text-layers", "2", "--text-hidden",
         "128", "--images", "2", "--steps", "3", "--copies", "2"],
        capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    last = out.stdout.strip().splitlines()[-1]
    figures = dict(item.split("=") for item in last.split())
    assert set(figures) == {"speedup", "max_abs_diff"}
    assert float(figures["max_abs_diff"]) <= 1e-4


def test_crf_coarse_mask_follows_the_image_edges():
    """Dense CRF (optional extra pydensecrf2): a blurred saliency blob snaps to the bright square."""
    image = np.full((40, 40, 3), 30, np.uint8)
    image[10:25, 12:30] = 220
    truth = np.zeros((40, 40), bool)
    truth[10:25, 12:30] = True
    yy, xx = np.mgrid[:40, :40]
    saliency = np.exp(-(((yy - 17) / 9.0) ** 2 + ((xx - 21) / 11.0) ** 2))  # soft, wider than the square
    mask = coarse_mask(saliency, "crf", keep_components=1, image=image)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.8


def test_cover_windows_cover_the_image_evenly():
    from medclipsam.saliency.maps import cover_windows

    assert cover_windows(224, 448) == [(0, 0, 224), (0, 224, 224)]
    assert cover_windows(50, 50) == [(0, 0, 50)]
    assert cover_windows(250, 100) == [(0, 0, 100), (75, 0, 100), (150, 0, 100)]  # fewest: ceil(250 / 100)
    for height, width in [(224, 448), (100, 301), (480, 640), (640, 480), (97, 1000)]:
        seen = np.zeros((height, width), int)
        windows = cover_windows(height, width)
        assert len(windows) == -(-max(height, width) // min(height, width))
        for top, left, side in windows:
            assert side == min(height, width) and top + side <= height and left + side <= width
            seen[top : top + side, left : left + side] += 1
        assert seen.min() >= 1  # every pixel is in a window


def test_cover_sees_a_target_at_the_border_that_crop_cannot(clip, monkeypatch):
    """A texture at the far left of a 224 x 448 image, and a text embedding planted to match it
    (what the texture adds to a blank window): cover gives it saliency above the image's median;
    crop, which sees only the centre 224 columns, gives it zero."""
    from medclipsam.saliency.maps import clip_inputs

    rng = np.random.default_rng(3)
    image = np.full((224, 448, 3), 128, np.uint8)
    image[80:144, 0:64] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    window, blank = image[:, :224], np.full((224, 224, 3), 128, np.uint8)
    crop = ShortSideCrop(clip.image_size)
    with torch.no_grad():
        planted = clip.model.visual(clip_inputs(clip, [window], crop))[0] - clip.model.visual(
            clip_inputs(clip, [blank], crop))[0]
    monkeypatch.setattr(clip, "text_embedding", lambda text: torch.nn.functional.normalize(planted, dim=0))
    settings = {"layer": 9, "steps": 10, "copies": 4, "beta": 0.1}
    covered = saliency_maps(clip, [image], "planted", SaliencyConfig(geometry="cover", **settings))[0]
    cropped = saliency_maps(clip, [image], "planted", SaliencyConfig(geometry="crop", **settings))[0]
    target = np.zeros(image.shape[:2], bool)
    target[80:144, 0:64] = True
    assert covered.values.shape == (224, 448) and not covered.constant
    assert covered.values[target].mean() > np.median(covered.values)
    assert covered.values[target].mean() > 2 * covered.values[:, 300:].mean()  # the far right window has no target
    assert cropped.values[:, :112].max() == 0.0  # never seen through the centre crop


def test_segment_takes_each_cases_sentences_from_a_manifest(tmp_path, tiny_clip_dir):
    """``segment`` reads the same input manifest as ``pseudolabel``: a per-case ``prompt`` column."""
    import pyarrow.parquet as pq
    from disc_cohort import disc_images

    from medclipsam.cli import main

    disc_images(tmp_path / "data", 2, size=96)
    (tmp_path / "cohort.csv").write_text('uri,prompt\ndata/images/c0.png,a bright round disc\n'
                                         'data/images/c1.png,"[""one sentence"", ""and another""]"\n')
    result = CliRunner().invoke(main, ["segment", "--input", str(tmp_path / "cohort.csv"), "--output",
                                       str(tmp_path / "out"), "--clip-model", str(tiny_clip_dir), "--backend",
                                       "litemedsam"])
    assert result.exit_code == 0, result.output
    rows = {r["case_id"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert json.loads(rows["c0"]["text_prompt"]) == ["a bright round disc"]
    assert json.loads(rows["c1"]["text_prompt"]) == ["one sentence", "and another"]
    assert all(r["clip_model"] == str(tiny_clip_dir) for r in rows.values())
