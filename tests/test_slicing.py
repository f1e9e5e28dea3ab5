import numpy as np
import pytest

from medclipsam.config import CT_WINDOWS, ImageConfig, WindowConfig
from medclipsam.domain.images import MedicalImage
from medclipsam.errors import InputError
from medclipsam.ops.slicing import model_inputs, stack_slices, take_slice, to_rgb, window_to_uint8


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_stack_is_inverse_of_take(axis):
    volume = np.random.default_rng(0).random((3, 4, 5))
    slices = [take_slice(volume, i, axis) for i in range(volume.shape[axis])]
    np.testing.assert_array_equal(stack_slices(slices, axis), volume)
    # slice i along axis 1 is volume[:, i, :]
    if axis == 1:
        np.testing.assert_array_equal(slices[2], volume[:, 2, :])


def test_take_slice_out_of_range():
    with pytest.raises(IndexError, match=r"slice 3 outside 0\.\.2"):
        take_slice(np.zeros((3, 2, 2)), 3)


def test_percentile_window_matches_formula():
    data = np.arange(1001, dtype=np.int16).reshape(7, 143)
    out = window_to_uint8(data, WindowConfig(lower_percentile=10, upper_percentile=90))
    lo, hi = np.percentile(data, [10, 90])
    expected = np.round((np.clip(data, lo, hi) - lo) / (hi - lo) * 255)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))
    assert out.min() == 0 and out.max() == 255


def test_ct_preset_window():
    hu = np.array([[-2000, -1350, -600, 150, 3000]], dtype=np.int16)
    out = window_to_uint8(hu, WindowConfig(preset="lung"))  # centre -600, width 1500: -1350..150
    np.testing.assert_array_equal(out, [[0, 0, 128, 255, 255]])
    assert set(CT_WINDOWS) >= {"lung", "soft_tissue", "brain", "bone"}


def test_uint8_unchanged_and_constant_slice_is_zero():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert window_to_uint8(img) is img
    np.testing.assert_array_equal(window_to_uint8(np.full((4, 4), 300, np.int16)), 0)


def test_bad_window_settings():
    with pytest.raises(ValueError, match="unknown CT window preset"):
        WindowConfig(preset="liver-ish")
    with pytest.raises(ValueError, match="lower_percentile must be below"):
        WindowConfig(lower_percentile=90, upper_percentile=10)


def test_to_rgb():
    img = np.arange(6, dtype=np.uint8).reshape(2, 3)
    rgb = to_rgb(img)
    assert rgb.shape == (2, 3, 3) and (rgb[..., 2] == img).all()


def test_non_finite_values_are_ignored_by_the_window():
    data = np.arange(100, dtype=np.float32).reshape(10, 10)
    data[0, 0], data[0, 1], data[0, 2] = np.nan, np.inf, -np.inf
    out = window_to_uint8(data, WindowConfig(lower_percentile=0, upper_percentile=100))
    finite = data[np.isfinite(data)]
    expected = np.round((data - finite.min()) / (finite.max() - finite.min()) * 255)
    np.testing.assert_array_equal(out.reshape(-1)[3:], expected.reshape(-1)[3:].astype(np.uint8))
    assert out[0, :3].tolist() == [0, 0, 0]  # NaN and both infinities go to the low end
    assert out.max() == 255
    preset = window_to_uint8(np.array([[np.nan, np.inf, 150.0]]), WindowConfig(preset="lung"))
    assert preset.tolist() == [[0, 0, 255]]
    np.testing.assert_array_equal(window_to_uint8(np.full((3, 3), np.nan)), 0)


def test_a_mostly_non_finite_slice_is_an_input_error():
    volume = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    volume[:, 1, :3] = np.nan  # along axis 1, slice 1 is 15 voxels of which 9 are NaN
    image = MedicalImage(volume, True, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), "v.mha")
    settings = ImageConfig(axis=1)
    assert len(model_inputs(image, [0, 2, 3], settings)) == 3
    with pytest.raises(InputError, match=r"^v\.mha: 9 of 15 voxels of slice 1 \(axis 1\) are NaN or infinite"):
        model_inputs(image, [0, 1], settings)
