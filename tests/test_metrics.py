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
