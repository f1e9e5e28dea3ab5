"""Metrics against hand-worked cases (worked out on paper in the comments)."""

import math

import numpy as np
import pytest

from medclipsam.eval.metrics import case_metrics, dice, hausdorff95, normalized_surface_dice, summarise


def squares():
    # A: rows 5-14, cols 5-14; B: rows 5-14, cols 8-17 (B is A shifted right by 3 columns).
    a = np.zeros((20, 22), bool)
    a[5:15, 5:15] = True
    b = np.zeros((20, 22), bool)
    b[5:15, 8:18] = True
    return a, b


def test_dice_hand_worked():
    a, b = squares()
    # overlap 10 x 7 = 70, sizes 100 + 100 -> 140 / 200
    assert dice(a, b) == pytest.approx(0.7)


def test_nsd_hand_worked_isotropic():
    a, b = squares()
    # Each boundary has 36 pixels. Pixels of A's boundary farther than 2 from B's boundary:
    # top/bottom row at col 5 (distance 3): 2; left column rows 6-13 (distance 3): 8;
    # right column rows 8-11 (distance 3 to B's right column / top / bottom row): 4. 14 fail, 22 pass.
    # By symmetry B has 22 passing too: NSD = 44 / 72.
    assert normalized_surface_dice(a, b, tolerance=2.0) == pytest.approx(44 / 72, abs=1e-6)
    # every boundary distance is at most 3
    assert normalized_surface_dice(a, b, tolerance=3.0) == pytest.approx(1.0)
    assert hausdorff95(a, b) == pytest.approx(3.0)


def test_nsd_hand_worked_anisotropic():
    a, b = squares()
    # Columns 2 mm apart, rows 1 mm: horizontal distances double. Failing per side: top/bottom
    # rows at cols 5 and 6 (6 and 4 mm): 4; left column rows 6-13 (6 mm): 8; right column rows
    # 8-11: 4. 16 fail, 20 pass per side: NSD = 40 / 72.
    assert normalized_surface_dice(a, b, 2.0, spacing=(1.0, 2.0)) == pytest.approx(40 / 72, abs=1e-6)
    assert hausdorff95(a, b, spacing=(1.0, 2.0)) == pytest.approx(6.0)


def test_nsd_volume_slice_spacing():
    # Two 6x6x6 cubes, the second shifted by one slice; slices 5 mm apart.
    a = np.zeros((10, 10, 10), bool)
    a[2:8, 2:8, 2:8] = True
    b = np.roll(a, 1, axis=0)
    spacing = (5.0, 1.0, 1.0)
    metrics_2mm = case_metrics(a, b, tolerance=2.0, spacing=spacing)
    metrics_5mm = case_metrics(a, b, tolerance=5.0, spacing=spacing)
    assert metrics_2mm.dsc == pytest.approx(2 * 5 * 36 / (2 * 216))
    # At 5 mm every boundary voxel is within one slice of the other boundary.
    assert metrics_5mm.nsd == pytest.approx(1.0)
    assert metrics_2mm.nsd < 1.0
    assert metrics_2mm.hd95 == pytest.approx(5.0)


def test_empty_mask_conventions():
    empty = np.zeros((8, 8), bool)
    full = np.zeros((8, 8), bool)
    full[2:5, 2:5] = True
    both_empty = case_metrics(empty, empty)
    assert (both_empty.dsc, both_empty.nsd, both_empty.hd95) == (1.0, 1.0, 0.0)
    pred_only = case_metrics(full, empty)
    assert (pred_only.dsc, pred_only.nsd) == (0.0, 0.0) and math.isinf(pred_only.hd95)
    truth_only = case_metrics(empty, full)
    assert (truth_only.dsc, truth_only.nsd) == (0.0, 0.0) and math.isinf(truth_only.hd95)


