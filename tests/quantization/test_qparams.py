"""Integer types, QParams from observed ranges (the formulas of docs/numerics.md), quantize/dequantize."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qatcore.errors import ConfigError
from qatcore.quantization import INT4, INT8, INT8_NARROW, UINT4, UINT8, QParams, QScheme, QuantDType
from qatcore.quantization.qparams import FLOAT32_EPS

dtypes = st.builds(
    lambda bits, signed, narrow: QuantDType(bits, signed, narrow and signed),
    st.integers(2, 16), st.booleans(), st.booleans(),
)


def test_ranges():
    assert (INT8.qmin, INT8.qmax) == (-128, 127)
    assert (INT8_NARROW.qmin, INT8_NARROW.qmax) == (-127, 127)
    assert (UINT8.qmin, UINT8.qmax) == (0, 255)
    assert (INT4.qmin, INT4.qmax, UINT4.qmax) == (-8, 7, 15)
    assert (QuantDType(16, False).qmax, QuantDType(2, True).qmin) == (65535, -2)


@pytest.mark.parametrize("kwargs, field", [
    (dict(bits=1), "bits"), (dict(bits=17), "bits"), (dict(bits=8.0), "bits"),
    (dict(bits=8, signed=False, narrow_range=True), "narrow_range"), (dict(bits=8, signed="yes"), "signed"),
])
def test_dtype_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        QuantDType(**kwargs)


def reference(mn, mx, dtype, symmetric):
    """docs/numerics.md, "Scale and zero point from an observed range", with float32 scalars."""
    qmin, qmax = dtype.qmin, dtype.qmax
    mn, mx = np.float32(min(mn, 0.0)), np.float32(max(mx, 0.0))
    if symmetric:
        s = max(np.float32(max(-mn, mx)) / np.float32((qmax - qmin) / 2), FLOAT32_EPS)
        z = 0 if dtype.signed else (qmin + qmax + 1) // 2
    else:
        s = max(np.float32(mx - mn) / np.float32(qmax - qmin), FLOAT32_EPS)
        z = int(np.clip(qmin - np.rint(mn / np.float32(s)), qmin, qmax))
    return np.float32(s), z


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@given(finite, finite, dtypes, st.booleans())
def test_from_range_matches_formulas(a, b, dtype, symmetric):
    mn, mx = min(a, b), max(a, b)
    scheme = QScheme.PER_TENSOR_SYMMETRIC if symmetric else QScheme.PER_TENSOR_AFFINE
    p = QParams.from_range(mn, mx, dtype, scheme)
    s, z = reference(mn, mx, dtype, symmetric)
    assert p.scale[0] == s and p.zero_point[0] == z
    assert np.isfinite(p.scale[0]) and p.scale[0] > 0


@pytest.mark.parametrize("mn, mx", [(0.0, 0.0), (3.0, 3.0), (-2.5, -2.5), (1e-40, 1e-40), (-3e38, 3e38),
                                    (-1e-45, 1e-45), (0.0, 3.4e38)])
@pytest.mark.parametrize("dtype", [INT8, INT8_NARROW, UINT8, INT4, QuantDType(16, False)])
@pytest.mark.parametrize("scheme", [QScheme.PER_TENSOR_AFFINE, QScheme.PER_TENSOR_SYMMETRIC])
def test_degenerate_ranges_give_finite_positive_scales(mn, mx, dtype, scheme):
    p = QParams.from_range(mn, mx, dtype, scheme)
    assert np.isfinite(p.scale[0]) and p.scale[0] > 0
    assert dtype.qmin <= p.zero_point[0] <= dtype.qmax


def test_narrow_symmetric_keeps_largest_weight_unclipped():
    w = np.array([-0.3, 1.27, 0.5], dtype=np.float32)
    p = QParams.from_range(w.min(), w.max(), INT8_NARROW, QScheme.PER_TENSOR_SYMMETRIC)
    assert p.quantize(w)[1] == 127 and p.quantize(-w)[1] == -127


def test_per_channel_and_round_trip():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 2)).astype(np.float32)
    p = QParams.from_range(w.min(axis=(1, 2)), w.max(axis=(1, 2)), INT8_NARROW, QScheme.PER_CHANNEL_SYMMETRIC, 0)
    q = p.quantize(w)
    assert q.dtype == np.int32 and q.min() >= -127 and q.max() <= 127
    err = np.abs(p.dequantize(q) - w)
    assert np.all(err <= p.scale[:, None, None] / 2 + 1e-7)


def test_inverse_multiply_tie_vector():
    # docs/numerics.md, "Fake quantization": x * float32(1/s) = 127.5 rounds to 128; x / s would give 127
    p = QParams(np.float32(0.00214854861), 0, QuantDType(16, True))
    assert p.quantize(np.float32(0.273939937))[()] == 128


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=[0.0], zero_point=[0]), "finite and positive"),
    (dict(scale=[np.inf], zero_point=[0]), "finite and positive"),
    (dict(scale=[1.0], zero_point=[300]), r"\[-128, 127\]"),
    (dict(scale=[1.0, 2.0], zero_point=[0, 0]), "per-tensor"),
    (dict(scale=[1.0, 2.0], zero_point=[0]), "match"),
])
def test_qparams_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QParams(dtype=INT8, **kwargs)


def test_qparams_are_read_only():
    p = QParams([0.5], [3], UINT8)
    with pytest.raises(ValueError):
        p.scale[0] = 1.0
