"""The saliency geometries (crop / pad / stretch): images to CLIP's square input and maps back.

Each transform is checked against an independent reference (torchvision's Resize + CenterCrop,
the resize arithmetic written out here) and by round trips of a bright rectangle on non-square
images: what the model sees at a place must come back to the same place in the image.
"""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from medclipsam.config import SaliencyConfig
from medclipsam.ops.transforms import LongestSidePad, ShortSideCrop, Stretch
from medclipsam.saliency import maps as saliency_module
from medclipsam.saliency.maps import clip_geometry, saliency_maps

T = 224
SHAPES = [(90, 130), (130, 90)]
# 97 x 131: the padded short side, 165.86 px, is where rounding and truncation part.
ALL_SHAPES = [*SHAPES, (97, 131)]


def rectangle(h, w, y0, y1, x0, x1):
    """``1 x 1 x H x W`` float: 1 on rows y0..y1-1, columns x0..x1-1, else 0."""
    image = torch.zeros(1, 1, h, w)
    image[..., y0:y1, x0:x1] = 1.0
    return image


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def bbox(mask):
    ys, xs = np.nonzero(mask)
    return np.array([ys.min(), ys.max(), xs.min(), xs.max()])


def centroid(values):
    """(x, y) centre of mass of a 2D array, in pixel-centre coordinates."""
    values = np.asarray(values, dtype=np.float64)
    yy, xx = np.mgrid[: values.shape[0], : values.shape[1]]
    return np.array([(values * xx).sum(), (values * yy).sum()]) / values.sum()


def pad_content(h, w):
    """LongestSidePad's content size, written out: longest side -> T, the other rounded half up."""
    scale = T / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def crop_layout(h, w):
    """torchvision Resize(T) + CenterCrop(T): resized size and the crop's top-left corner."""
    rh, rw = (T, int(T * w / h)) if h <= w else (int(T * h / w), T)
    return (rh, rw), (round((rh - T) / 2.0), round((rw - T) / 2.0))


