"""``load_digits``: the 8x8 handwritten digits that ship inside qatcore.

The data is the UCI "Optical Recognition of Handwritten Digits" set (E. Alpaydin,
C. Kaynak, 1998; UCI Machine Learning Repository, DOI 10.24432/C50P49, licensed
CC BY 4.0), in the 1797-image 8x8 version distributed by scikit-learn. See
``_data/DIGITS_ATTRIBUTION.md`` next to this file. It is small enough to embed,
so examples and tests train a real model without a download: qatcore never
downloads anything.

The packaged file ``_data/digits.csv.gz`` has one image a row: 64 pixel counts
0..16 (the 8x8 image, row-major) and then the label 0..9. ``load_digits`` scales
pixels to ``x = count / 16`` in [0, 1] and splits per class, so each class is
represented in train and test in (almost) the proportion asked for.

>>> x_train, y_train, x_test, y_test = load_digits(test_fraction=0.2, seed=0)
>>> x_train.shape, x_test.shape
((1438, 1, 8, 8), (359, 1, 8, 8))
"""

from __future__ import annotations

import gzip
import math
import numbers
import zlib
from importlib import resources

import numpy as np

from qatcore.errors import ConfigError, DataError

__all__ = ["load_digits"]

_NUM_IMAGES = 1797
_NUM_CLASSES = 10
_IMAGE_SIDE = 8
_MAX_IMAGE_SIZE = 64  # 1797 images of 3 x 64 x 64 float32 take 88 MB
_MAX_PIXEL_COUNT = 16
_DATA_PACKAGE = "qatcore.data"
_DATA_FILE = ("_data", "digits.csv.gz")


