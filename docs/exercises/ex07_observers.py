"""Exercise 07: observers and one outlier.

Read first: docs/concepts.md, "3. Range setting: observers and calibration"; docs/numerics.md,
"Observers" and "Scale and zero point from an observed range".

Learning goal: see how the range an observer picks decides the error on all the other values,
and compare min/max, a percentile range and qatcore's MSE search.

An *observer* watches the values that flow through a quantizer and proposes a range
[low, high]; the range rule (exercise 01) turns it into a scale and zero point. Here the data
is a bulk of 10000 values, normal with standard deviation 1, plus one *outlier*, 60.0 (a
single activation spike). Quantized to uint8 affine ([0, 255]):

* **min/max** takes low = min(x), high = max(x). The outlier stretches the step to about
  64 / 255 = 0.25 for everyone, and the bulk (mostly within +-3) lands on some 24 levels.
* a **percentile** range takes the (100 - p)-th and p-th percentiles of the data, here
  p = 99.9: the outlier is clipped to high, and the bulk gets a fine step.
* qatcore's **MSE** observer (``"mse"``) tries ranges [a * min, a * max] for a = k/100 and
  keeps the one with the least squared fake-quantization error over everything it saw,
  the outlier included.

qatcore's ``"histogram"`` observer (qatcore/quantization/histogram_observer.py) keeps a
bounded histogram of everything observed and reads the percentile range from it (within about
one bin width of np.percentile of the data). Careful with the name: PyTorch's
``torch.ao.quantization.HistogramObserver`` also keeps a histogram, but it does not read
percentiles: it searches for the range that (approximately) minimises the L2 quantization
error over the histogram, narrowing it bin by bin from either end (``_non_linear_param_search``).
In spirit that is closer to qatcore's ``"mse"`` observer (which instead shrinks both ends by the
same factor) than to qatcore's ``"histogram"``.

The error of a range, measured on the bulk only (the values we care about):

    MSE = mean over the bulk of (fake_quant(x) - x)^2        (float64, uint8 affine grid)

What to implement: ``minmax_range``, ``percentile_range`` and ``bulk_mse``.
Hints: np.percentile (its default linear interpolation is fine); ``uint8_fake_quantize`` (given)
quantizes with the grid of a range.
What to observe (``main()``): the percentile range has a step 10 times finer than min/max and
a bulk MSE about 17 times smaller (not 100: the 0.2 % of the bulk beyond the percentiles is
clipped too); the outlier pays, clipped from 60 to about 3.15. qatcore's histogram observer
gives nearly the same range. The MSE observer keeps the outlier: it weighs every value seen,
and clipping 60 to about 3 would cost 57^2, about 3250, in the sum, far more than the whole
bulk gains (10000 * 0.005, about 50). A search minimises the error it is given; choose that
error (and the data it sees) with care.
Check: pytest docs/exercises -k ex07 (your min/max range equal to qatcore's MinMaxObserver, your
percentile range within two bins of qatcore's histogram observer, your MSE equal to the
reference, and the orders of the errors).
"""

import numpy as np

from qatcore.quantization import UINT8, QuantSpec, fake_quantize, make_observer
from qatcore.quantization.qparams import scale_zero_point_from_range

EXERCISE_FUNCTIONS = ("minmax_range", "percentile_range", "bulk_mse")

PERCENTILE = 99.9
OUTLIER = 60.0


def minmax_range(x: np.ndarray) -> tuple[np.float32, np.float32]:
    """(min(x), max(x)) as float32 scalars."""
    raise NotImplementedError("exercise 07: write minmax_range() (see its docstring)")


def percentile_range(x: np.ndarray, percentile: float) -> tuple[np.float32, np.float32]:
    """(the (100 - p)-th percentile, the p-th percentile) of x, as float32 scalars."""
    raise NotImplementedError("exercise 07: write percentile_range() (see its docstring)")


def bulk_mse(x: np.ndarray, bulk: np.ndarray, low: float, high: float) -> float:
    """mean((fake_quant(x) - x)^2) over x[bulk] with the uint8 affine grid of [low, high], float64."""
    raise NotImplementedError("exercise 07: write bulk_mse() (see its docstring)")


def data(seed: int = 7, size: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """(x, bulk): normal values and one outlier at the end; bulk is True except for the outlier."""
    x = np.append(np.random.default_rng(seed).normal(size=size), OUTLIER).astype(np.float32)
    return x, np.arange(x.size) < size


def uint8_fake_quantize(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """fake_quant(values) on the uint8 affine grid of the range [low, high] (given; qatcore's rule)."""
    scale, zero_point = scale_zero_point_from_range(low, high, UINT8, symmetric=False)
    return fake_quantize(values, scale[0], zero_point[0], UINT8.qmin, UINT8.qmax)


def observer_range(x: np.ndarray, kind: str, **options) -> tuple[np.float32, np.float32]:
    """The range qatcore's observer ``kind`` ("minmax", "histogram", "mse") picks for x (given)."""
    observer = make_observer(QuantSpec(observer=kind, observer_options=options))
    observer.observe(x)
    return observer.min_val.data[0], observer.max_val.data[0]


def main() -> None:
    """Print what the module docstring asks you to observe."""
    x, bulk = data()
    ranges = {
        "min/max": minmax_range(x),
        f"percentile {PERCENTILE}": percentile_range(x, PERCENTILE),
        f"qatcore histogram {PERCENTILE}": observer_range(x, "histogram", percentile=PERCENTILE),
        "qatcore mse": observer_range(x, "mse"),
    }
    for name, (low, high) in ranges.items():
        scale, _ = scale_zero_point_from_range(low, high, UINT8, symmetric=False)
        outlier = uint8_fake_quantize(x[-1:], low, high)[0]
        print(f"{name:24s}: range [{low:8.4f}, {high:8.4f}], scale {scale[0]:.4f}, "
              f"bulk MSE {bulk_mse(x, bulk, low, high):.2e}, outlier -> {outlier:.2f}")


if __name__ == "__main__":
    main()
