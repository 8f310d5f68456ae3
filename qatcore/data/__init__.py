"""Datasets and batching: the embedded 8x8 digits and Tiny Shakespeare text, MNIST IDX
files a user already has, a resumable :class:`DataLoader` (over images, or over the
(B, T) windows of :func:`text_windows`) and each rank's share of it
(:class:`ShardedLoader`). Nothing here downloads anything.

>>> from qatcore.data import DataLoader, load_digits
>>> x_train, y_train, x_test, y_test = load_digits(seed=0)
>>> len(DataLoader(x_train, y_train, batch_size=64))
23
"""

from qatcore.data.digits import load_digits
from qatcore.data.loader import DataLoader
from qatcore.data.mnist import load_mnist_idx, read_idx
from qatcore.data.sharding import ShardedLoader
from qatcore.data.text import TextData, load_text, text_windows

__all__ = ["DataLoader", "ShardedLoader", "TextData", "load_digits", "load_mnist_idx", "load_text", "read_idx",
           "text_windows"]
