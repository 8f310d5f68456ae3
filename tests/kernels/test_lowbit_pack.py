"""qatcore.kernels.lowbit_pack against a plain oracle of the layout (element k of a row in byte
k // per at bit (k % per) * bits, two's complement, rows packed independently, padding 0), and
against ONNX's own INT4 / INT2 packing when onnx is installed; also as plain Python."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qatcore.errors import ConfigError, DTypeError, ShapeError
from qatcore.kernels import lowbit_pack

pack, unpack = lowbit_pack.pack_lowbit, lowbit_pack.unpack_lowbit

# ----------------------------------------------------------------------------------------
# The oracle: one element at a time, in Python integers.


def oracle_pack(q, bits):
    per, mask = 8 // bits, (1 << bits) - 1
    rows, k = q.shape
    out = np.zeros((rows, -(-k // per)), np.uint8)
    for n in range(rows):
        for i in range(k):
            out[n, i // per] |= (int(q[n, i]) & mask) << ((i % per) * bits)
    return out


def oracle_unpack(packed, bits, k):
    per, mask, half = 8 // bits, (1 << bits) - 1, 1 << (bits - 1)
    out = np.zeros((packed.shape[0], k), np.int8)
    for n in range(packed.shape[0]):
        for i in range(k):
            field = (int(packed[n, i // per]) >> ((i % per) * bits)) & mask
            out[n, i] = field - 2 * half if field >= half else field
    return out


def random_grid(rng, shape, bits, fill):
    qmin, qmax = lowbit_pack.grid(bits)
    if fill == "min":
        return np.full(shape, qmin, np.int64)
    if fill == "max":
        return np.full(shape, qmax, np.int64)
    if fill == "rails":
        return rng.choice(np.array([qmin, qmax]), size=shape)
    return rng.integers(qmin, qmax, shape, endpoint=True)


def check_round_trip(rows, k, bits, fill, dtype, seed):
    rng = np.random.default_rng(seed)
    q = random_grid(rng, (rows, k), bits, fill).astype(dtype)
    packed = pack(q, bits)
    expected = oracle_pack(q, bits)
    assert packed.dtype == np.uint8 and packed.shape == (rows, -(-k * bits // 8))
    np.testing.assert_array_equal(packed, expected)
    values = unpack(packed, bits, k)
    assert values.dtype == np.int8 and values.shape == (rows, k) and values.flags.c_contiguous
    np.testing.assert_array_equal(values, q)
    np.testing.assert_array_equal(values, oracle_unpack(packed, bits, k))
    for n in range(rows):  # rows are packed independently
        np.testing.assert_array_equal(pack(q[n:n + 1], bits)[0], packed[n])


def check_padding_is_zero_and_ignored(bits):
    per = 8 // bits
    q = np.full((2, 2 * per + 1), -1)  # all bits of every field set
    packed = pack(q, bits)
    assert packed[:, -1].tolist() == [(1 << bits) - 1] * 2  # the last byte holds one field, the rest 0
    dirty = packed.copy()
    dirty[:, -1] |= np.uint8(0xFF ^ ((1 << bits) - 1))  # unpack reads only the k fields
    np.testing.assert_array_equal(unpack(dirty, bits, q.shape[1]), q)


# ----------------------------------------------------------------------------------------
# Known values


def test_int4_nibbles_low_first():
    packed = pack(np.array([[-8, 7, 1], [0, -1, -2]]), 4)
    assert packed.tolist() == [[0x78, 0x01], [0xF0, 0x0E]]


def test_int2_fields_from_bit_0():
    packed = pack(np.array([[1, -2, 0, -1, 1], [-2, -2, -2, -2, -2]]), 2)
    assert packed.tolist() == [[1 | 2 << 2 | 0 << 4 | 3 << 6, 1], [0b10101010, 0b10]]
    assert unpack(packed, 2, 5).tolist() == [[1, -2, 0, -1, 1], [-2] * 5]


@pytest.mark.parametrize("bits", [2, 4])
def test_every_grid_value_round_trips(bits):
    qmin, qmax = lowbit_pack.grid(bits)
    q = np.arange(qmin, qmax + 1)[None, :]
    np.testing.assert_array_equal(unpack(pack(q, bits), bits, q.shape[1]), q)


@pytest.mark.parametrize("bits", [2, 4])
def test_padding_is_zero_and_ignored(bits):
    check_padding_is_zero_and_ignored(bits)


def test_empty_shapes():
    for rows, k in ((0, 5), (3, 0), (0, 0)):
        for bits in (2, 4):
            packed = pack(np.zeros((rows, k), np.int8), bits)
            assert packed.shape == (rows, -(-k * bits // 8)) and packed.dtype == np.uint8
            assert unpack(packed, bits, k).shape == (rows, k)


# ----------------------------------------------------------------------------------------
# Generated cases


@settings(max_examples=150)
@given(st.integers(0, 6) | st.just(1), st.integers(0, 70) | st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9]),
       st.sampled_from([2, 4]), st.sampled_from(["uniform", "uniform", "min", "max", "rails"]),
       st.sampled_from([np.int8, np.int16, np.int32, np.int64]), st.integers(0, 2**32 - 1))
def test_matches_oracle_and_round_trips(rows, k, bits, fill, dtype, seed):
    check_round_trip(rows, k, bits, fill, dtype, seed)


def test_unsigned_input_in_the_grid_is_accepted():
    q = np.array([[0, 1, 7, 3, 5]], np.uint8)
    np.testing.assert_array_equal(pack(q, 4), oracle_pack(q, 4))
    np.testing.assert_array_equal(unpack(pack(q, 4), 4, 5), q)


def test_onnx_packs_each_row_the_same_way():
    numpy_helper = pytest.importorskip("onnx.numpy_helper")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(1)
    for bits, dtype in ((4, ml_dtypes.int4), (2, ml_dtypes.int2)):
        for k in (1, 2, 3, 5, 8, 13):
            q = random_grid(rng, (4, k), bits, "uniform")
            packed = pack(q, bits)
            for n in range(4):
                tensor = numpy_helper.from_array(q[n].astype(dtype))
                assert list(tensor.raw_data) == packed[n].tolist()


# ----------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("bits", [1, 3, 8, 0, True, 4.0, "4"])
def test_bits_other_than_2_and_4_are_refused(bits):
    with pytest.raises(ConfigError, match="bits must be 2 or 4"):
        pack(np.zeros((1, 2), np.int8), bits)
    with pytest.raises(ConfigError, match="bits must be 2 or 4"):
        unpack(np.zeros((1, 1), np.uint8), bits, 2)


@pytest.mark.parametrize("bits, bad, index", [(4, 8, (0, 3)), (4, -9, (1, 0)), (2, 2, (1, 2)), (2, -3, (0, 0))])
def test_values_outside_the_grid_name_the_first_one(bits, bad, index):
    q = np.zeros((2, 4), np.int32)
    q[index] = bad
    q[1, 3] = bad  # a later one, not named
    with pytest.raises(ConfigError, match=rf"q\[{index[0]}, {index[1]}\] = {bad} lies outside the int{bits} grid"):
        pack(q, bits)


def test_bad_dtypes_and_shapes_are_refused():
    with pytest.raises(DTypeError, match="integer"):
        pack(np.zeros((2, 2), np.float32), 4)
    with pytest.raises(ShapeError, match="2-d"):
        pack(np.zeros(4, np.int8), 4)
    with pytest.raises(DTypeError, match="uint8"):
        unpack(np.zeros((2, 2), np.int8), 4, 4)
    with pytest.raises(ShapeError, match=r"\(N, 3\) for k = 5"):
        unpack(np.zeros((2, 2), np.uint8), 4, 5)
    with pytest.raises(ShapeError, match=r"\(N, 2\) for k = 5"):
        unpack(np.zeros(2, np.uint8), 2, 5)
    with pytest.raises(ConfigError, match="k must be"):
        unpack(np.zeros((2, 2), np.uint8), 4, -1)


# ----------------------------------------------------------------------------------------
# As plain Python (the module is NumPy only; the harness checks it runs unchanged there too)


def test_runs_as_plain_python(run_without_jit):
    run_without_jit(__file__, """
        for seed, (rows, k, bits, fill) in enumerate([(3, 7, 4, "uniform"), (2, 9, 2, "rails"), (1, 1, 4, "min"),
                                                      (4, 16, 2, "max")]):
            tests.check_round_trip(rows, k, bits, fill, np.int64, seed)
        tests.check_padding_is_zero_and_ignored(4)
        tests.check_padding_is_zero_and_ignored(2)
    """)