def rectangles(h, w):
    """Rectangles inside, at the top-left corner and at the bottom-right corner of an H x W image."""
    return [
        (h // 3, h // 3 + h // 4, w // 2, w // 2 + w // 5),
        (0, h // 5, 0, w // 6),
        (h - h // 4, h, w - w // 5, w),
    ]


# -- the forward transforms against independent references ----------------------------------
@pytest.mark.parametrize("h, w", ALL_SHAPES)
def test_pad_puts_the_resized_image_top_left_and_zeros_elsewhere(h, w):
    geometry = clip_geometry("pad", T)
    assert geometry == LongestSidePad(T)
    nh, nw = pad_content(h, w)
    assert max(nh, nw) == T and (nh, nw) == geometry.resized_shape(h, w)
    image = torch.rand(1, 3, h, w) * 0.8 + 0.1
    out = geometry.apply_image(image)
    assert out.shape == (1, 3, T, T)
    reference = TF.resize(image, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
    torch.testing.assert_close(out[..., :nh, :nw], reference)
    assert (out[..., nh:, :] == 0).all() and (out[..., :, nw:] == 0).all()


@pytest.mark.parametrize("h, w", ALL_SHAPES)
def test_stretch_fills_the_square(h, w):
    geometry = clip_geometry("stretch", T)
    assert geometry == Stretch(T)
    image = torch.rand(1, 3, h, w)
    reference = TF.resize(image, [T, T], interpolation=InterpolationMode.BILINEAR, antialias=True)
    torch.testing.assert_close(geometry.apply_image(image), reference)


@pytest.mark.parametrize("h, w", ALL_SHAPES)
def test_crop_is_clips_resize_and_centre_crop(h, w):
    geometry = clip_geometry("crop", T)
    assert geometry == ShortSideCrop(T)
    (rh, rw), (top, left) = crop_layout(h, w)
    assert geometry.resized_shape(h, w) == (rh, rw) and geometry.crop_origin(h, w) == (top, left)
    image = torch.rand(1, 3, h, w)
    resized = TF.resize(image, T, interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert resized.shape[-2:] == (rh, rw)
    reference = TF.center_crop(resized, [T, T]).clamp(0, 1)
    torch.testing.assert_close(geometry.apply_image(image), reference)


# -- round trips: a rectangle comes back where it was ---------------------------------------
@pytest.mark.parametrize("name", ["pad", "stretch"])
@pytest.mark.parametrize("h, w", ALL_SHAPES)
def test_pad_and_stretch_round_trip_a_rectangle(name, h, w):
    geometry = clip_geometry(name, T)
    nh, nw = pad_content(h, w) if name == "pad" else (T, T)
    sy, sx = nh / h, nw / w
    for y0, y1, x0, x1 in rectangles(h, w):
        image = rectangle(h, w, y0, y1, x0, x1)
        model = geometry.apply_image(image)[0, 0].numpy()
        # In model space the rectangle covers rows y0*sy .. y1*sy and columns x0*sx .. x1*sx (pixel edges).
        expected = np.array([y0 * sy, y1 * sy - 1, x0 * sx, x1 * sx - 1])
        assert np.abs(bbox(model > 0.5) - expected).max() <= 1.0, (name, (h, w), (y0, y1, x0, x1))
        # Its centre sits where the rectangle's centre pixel lands: (x + 0.5) * scale - 0.5.
        centre = np.array([(x0 + x1) / 2 * sx - 0.5, (y0 + y1) / 2 * sy - 0.5])
        np.testing.assert_allclose(centroid(model), centre, atol=0.1)
        # Mapping the model-space map back gives the rectangle at its original place.
        back = geometry.invert_masks(torch.as_tensor(model)[None, None], (h, w))[0, 0].numpy()
        assert back.shape == (h, w)
        truth = image[0, 0].numpy() > 0.5
        assert np.abs(bbox(back > 0.5) - bbox(truth)).max() <= 1
        assert dice(back > 0.5, truth) > 0.97
        assert np.abs(back - image[0, 0].numpy()).mean() < 0.03


@pytest.mark.parametrize("name", ["pad", "stretch", "crop"])
@pytest.mark.parametrize("low", [T, T // 4])
@pytest.mark.parametrize("h, w", ALL_SHAPES)
def test_inverse_is_exact_on_linear_ramps(name, low, h, w):
    # Bilinear resampling reproduces a linear function exactly, so a map whose value is its own
    # column (row) index must come back holding, at each image pixel, the model-space coordinate of
    # that pixel's centre: (x + 0.5) * scale - 0.5 (minus the crop's offset), on a low x low map too.
    geometry = clip_geometry(name, T)
    if name == "pad":
        (nh, nw), (top, left) = pad_content(h, w), (0, 0)
    elif name == "stretch":
        (nh, nw), (top, left) = (T, T), (0, 0)
    else:
        (nh, nw), (top, left) = crop_layout(h, w)
    f = low / T  # model-input pixels -> map pixels
    u = ((np.arange(w) + 0.5) * nw / w - left) * f - 0.5  # each image column in map coordinates
    v = ((np.arange(h) + 0.5) * nh / h - top) * f - 0.5
    grid = torch.arange(low, dtype=torch.float64)
    ramps = torch.stack([grid.expand(low, low), grid[:, None].expand(low, low)])[None]  # x ramp, y ramp
    back = geometry.invert_masks(ramps, (h, w))[0].numpy()
    assert back.shape == (2, h, w)
    # Away from the map's border (where resampling clamps) the values are exact.
    cols, rows = (u >= 0) & (u <= low - 1), (v >= 0) & (v <= low - 1)
    assert cols.mean() > (0.9 if name != "crop" else 0.5) and rows.mean() > (0.9 if name != "crop" else 0.5)
    np.testing.assert_allclose(back[0][np.ix_(rows, cols)], np.broadcast_to(u[cols], (rows.sum(), cols.sum())),
                               atol=1e-6)
    np.testing.assert_allclose(back[1][np.ix_(rows, cols)],
                               np.broadcast_to(v[rows, None], (rows.sum(), cols.sum())), atol=1e-6)


@pytest.mark.parametrize("h, w", ALL_SHAPES)
def test_pad_inverse_ignores_the_padding(h, w):
    # Whatever the model puts on the padding must not leak into the image, and the whole image is covered.
    geometry = LongestSidePad(T)
    nh, nw = pad_content(h, w)
    model = torch.zeros(1, 1, T, T)
    model[..., :nh, :nw] = 1.0
    model[..., nh:, :] = 50.0
    model[..., :, nw:] = 50.0
    back = geometry.invert_masks(model, (h, w))
    assert back.shape == (1, 1, h, w)
    torch.testing.assert_close(back, torch.ones(1, 1, h, w))


@pytest.mark.parametrize("h, w", ALL_SHAPES)
def test_crop_round_trip_and_zero_outside_the_crop(h, w):
    geometry = ShortSideCrop(T)
    (rh, rw), (top, left) = crop_layout(h, w)
    # Where each image pixel centre falls in the resized image, and whether the crop holds it.
    v = (np.arange(h) + 0.5) * rh / h - 0.5 - top
    u = (np.arange(w) + 0.5) * rw / w - 0.5 - left
    inside = np.outer((v >= 0) & (v <= T - 1), (u >= 0) & (u <= T - 1))
    outside = np.outer((v <= -1) | (v >= T), np.ones(w, bool)) | np.outer(np.ones(h, bool), (u <= -1) | (u >= T))
    assert inside.sum() > 0.5 * h * w and outside.sum() > 0.2 * h * w  # the crop cuts a real band off

    ones = geometry.invert_masks(torch.ones(1, 1, T, T), (h, w))[0, 0].numpy()
    assert ones.shape == (h, w)
    assert (ones[outside] == 0).all()
    np.testing.assert_allclose(ones[inside], 1.0, atol=1e-6)

    # A rectangle inside the crop comes back at its place.
    ys, xs = np.nonzero(inside)
    y0, x0 = ys.min() + (ys.max() - ys.min()) // 4, xs.min() + (xs.max() - xs.min()) // 3
    y1, x1 = y0 + (ys.max() - ys.min()) // 3, x0 + (xs.max() - xs.min()) // 3
    image = rectangle(h, w, y0, y1, x0, x1)
    back = geometry.invert_masks(geometry.apply_image(image), (h, w))[0, 0].numpy()
    truth = image[0, 0].numpy() > 0.5
    assert np.abs(bbox(back > 0.5) - bbox(truth)).max() <= 1
    assert dice(back > 0.5, truth) > 0.97
    assert (back[outside] == 0).all()

    # A rectangle the crop never sees does not come back at all.
    band = rectangle(h, w, 0, h, 0, 3) if h < w else rectangle(h, w, 0, 3, 0, w)
    assert geometry.invert_masks(geometry.apply_image(band), (h, w)).abs().max() == 0


# -- saliency_maps end to end ----------------------------------------------------------------
def textured(h, w, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def crop_outside(h, w):
    (rh, rw), (top, left) = crop_layout(h, w)
    v = (np.arange(h) + 0.5) * rh / h - 0.5 - top
    u = (np.arange(w) + 0.5) * rw / w - 0.5 - left
    return np.outer((v <= -1) | (v >= T), np.ones(w, bool)) | np.outer(np.ones(h, bool), (u <= -1) | (u >= T))


@pytest.mark.parametrize("geometry", ["crop", "pad", "stretch"])
def test_saliency_maps_cover_each_image(clip, geometry):
    assert clip.image_size == T
    images = [textured(h, w, seed) for seed, (h, w) in enumerate(SHAPES)]
    maps = saliency_maps(clip, images, "a prompt", SaliencyConfig(geometry=geometry, steps=2, copies=2))
    assert len(maps) == len(images)
    for image, result in zip(images, maps, strict=True):
        values = result.values
        assert values.shape == image.shape[:2] and values.dtype == np.float32
        assert not result.constant
        assert values.min() == 0.0 and values.max() == 1.0 and np.isfinite(values).all()
        outside = crop_outside(*image.shape[:2])
        if geometry == "crop":
            assert (values[outside] == 0).all()  # the model never saw those borders
        else:
            # Not cut: the borders a centre crop would drop carry saliency too.
            assert (values[outside] > 0).mean() > 0.9
            assert (values > 0).mean() > 0.95


@pytest.mark.parametrize("geometry", ["pad", "stretch", "crop"])
def test_saliency_maps_land_where_the_model_saw_the_object(clip, geometry, monkeypatch):
    # Replace M2IB by "brightness per patch" of the very input CLIP gets: the map must then show the
    # bright rectangle at its place in each image, whatever the geometry did on the way in and out.
    seen = []

    def brightness_grid(split, pixels, text, params):
        mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
        std = torch.tensor(clip.std).view(1, 3, 1, 1)
        rgb = pixels * std + mean
        seen.extend(rgb)
        return torch.nn.functional.avg_pool2d(rgb.mean(dim=1, keepdim=True), T // split.grid_size[0])[:, 0]

    monkeypatch.setattr(saliency_module, "m2ib_maps", brightness_grid)
    images, truths = [], []
    for h, w in SHAPES:
        image = np.full((h, w, 3), 20, np.uint8)
        y0, x0 = h // 2 - h // 6, w // 2 - w // 8  # central, so the crop sees it too
        y1, x1 = y0 + h // 3, x0 + w // 4
        image[y0:y1, x0:x1] = 230
        truth = np.zeros((h, w), bool)
        truth[y0:y1, x0:x1] = True
        images.append(image)
        truths.append(truth)
    maps = saliency_maps(clip, images, "a prompt", SaliencyConfig(geometry=geometry, steps=2, copies=2))
    assert len(seen) == len(images)
    for image, model_input in zip(images, seen, strict=True):
        # CLIP got the image through the configured geometry (torchvision as the reference).
        h, w = image.shape[:2]
        x = torch.as_tensor(image).permute(2, 0, 1)[None].float() / 255
        if geometry == "pad":
            nh, nw = pad_content(h, w)
            expected = torch.zeros(1, 3, T, T)
            expected[..., :nh, :nw] = TF.resize(x, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=True)
        elif geometry == "stretch":
            expected = TF.resize(x, [T, T], interpolation=InterpolationMode.BILINEAR, antialias=True)
        else:
            expected = TF.center_crop(TF.resize(x, T, interpolation=InterpolationMode.BICUBIC, antialias=True),
                                      [T, T]).clamp(0, 1)
        torch.testing.assert_close(model_input[None], expected, atol=1e-5, rtol=1e-5)
    for truth, result in zip(truths, maps, strict=True):
        values = result.values
        assert values.shape == truth.shape
        # The map is coarse (16 px patches in model space), so compare centres and overlap.
        np.testing.assert_allclose(centroid(values * (values > 0.5)), centroid(truth), atol=2.0)
        assert dice(values > 0.5, truth) > 0.7
        assert values[truth].mean() > 0.6 and values[~truth].mean() < 0.25