def load_digits(
    test_fraction: float = 0.2, seed: int = 0, image_size: int = 8, channels: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load the embedded 8x8 digits and split them into train and test, stratified by class.

    Each class ``c`` with ``n_c`` images sends ``round(test_fraction * n_c)`` of them
    (clipped to ``1 .. n_c - 1``, so both splits hold every class) to the test set,
    chosen by ``np.random.default_rng(seed)``; the rest go to train. Within each
    split the images keep the order of the data file. The file is read and checked
    on every call (there is no module-level cache).

    ``image_size`` and ``channels`` give the same images at the shape of a larger
    network's input (32x32x3 for the CIFAR models) without a download: each image is
    upsampled by bilinear interpolation with half-pixel centres (``align_corners=False``
    in PyTorch's ``interpolate``, OpenCV's ``resize``), and ``channels=3`` repeats the
    gray image in every channel. Output pixel ``i`` of ``image_size`` samples the 8x8
    image at ``u = (i + 0.5) * 8 / image_size - 0.5``, clamped to [0, 7], between
    pixels ``floor(u)`` and ``floor(u) + 1`` with weights ``1 - frac(u)`` and
    ``frac(u)``; rows first, then columns, in float64, rounded to float32 once. The
    values stay in [0, 1] and are the same on every call; for image sizes 16, 32 and
    64 the weights are multiples of 1/16, so every value is exact. The defaults return
    the 8x8 images unchanged.

    Args:
        test_fraction: share of each class held out for testing, strictly between 0 and 1.
        seed: non-negative integer seed of the split; the same seed gives the same split.
        image_size: side of the returned images, a multiple of 8 from 8 to 64.
        channels: 1 (gray) or 3 (the gray image in each of three channels).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: images float32 of shape
        ``(N, channels, image_size, image_size)`` with values in [0, 1] (``count / 16``
        at the default size), labels int64 in 0..9.

    Raises:
        ConfigError: an argument is out of range or of the wrong type (the message
            names it and the accepted values).
        DataError: the packaged data file is missing or damaged.

    >>> x_train, y_train, x_test, y_test = load_digits(test_fraction=0.25, seed=3)
    >>> x_train.dtype, y_train.dtype, float(x_train.max())
    (dtype('float32'), dtype('int64'), 1.0)
    >>> len(y_train) + len(y_test)
    1797
    >>> x_train, _, x_test, _ = load_digits(image_size=32, channels=3)
    >>> x_train.shape, x_test.shape, x_train.dtype
    ((1438, 3, 32, 32), (359, 3, 32, 32), dtype('float32'))
    """
    _check_test_fraction(test_fraction)
    _check_seed(seed)
    _check_image_size(image_size)
    _check_channels(channels)
    images, labels = _parse_digits_csv(_read_packaged_file(_DATA_PACKAGE), _DATA_FILE[-1])
    train_index, test_index = _stratified_split(labels, float(test_fraction), int(seed))
    x = (images.astype(np.float32) / np.float32(_MAX_PIXEL_COUNT)).reshape(
        -1, 1, _IMAGE_SIDE, _IMAGE_SIDE
    )
    if image_size != _IMAGE_SIDE:
        x = _upsample_bilinear(x, int(image_size))
    if channels != 1:
        x = np.repeat(x, channels, axis=1)
    return x[train_index], labels[train_index], x[test_index], labels[test_index]


def _upsample_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """(N, 1, 8, 8) float32 -> (N, 1, size, size) float32, bilinear with half-pixel centres
    (the formula in ``load_digits``'s docstring)."""
    u = np.clip((np.arange(size) + 0.5) * _IMAGE_SIDE / size - 0.5, 0.0, _IMAGE_SIDE - 1)
    low = np.floor(u).astype(np.intp)
    high = np.minimum(low + 1, _IMAGE_SIDE - 1)
    weight_high = u - low
    weight_low = 1.0 - weight_high
    x64 = x.astype(np.float64)
    rows = x64[:, :, low, :] * weight_low[:, None] + x64[:, :, high, :] * weight_high[:, None]
    return (rows[:, :, :, low] * weight_low + rows[:, :, :, high] * weight_high).astype(np.float32)


def _check_test_fraction(test_fraction: object) -> None:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise ConfigError(
            f"load_digits: test_fraction must be a real number in the open interval (0, 1), "
            f"got {test_fraction!r} of type {type(test_fraction).__name__}"
        )
    if not 0.0 < float(test_fraction) < 1.0:  # also rejects NaN
        raise ConfigError(
            f"load_digits: test_fraction must be in the open interval (0, 1), "
            f"got {test_fraction!r}"
        )


def _check_image_size(image_size: object) -> None:
    accepted = list(range(_IMAGE_SIDE, _MAX_IMAGE_SIZE + 1, _IMAGE_SIDE))
    if (isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral)
            or image_size not in accepted):
        raise ConfigError(
            f"load_digits: image_size must be a multiple of {_IMAGE_SIDE} from {_IMAGE_SIDE} to "
            f"{_MAX_IMAGE_SIZE} ({', '.join(map(str, accepted))}), got {image_size!r}"
        )


def _check_channels(channels: object) -> None:
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels not in (1, 3):
        raise ConfigError(
            f"load_digits: channels must be 1 (gray) or 3 (the gray image repeated), got {channels!r}"
        )


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(
            f"load_digits: seed must be a non-negative integer, "
            f"got {seed!r} of type {type(seed).__name__}"
        )
    if int(seed) < 0:
        raise ConfigError(f"load_digits: seed must be a non-negative integer, got {seed!r}")


def _read_packaged_file(package: str) -> bytes:
    """The raw bytes of ``_data/digits.csv.gz`` inside ``package``.

    ``importlib.resources`` finds the file in a source tree, an editable install,
    a wheel or a zip archive alike.
    """
    resource = resources.files(package)
    for part in _DATA_FILE:
        resource = resource.joinpath(part)
    try:
        return resource.read_bytes()
    except (FileNotFoundError, NotADirectoryError, KeyError) as error:
        # zipfile.Path raises KeyError for a member that is not in the archive
        raise DataError(
            f"digits: the packaged data file {'/'.join(_DATA_FILE)} is missing from "
            f"{package!r}; reinstall qatcore ({type(error).__name__}: {error})"
        ) from error


def _parse_digits_csv(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Decompress and check the digits CSV; returns pixel counts (N, 64) uint8 and labels int64.

    Every way the file can be damaged (bad gzip stream, text that is not numbers,
    wrong number of rows or columns, values out of range) becomes a DataError
    naming ``source``.
    """
    try:
        text = gzip.decompress(raw).decode("ascii")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as error:
        raise DataError(
            f"digits: {source} is not a readable gzip-compressed ASCII file "
            f"({type(error).__name__}: {error}); reinstall qatcore"
        ) from error

    rows = text.split()
    num_columns = _IMAGE_SIDE * _IMAGE_SIDE + 1
    if len(rows) != _NUM_IMAGES:
        raise DataError(
            f"digits: {source} has {len(rows)} rows, expected {_NUM_IMAGES}; "
            f"the file is damaged, reinstall qatcore"
        )
    table = np.empty((_NUM_IMAGES, num_columns), dtype=np.int64)
    for row_number, row in enumerate(rows):
        fields = row.split(",")
        if len(fields) != num_columns:
            raise DataError(
                f"digits: {source} row {row_number + 1} has {len(fields)} comma-separated "
                f"values, expected {num_columns} (64 pixels and a label)"
            )
        try:
            table[row_number] = [int(field) for field in fields]
        except ValueError as error:
            raise DataError(
                f"digits: {source} row {row_number + 1} holds a value that is not an "
                f"integer ({error})"
            ) from error

    counts, labels = table[:, :-1], table[:, -1]
    if counts.min() < 0 or counts.max() > _MAX_PIXEL_COUNT:
        raise DataError(
            f"digits: {source} has pixel values in [{counts.min()}, {counts.max()}], "
            f"expected 0..{_MAX_PIXEL_COUNT}"
        )
    if labels.min() < 0 or labels.max() >= _NUM_CLASSES:
        raise DataError(
            f"digits: {source} has labels in [{labels.min()}, {labels.max()}], "
            f"expected 0..{_NUM_CLASSES - 1}"
        )
    missing = sorted(set(range(_NUM_CLASSES)) - set(labels.tolist()))
    if missing:
        raise DataError(f"digits: {source} has no images of class(es) {missing}")
    return counts.astype(np.uint8), labels.copy()


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test row indices; per class a seeded random subset goes to test."""
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for label in range(_NUM_CLASSES):
        members = np.flatnonzero(labels == label)
        # round half up (Python's round() would round half to even)
        num_test = math.floor(test_fraction * members.size + 0.5)
        num_test = min(max(num_test, 1), members.size - 1)
        shuffled = rng.permutation(members)
        test_parts.append(shuffled[:num_test])
        train_parts.append(shuffled[num_test:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(test_parts))