def test_identical_masks_are_perfect():
    a, _ = squares()
    m = case_metrics(a, a)
    assert (m.dsc, m.nsd, m.hd95) == (1.0, 1.0, 0.0)


def test_dice_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, t = rng.random((2, 16, 16)) > 0.6
        inter = sum(1 for i in range(16) for j in range(16) if p[i, j] and t[i, j])
        assert dice(p, t) == pytest.approx(2 * inter / (p.sum() + t.sum()))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        case_metrics(np.zeros((4, 4)), np.zeros((4, 5)))


def test_summarise_skips_infinite():
    assert summarise([1.0, math.inf, 3.0]) == 2.0
    assert math.isnan(summarise([math.inf]))


def random_blobs(rng, shape, n=2):
    """Masks of a few smoothed-noise blobs, some touching the image border."""
    from scipy import ndimage

    masks = []
    for _ in range(n):
        noise = ndimage.gaussian_filter(rng.random(shape), 1.5)
        masks.append(noise > np.quantile(noise, 0.7))
    return masks


def brute_force_distances(a, b, spacing):
    """Boundary by checking every voxel's face neighbours (outside = background); all-pairs distances."""
    def boundary(mask):
        padded = np.pad(mask, 1)
        points = []
        for index in np.argwhere(mask):
            p = tuple(index + 1)
            for axis in range(mask.ndim):
                for step in (-1, 1):
                    q = list(p)
                    q[axis] += step
                    if not padded[tuple(q)]:
                        points.append(index)
                        break
                else:
                    continue
                break
        return np.asarray(points, dtype=float) * np.asarray(spacing)

    pa_, pb = boundary(a), boundary(b)
    d = np.sqrt(((pa_[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return d.min(axis=1), d.min(axis=0)


@pytest.mark.parametrize("shape,spacing", [((24, 30), (1.0, 1.0)), ((24, 30), (0.7, 1.9)),
                                           ((9, 14, 12), (4.0, 0.8, 0.8))])
def test_surface_metrics_match_brute_force(shape, spacing):
    rng = np.random.default_rng(len(shape) * 10 + int(spacing[1] * 10))
    for _ in range(3):
        a, b = random_blobs(rng, shape)
        to_b, to_a = brute_force_distances(a, b, spacing)
        m = case_metrics(a, b, tolerance=1.5, spacing=spacing)
        within = (to_b <= 1.5).sum() + (to_a <= 1.5).sum()
        assert m.nsd == pytest.approx(within / (len(to_b) + len(to_a)), abs=1e-9)
        assert m.hd95 == pytest.approx(max(np.percentile(to_b, 95), np.percentile(to_a, 95)), rel=1e-5)


@pytest.mark.parametrize("shape,spacing", [((40, 52), None), ((40, 52), (1.3, 0.6)),
                                           ((12, 20, 18), (3.0, 0.9, 1.1))])
def test_surface_metrics_equal_monai(shape, spacing):
    """The scipy path gives MONAI's numbers (compute_surface_dice / compute_hausdorff_distance)."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(7)
    for tolerance in (1.0, 2.0, 3.5):
        a, b = random_blobs(rng, shape)
        pred, truth = torch.as_tensor(a)[None, None], torch.as_tensor(b)[None, None]
        kwargs = {"spacing": list(spacing)} if spacing else {}
        nsd = float(compute_surface_dice(pred, truth, [tolerance], include_background=True, **kwargs)[0, 0])
        hd95 = float(compute_hausdorff_distance(pred, truth, include_background=True, percentile=95,
                                                **kwargs)[0, 0])
        m = case_metrics(a, b, tolerance, spacing)
        assert m.nsd == pytest.approx(nsd, abs=1e-6)
        assert m.hd95 == pytest.approx(hd95, rel=1e-5)


def test_metrics_module_loads_without_torch():
    import subprocess
    import sys

    code = ("import sys, medclipsam.eval.metrics, medclipsam.eval.evaluation; "
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
