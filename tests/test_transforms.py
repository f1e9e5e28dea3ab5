"""Every model-input transform against its inverse, on non-square images."""

import numpy as np
import pytest
import torch

from medclipsam.ops.transforms import LongestSidePad, Stretch


def disk_image(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).astype(np.float32)


@pytest.mark.parametrize("transform", [LongestSidePad(256), LongestSidePad(1024), Stretch(256)])
@pytest.mark.parametrize("size", [(120, 45), (300, 512), (64, 64)])
def test_mask_round_trip(transform, size):
    h, w = size
    disk = disk_image(h, w, h * 0.4, w * 0.6, min(h, w) * 0.25)
    forward = transform.apply_image(torch.from_numpy(disk)[None, None])
    assert forward.shape == (1, 1, transform.target, transform.target)
    # A model at 1/4 resolution (SAM's low-res masks) still maps back onto the original grid.
    low_res = torch.nn.functional.interpolate(forward, scale_factor=0.25, mode="bilinear")
    back = transform.invert_masks(low_res * 2 - 1, (h, w))[0, 0].numpy() > 0
    iou = (back & (disk > 0)).sum() / (back | (disk > 0)).sum()
    assert back.shape == (h, w) and iou > 0.85


@pytest.mark.parametrize("transform", [LongestSidePad(256), Stretch(256)])
def test_coords_follow_the_image(transform):
    h, w = 120, 45
    cy, cx = 30.0, 33.0
    disk = disk_image(h, w, cy, cx, 6)
    forward = transform.apply_image(torch.from_numpy(disk)[None, None])[0, 0].numpy()
    ys, xs = np.nonzero(forward > 0.5)
    mapped = transform.apply_coords(np.array([cx, cy]), (h, w))
    # The centre of the resized disk is where the transformed centre coordinate says it is.
    assert abs(xs.mean() - mapped[0]) < 0.25 and abs(ys.mean() - mapped[1]) < 0.25
    box = transform.apply_boxes(np.array([[10, 20, 40, 100]]), (h, w))
    np.testing.assert_allclose(box[0, :2], transform.apply_coords(np.array([10, 20]), (h, w)))


def test_longest_side_shape():
    assert LongestSidePad(256).resized_shape(120, 45) == (256, 96)
    assert LongestSidePad(1024).resized_shape(512, 300) == (1024, 600)


def test_segment_anything_coordinate_convention():
    """pixel_centres=False scales prompts as segment_anything's ResizeLongestSide does (x * scale)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    points = np.array([[[0.0, 0.0], [37.5, 12.0], [119.0, 89.0]]])
    boxes = np.array([[10.0, 20.0, 100.0, 80.0]])
    ours, theirs = LongestSidePad(1024, pixel_centres=False), ResizeLongestSide(1024)
    np.testing.assert_allclose(ours.apply_coords(points, (90, 120)), theirs.apply_coords(points, (90, 120)))
    np.testing.assert_allclose(ours.apply_boxes(boxes, (90, 120)), theirs.apply_boxes(boxes, (90, 120)))
    centred = LongestSidePad(1024).apply_coords(points, (90, 120))  # the default maps pixel centres
    np.testing.assert_allclose(centred, (points + 0.5) * (1024 / 120) - 0.5)
