"""Datasets and batching: the embedded 8x8 digits, MNIST IDX files a user already
has, and a resumable :class:`DataLoader`. Nothing here downloads anything.

>>> from qatcore.data import DataLoader, load_digits
>>> x_train, y_train, x_test, y_test = load_digits(seed=0)
>>> len(DataLoader(x_train, y_train, batch_size=64))
23
"""

from qatcore.data.digits import load_digits
from qatcore.data.loader import DataLoader
from qatcore.data.mnist import load_mnist_idx, read_idx
from qatcore.data.sharding import ShardedLoader

__all__ = ["DataLoader", "ShardedLoader", "load_digits", "load_mnist_idx", "read_idx"]
