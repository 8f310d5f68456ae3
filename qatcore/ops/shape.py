"""Shape primitives: reshape, permute, indexing and concatenation. They move
values without changing them, so each backward moves the gradient back."""

from __future__ import annotations

import numpy as np

from qatcore.autograd.function import Function

__all__ = ["Reshape", "Permute", "GetItem", "Cat"]


class Reshape(Function):
    """out = a viewed with a new shape;  da = g reshaped to a's shape."""

    def forward(self, a, shape: tuple[int, ...]):
        self.in_shape = a.shape
        return a.reshape(shape)

    def backward(self, g):
        return (g.reshape(self.in_shape),)


class Permute(Function):
    """out = a with axes reordered by ``dims``;  da = g with the inverse order."""

    def forward(self, a, dims: tuple[int, ...]):
        self.inverse = tuple(int(i) for i in np.argsort(dims))
        return a.transpose(dims)

    def backward(self, g):
        return (g.transpose(self.inverse),)


def _is_basic(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(
        isinstance(i, (int, np.integer, slice)) or i is None or i is Ellipsis for i in items
    )


class GetItem(Function):
    """out = a[index] (numpy basic or advanced indexing);
    da = zeros like a with g added at ``index`` (repeated indices accumulate)."""

    def forward(self, a, index):
        self.in_shape, self.dtype, self.index = a.shape, a.dtype, index
        out = a[index]
        return out if isinstance(out, np.ndarray) else np.asarray(out)

    def backward(self, g):
        da = np.zeros(self.in_shape, dtype=self.dtype)
        if _is_basic(self.index):
            da[self.index] = g  # a basic index selects each element at most once
        else:
            np.add.at(da, self.index, g)
        return (da,)


class Cat(Function):
    """out = a_1, ..., a_n joined along ``axis``;  da_i = the matching slice of g."""

    def forward(self, *arrays, axis: int):
        self.axis = axis
        self.splits = np.cumsum([a.shape[axis] for a in arrays])[:-1]
        return np.concatenate(arrays, axis=axis)

    def backward(self, g):
        return tuple(np.split(g, self.splits, axis=self.axis))
