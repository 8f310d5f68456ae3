"""Sliding-window geometries for the kernel tests (im2col, pooling, int8 conv): one NamedTuple,
the hypothesis strategies that draw valid ones, and the slices the NumPy oracles read through.

The formulas are written out here once for the oracles, not imported from ``kernels/window.py``,
so that a mistake there cannot hide in both. Test files load this module by path (pytest runs
with ``--import-mode=importlib``, and the NUMBA_DISABLE_JIT harness loads test files by path):

    _spec = importlib.util.spec_from_file_location("kernel_geometries", Path(__file__).with_name("geometries.py"))
    geometries = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(geometries)
"""

from typing import NamedTuple

from hypothesis import strategies as st


def output_size(size, kernel, stride, padding, dilation):
    """O = (size + 2*padding - dilation*(kernel - 1) - 1) // stride + 1 outputs along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class WindowGeometry(NamedTuple):
    """An (N, C, H, W) input and a (kh, kw) window with stride, padding and dilation."""

    batch: int
    channels: int
    height: int
    width: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int = 1
    dw: int = 1

    @property
    def window(self):
        """(kh, kw, sh, sw, ph, pw, dh, dw), in the kernels' argument order."""
        return (self.kh, self.kw, self.sh, self.sw, self.ph, self.pw, self.dh, self.dw)

    @property
    def out_height(self):
        return output_size(self.height, self.kh, self.sh, self.ph, self.dh)

    @property
    def out_width(self):
        return output_size(self.width, self.kw, self.sw, self.pw, self.dw)

    @property
    def input_shape(self):
        return (self.batch, self.channels, self.height, self.width)

    @property
    def output_shape(self):
        return (self.batch, self.channels, self.out_height, self.out_width)


def input_sizes(kernel, padding, dilation, max_size):
    """Sizes from the smallest whose padded axis holds one dilated window up to max_size."""
    return st.integers(max(1, dilation * (kernel - 1) + 1 - 2 * padding), max_size)


@st.composite
def window_geometries(draw, max_size=9, dilated=True):
    """Valid geometries only: kernel 1-4, padding at most half the kernel, stride 1-3,
    dilation 1-2 (1 unless ``dilated``), and an input at least as large as one dilated window."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    dh, dw = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if dilated else (1, 1)
    height = draw(input_sizes(kh, ph, dh, max_size))
    width = draw(input_sizes(kw, pw, dw, max_size))
    batch, channels = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    geometry = WindowGeometry(batch, channels, height, width, kh, kw, sh, sw, ph, pw, dh, dw)
    assert geometry.out_height >= 1 and geometry.out_width >= 1
    return geometry


def tap_slices(geometry, i, j):
    """Slices of the padded input read by window tap (i, j) at every output position."""
    g = geometry
    rows = slice(i * g.dh, i * g.dh + g.sh * (g.out_height - 1) + 1, g.sh)
    cols = slice(j * g.dw, j * g.dw + g.sw * (g.out_width - 1) + 1, g.sw)
    return rows, cols
