"""load_digits at other shapes: bilinear upsampling (half-pixel centres) and repeated channels."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from qatcore.data import load_digits
from qatcore.errors import ConfigError

ACCEPTED_SIZES = [8, 16, 24, 32, 40, 48, 56, 64]

# sha256 of load_digits(seed=...)'s four arrays (bytes, dtype, shape) before image_size and
# channels existed: the defaults must keep returning exactly these arrays.
DEFAULT_DIGESTS = {
    0: "9ddba10c16dfa1f97f0c90159bed412c5ffb68ababa8c360ed9ecc57223a51a9",
    3: "6b301f28bf22b32c83e70f23af9045a307382102a0c69d64693a32becac3b556",
}


def _digest(arrays) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(array.tobytes())
        digest.update(str((array.dtype, array.shape)).encode())
    return digest.hexdigest()


def _bilinear_oracle(image: np.ndarray, size: int) -> np.ndarray:
    """One 8x8 image resampled pixel by pixel: each output pixel centre mapped back onto the
    source grid, clamped to its edge pixels, and interpolated from its four neighbours."""
    out = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            v = min(max((i + 0.5) * 8 / size - 0.5, 0.0), 7.0)
            u = min(max((j + 0.5) * 8 / size - 0.5, 0.0), 7.0)
            r0, c0 = int(v), int(u)
            r1, c1 = min(r0 + 1, 7), min(c0 + 1, 7)
            fv, fu = v - r0, u - c0
            out[i, j] = ((1 - fv) * ((1 - fu) * image[r0, c0] + fu * image[r0, c1])
                         + fv * ((1 - fu) * image[r1, c0] + fu * image[r1, c1]))
    return out


@pytest.mark.parametrize("seed", sorted(DEFAULT_DIGESTS))
def test_the_defaults_return_exactly_what_they_returned_before(seed):
    assert _digest(load_digits(seed=seed)) == DEFAULT_DIGESTS[seed]
    assert _digest(load_digits(seed=seed, image_size=8, channels=1)) == DEFAULT_DIGESTS[seed]


def test_32x32x3_shape_dtype_range_and_channels():
    x_train, y_train, x_test, y_test = load_digits(image_size=32, channels=3)
    assert x_train.shape == (1438, 3, 32, 32) and x_test.shape == (359, 3, 32, 32)
    _, y_train_8, _, y_test_8 = load_digits()
    np.testing.assert_array_equal(y_train, y_train_8)  # the same split
    np.testing.assert_array_equal(y_test, y_test_8)
    for x in (x_train, x_test):
        assert x.dtype == np.float32 and x.flags.c_contiguous
        assert x.min() == 0.0 and x.max() == 1.0
        np.testing.assert_array_equal(x[:, 0], x[:, 1])
        np.testing.assert_array_equal(x[:, 0], x[:, 2])
        # power-of-two factor: the weights are multiples of 1/16, every value exact (k / 4096)
        np.testing.assert_array_equal(x * 4096, np.round(x * 4096))


def test_32x32x3_is_deterministic():
    first, second = load_digits(image_size=32, channels=3), load_digits(image_size=32, channels=3)
    assert _digest(first) == _digest(second)


@pytest.mark.parametrize("image_size", [16, 24, 32])
def test_upsampling_matches_the_pixel_by_pixel_oracle(image_size):
    x8, _, _, _ = load_digits()
    x, _, _, _ = load_digits(image_size=image_size)
    assert x.shape == (1438, 1, image_size, image_size)
    for index in (0, 1, 500, 1437):
        expected = _bilinear_oracle(x8[index, 0].astype(np.float64), image_size)
        np.testing.assert_allclose(x[index, 0], expected, rtol=0, atol=1e-7)


@pytest.mark.torch
@pytest.mark.parametrize("image_size", ACCEPTED_SIZES[1:])
def test_upsampling_is_pytorchs_bilinear_without_align_corners(image_size):
    import torch
    import torch.nn.functional as torch_F

    x8, *_ = load_digits()
    x, *_ = load_digits(image_size=image_size)
    expected = torch_F.interpolate(torch.from_numpy(x8[:64]), size=(image_size, image_size), mode="bilinear",
                                   align_corners=False).numpy()
    np.testing.assert_allclose(x[:64], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [0, 4, 12, 72, 128, -8, 8.0, True, "32", None])
def test_image_size_must_be_a_multiple_of_8_up_to_64(bad):
    with pytest.raises(ConfigError, match=r"load_digits: image_size must be a multiple of 8 from 8 to 64 "
                                          r"\(8, 16, 24, 32, 40, 48, 56, 64\), got"):
        load_digits(image_size=bad)


@pytest.mark.parametrize("bad", [0, 2, 4, 1.0, True, "3", None])
def test_channels_must_be_1_or_3(bad):
    with pytest.raises(ConfigError, match=r"load_digits: channels must be 1 \(gray\) or 3"):
        load_digits(channels=bad)


def test_numpy_integers_are_accepted():
    x_train, *_ = load_digits(image_size=np.int64(16), channels=np.int32(3))
    assert x_train.shape == (1438, 3, 16, 16)
