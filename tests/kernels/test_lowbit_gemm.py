"""qatcore.kernels.lowbit_gemm against NumPy oracles written from its docstring: the dynamic int8 x
int4 / int2 product bit for bit (int64 group sums, then the float64 loop over the groups as
defined), the weight-only product to 1e-6 of its float32 output (its float64 sums run in the
module's own order; every path of it agrees bit for bit), per-token quantization bit for bit with
``token_qparams`` and ``BlockFakeQuantize.block_qparams``; compiled (every path: VNNI tiles,
vector tiles, loops) and as plain Python."""

import importlib.util
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qatcore.errors import ConfigError, DTypeError, ShapeError
from qatcore.kernels import lowbit_gemm as lg
from qatcore.kernels import lowbit_tiles as lt
from qatcore.kernels.lowbit_pack import grid, pack_lowbit
from qatcore.quantization.group_token_fake_quantize import token_qparams

_bits_spec = importlib.util.spec_from_file_location("kernel_bits", Path(__file__).with_name("bits.py"))
_bits = importlib.util.module_from_spec(_bits_spec)
_bits_spec.loader.exec_module(_bits)
assert_same_bits = _bits.assert_same_bits

# ----------------------------------------------------------------------------------------
# The oracles


def oracle_quantize_per_token(x, bits, symmetric):
    """token_qparams, then block_qparams' integers: clip(rint(x * (1 / s)) + z), NaN -> 0."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    with np.errstate(all="ignore"):
        scale, zero_point = token_qparams(x, bits, symmetric)
        integers = np.clip(np.rint(x * (1 / scale[:, None])) + zero_point[:, None], qmin, qmax)
    return (np.nan_to_num(integers).astype(np.int8), np.nan_to_num(zero_point).astype(np.int32),
            scale.astype(np.float32))


def oracle_dynamic(x_q, x_zero, x_scale, w_q, w_scale, group_size, bias, float64=False):
    """isum in int64; acc = acc + float64(isum) * float64(s) group by group; float32(acc * x_scale)
    (+ bias). ``float64``: acc itself."""
    rows, depth = x_q.shape
    groups = depth // group_size
    centred = (x_q.astype(np.int64) - x_zero.astype(np.int64)[:, None]).reshape(rows, groups, group_size)
    isum = np.einsum("mgi,ngi->mng", centred, w_q.astype(np.int64).reshape(-1, groups, group_size))
    acc = np.zeros(isum.shape[:2])
    with np.errstate(all="ignore"):
        for g in range(groups):
            acc = acc + isum[:, :, g].astype(np.float64) * w_scale[:, g].astype(np.float64)
        if float64:
            return acc
        y = (acc * x_scale.astype(np.float64)[:, None]).astype(np.float32)
        return y if bias is None else y + bias


def oracle_weight_only(x, w_q, w_scale, w_zero, group_size, bias):
    """(y, bound): the float64 definition summed left to right, and what it may differ by: 1e-6
    of |y| and |bias|, and 1e-12 of the sum of |terms| (float64 rounding under cancellation)."""
    rows, depth = x.shape
    groups = depth // group_size
    zero = np.zeros(w_scale.shape, np.int64) if w_zero is None else w_zero.astype(np.int64)
    weight = (w_q.astype(np.int64) - np.repeat(zero, group_size, axis=1)).astype(np.float64)
    x64 = x.astype(np.float64)
    acc, magnitude = np.zeros((rows, w_q.shape[0])), np.zeros((rows, w_q.shape[0]))
    with np.errstate(all="ignore"):
        for g in range(groups):
            part = slice(g * group_size, (g + 1) * group_size)
            scale = w_scale[:, g].astype(np.float64)
            acc = acc + scale * (x64[:, part] @ weight[:, part].T)
            magnitude = magnitude + np.abs(scale) * (np.abs(x64[:, part]) @ np.abs(weight[:, part]).T)
        y = acc.astype(np.float32)
        if bias is not None:
            y = y + bias
        bound = 1e-6 * (np.abs(y) + (0 if bias is None else np.abs(bias))) + 1e-12 * magnitude + 1e-44
    return y, bound




def assert_close(actual, expected, bound):
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    with np.errstate(invalid="ignore"):
        error = np.abs(actual.astype(np.float64) - expected)
        ok = (error <= bound) | (actual == expected)  # equal infinities
    assert ok[~nan].all(), (actual[~ok & ~nan], expected[~ok & ~nan])


# ----------------------------------------------------------------------------------------
# Operands


def random_operands(rng, rows, cols, depth, group_size, bits, fill):
    """(x_q, x_zero, x_scale, w_q, w_scale) for the dynamic product: uniform, or at the rails:
    "rails" puts every value on an end of its range, "max" makes every product (x - z) * w the
    largest, 255 * 2^(bits-1)."""
    qmin, qmax = grid(bits)
    groups = depth // group_size
    if fill == "uniform":
        x_q = rng.integers(-128, 127, (rows, depth), endpoint=True).astype(np.int8)
        x_zero = rng.integers(-128, 127, rows, endpoint=True).astype(np.int32)
        w_q = rng.integers(qmin, qmax, (cols, depth), endpoint=True)
    elif fill == "rails":
        x_q = rng.choice(np.array([-128, 127], np.int8), (rows, depth))
        x_zero = rng.choice(np.array([-128, 127], np.int32), rows)
        w_q = rng.choice(np.array([qmin, qmax]), (cols, depth))
    else:
        x_q = np.full((rows, depth), -128, np.int8)
        x_zero = np.full(rows, 127, np.int32)
        w_q = np.full((cols, depth), qmin)
    x_scale = (2.0 ** rng.uniform(-12, 2, rows)).astype(np.float32)
    w_scale = (2.0 ** rng.uniform(-12, 2, (cols, groups))).astype(np.float32)
    return x_q, x_zero, x_scale, w_q, w_scale


def maybe_bias(rng, cols, with_bias):
    return rng.standard_normal(cols).astype(np.float32) if with_bias else None


def random_weight_only(rng, rows, cols, depth, group_size, bits, fill, zero_kind):
    qmin, qmax = grid(bits)
    groups = depth // group_size
    x = (rng.standard_normal((rows, depth)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    if fill == "uniform":
        w_q = rng.integers(qmin, qmax, (cols, depth), endpoint=True)
    elif fill == "rails":
        w_q = rng.choice(np.array([qmin, qmax]), (cols, depth))
    else:
        w_q = np.full((cols, depth), qmin)
        x = np.abs(x)
    w_scale = (2.0 ** rng.uniform(-12, 2, (cols, groups))).astype(np.float32)
    if zero_kind is None:
        w_zero = None
    elif zero_kind == "grid":
        w_zero = rng.integers(qmin, qmax, (cols, groups), endpoint=True).astype(np.int32)
    else:  # the int32 rails and beyond the fast loop's +-2^28 (torchao's zero point of a NaN group is -2^31)
        w_zero = rng.choice(np.array([-(2**31), 2**31 - 1, 2**28, -(2**28), 2**28 + 1, 3], np.int32), (cols, groups))
    return x, w_q, w_scale, w_zero


# ----------------------------------------------------------------------------------------
# Checks, shared by the hypothesis tests and the plain Python run


def check_dynamic(rows, cols, depth, group_size, bits, fill, with_bias, seed):
    rng = np.random.default_rng(seed)
    x_q, x_zero, x_scale, w_q, w_scale = random_operands(rng, rows, cols, depth, group_size, bits, fill)
    bias = maybe_bias(rng, cols, with_bias)
    w_packed = pack_lowbit(w_q, bits)
    expected = oracle_dynamic(x_q, x_zero, x_scale, w_q, w_scale, group_size, bias)
    y = lg.dynamic_int8_lowbit_gemm(x_q, x_zero, x_scale, w_packed, bits, w_scale, group_size, bias)
    assert_same_bits(y, expected)
    return x_q, x_zero, x_scale, w_packed, w_scale, bias, y


def check_weight_only(rows, cols, depth, group_size, bits, fill, zero_kind, with_bias, seed):
    rng = np.random.default_rng(seed)
    x, w_q, w_scale, w_zero = random_weight_only(rng, rows, cols, depth, group_size, bits, fill, zero_kind)
    bias = maybe_bias(rng, cols, with_bias)
    w_packed = pack_lowbit(w_q, bits)
    y = lg.weight_only_lowbit_gemm(x, w_packed, bits, w_scale, w_zero, group_size, bias)
    assert_close(y, *oracle_weight_only(x, w_q, w_scale, w_zero, group_size, bias))
    return x, w_packed, w_scale, w_zero, bias, y


def check_rows_alone(function, x, arguments, y):
    """Each row computed alone, and a prefix of the rows, give the batch's bits."""
    for m in range(x[0].shape[0]):
        alone = function(*(a[m:m + 1] for a in x), *arguments)
        assert_same_bits(alone, y[m:m + 1])
    half = max(1, x[0].shape[0] // 2)
    assert_same_bits(function(*(a[:half] for a in x), *arguments), y[:half])


SPECIAL_ROWS = ("random", "zeros", "constant", "nan", "inf", "minus_inf", "huge", "subnormal", "ties", "tiny_range")


def special_rows(rng, rows, depth, kind):
    x = (rng.standard_normal((rows, depth)) * 10.0 ** rng.uniform(-4, 4)).astype(np.float32)
    first = x[0]
    if kind == "zeros":
        first[:] = 0
    elif kind == "constant":
        first[:] = first[0]
    elif kind in ("nan", "inf", "minus_inf"):
        first[rng.integers(depth, size=2)] = {"nan": np.nan, "inf": np.inf, "minus_inf": -np.inf}[kind]
    elif kind == "huge":
        first[:] = rng.choice(np.array([-1, 1], np.float32), depth) * np.finfo(np.float32).max
    elif kind == "subnormal":
        first[:] = rng.integers(-3, 4, depth) * np.finfo(np.float32).smallest_subnormal
    elif kind == "ties":
        first[:] = rng.integers(-40, 41, depth) / np.float32(2)
    elif kind == "tiny_range":
        first[:] = np.float32(1000) + rng.integers(0, 3, depth).astype(np.float32) * np.float32(2.0**-10)
    return x


def check_quantize_per_token(rows, depth, bits, symmetric, kind, seed):
    x = special_rows(np.random.default_rng(seed), rows, depth, kind)
    result = lg.quantize_per_token(x, bits, symmetric)
    for actual, expected in zip(result, oracle_quantize_per_token(x, bits, symmetric)):
        assert_same_bits(actual, expected)


# ----------------------------------------------------------------------------------------
# quantize_per_token


@settings(max_examples=120)
@given(st.integers(1, 9), st.integers(1, 70) | st.sampled_from([1, 2, 4096]), st.integers(2, 8), st.booleans(),
       st.sampled_from(SPECIAL_ROWS), st.integers(0, 2**32 - 1))
def test_quantize_per_token_matches_token_qparams(rows, depth, bits, symmetric, kind, seed):
    check_quantize_per_token(rows, depth, bits, symmetric, kind, seed)


@pytest.mark.parametrize("kind", SPECIAL_ROWS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_per_token_special_rows(kind, symmetric):
    for bits in (2, 4, 8):
        check_quantize_per_token(3, 17, bits, symmetric, kind, 5)


def test_quantize_per_token_is_block_fake_quantize_integers():
    from qatcore.quantization.block_fake_quantize import make_fake_quantize
    from qatcore.quantization.config import QuantizationConfig

    spec = QuantizationConfig.int8_dynamic_activation_int4_weight().activation
    x = special_rows(np.random.default_rng(2), 6, 40, "nan")
    x[1] = special_rows(np.random.default_rng(3), 1, 40, "inf")[0]
    x[2] = 0
    scale, zero_point, integers = make_fake_quantize(spec, "x").block_qparams(x)
    x_q, x_zero, x_scale = lg.quantize_per_token(x, spec.bits, spec.scheme.symmetric)
    np.testing.assert_array_equal(x_q, integers)
    assert_same_bits(x_scale, scale.reshape(-1).astype(np.float32))
    np.testing.assert_array_equal(x_zero, np.nan_to_num(zero_point.reshape(-1)).astype(np.int32))
    assert x_zero[0] == 0 and (x_q[0] == 0).all()  # the NaN row: s = NaN, every integer 0


# ----------------------------------------------------------------------------------------
# The dynamic product


@st.composite
def shapes(draw):
    """(rows, cols, K, group_size): K = groups * group_size, odd sizes, one-row inputs, group_size = K."""
    group_size = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 12, 16, 32, 33, 64]))
    groups = draw(st.integers(1, 4))
    rows = draw(st.integers(1, 40) | st.sampled_from([1, 1, 16, 17, 33]))
    cols = draw(st.integers(1, 12) | st.sampled_from([1, 3, 4, 65, 130]))
    return rows, cols, groups * group_size, group_size


@settings(max_examples=80)
@given(shapes(), st.sampled_from([4, 2]), st.sampled_from(["uniform", "uniform", "rails", "max"]), st.booleans(),
       st.integers(0, 2**32 - 1))
def test_dynamic_matches_oracle_bit_for_bit(shape, bits, fill, with_bias, seed):
    check_dynamic(*shape, bits, fill, with_bias, seed)


@settings(max_examples=25)
@given(shapes(), st.sampled_from([4, 2]), st.sampled_from(["uniform", "rails"]), st.integers(0, 2**32 - 1))
def test_dynamic_loops_match_oracle_bit_for_bit(shape, bits, fill, seed):
    """The path of CPUs without AVX-512 VNNI (and of plain Python), compiled."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lg, "USE_VNNI", False)
        check_dynamic(*shape, bits, fill, True, seed)


@pytest.mark.parametrize("bits", [4, 2])
def test_dynamic_largest_products_are_exact(bits):
    """|x - z| = 255 and |w| = 2^(bits-1) everywhere, one long group and many short ones."""
    for depth, group_size in ((4096, 4096), (4096, 32), (999, 333)):
        x_q, x_zero, x_scale, w_packed, w_scale, bias, y = check_dynamic(3, 5, depth, group_size, bits, "max", True,
                                                                         1)
        assert np.isfinite(y).all()


def test_dynamic_rows_alone_give_the_batch_bits():
    for bits, group_size, rows in ((4, 32, 37), (2, 7, 20), (4, 128, 16)):
        x_q, x_zero, x_scale, w_packed, w_scale, bias, y = check_dynamic(rows, 70, 4 * group_size, group_size, bits,
                                                                         "uniform", True, rows)
        check_rows_alone(lg.dynamic_int8_lowbit_gemm, (x_q, x_zero, x_scale),
                         (w_packed, bits, w_scale, group_size, bias), y)


def test_dynamic_parallel_serial_and_loops_agree(monkeypatch):
    rng = np.random.default_rng(9)
    x_q, x_zero, x_scale, w_q, w_scale = random_operands(rng, 50, 200, 256, 32, 4, "uniform")
    w_packed, bias = pack_lowbit(w_q, 4), maybe_bias(rng, 200, True)
    results = []
    for vnni in (lg.USE_VNNI, False):
        for threshold in (0, 2**62):
            monkeypatch.setattr(lg, "USE_VNNI", vnni)
            monkeypatch.setattr(lg, "PARALLEL_MIN_MACS", threshold)
            results.append(lg.dynamic_int8_lowbit_gemm(x_q, x_zero, x_scale, w_packed, 4, w_scale, 32, bias))
    for y in results:
        assert_same_bits(y, oracle_dynamic(x_q, x_zero, x_scale, w_q, w_scale, 32, bias))


def oracle_dynamic_float64(x_q, x_zero, w_q, w_scale, group_size):
    """The float64 acc of the definition, before the activation scale."""
    return oracle_dynamic(x_q, x_zero, np.ones(len(x_q), np.float32), w_q, w_scale, group_size, None, float64=True)


@numba.njit
def run_dynamic_tile(blocks, words, block0, rows, r0, sums, scales, negative_zeros, groups, chunks, acc):
    """The intrinsics are called from compiled code only."""
    if blocks == 2:
        lt.dynamic_tile_2(words, block0, rows, r0, sums, scales, negative_zeros, groups, chunks, acc)
    else:
        lt.dynamic_tile_1(words, block0, rows, r0, sums, scales, negative_zeros, groups, chunks, acc)


@pytest.mark.skipif(not lg.USE_VNNI, reason="the CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("bits, group_size, groups", [(4, 32, 5), (2, 16, 3), (4, 5, 4), (2, 64, 1), (4, 3, 7)])
def test_vnni_tiles_give_the_float64_sums_of_the_definition(bits, group_size, groups):
    """The tiles' float64 sums before the activation scale, bit for bit: the float32 output would
    hide a float64 difference (a group out of order, a product rounded) almost always."""
    rng = np.random.default_rng(group_size)
    depth, padded = groups * group_size, -(-group_size // 4) * 4
    x_q, x_zero, _, w_q, w_scale = random_operands(rng, 40, 8, depth, group_size, bits, "uniform")
    words = np.empty((3, groups * padded // 4, 16), np.uint32)
    x_words = x_q.view(np.uint32) if padded == group_size else np.empty((0, 0), np.uint32)
    lg._activation_words(x_q, x_words, group_size, padded, words)
    negative_zeros = np.zeros((3, 16), np.int32)
    negative_zeros.reshape(-1)[:40] = -(x_zero + 128)
    rows, sums = np.empty((8, groups * padded), np.int8), np.empty((8, groups), np.int32)
    scales = np.empty((8, groups))
    lg._prepare_rows(pack_lowbit(w_q, bits), bits, w_scale, group_size, padded, 0, 8, rows, sums, scales)
    expected = oracle_dynamic_float64(x_q, x_zero, w_q, w_scale, group_size)
    acc = np.empty((4, 32))
    for block0, count in ((0, 2), (2, 1)):
        for r0 in (0, 4):
            run_dynamic_tile(count, words, block0, rows, r0, sums, scales, negative_zeros, groups, padded // 4, acc)
            first, last = 16 * block0, min(40, 16 * (block0 + count))
            assert_same_bits(acc[:, :last - first].T, expected[first:last, r0:r0 + 4])


def weight_only_tile_runner(rows, bits, has_zero, lookup):
    """A compiled caller of a weight-only tile built afresh (either kind, whatever the CPU)."""
    tile = lt.weight_only_tile(rows, bits, has_zero, lookup)

    @numba.njit
    def run(x_split, m0, packed, n0, zeros, scales, chunks, acc):
        tile(x_split, m0, packed, n0, zeros, scales, scales.shape[1], chunks, acc)

    return run


@pytest.mark.parametrize("bits, group_size, zero_kind", [(4, 16, None), (4, 32, "grid"), (2, 32, "rails"),
                                                          (4, 128, "rails"), (2, 64, None)])
@pytest.mark.parametrize("lookup", [False, True])
def test_vector_tiles_are_the_loop_order_in_float64(bits, group_size, zero_kind, lookup):
    """The weight-only vector tiles (AVX-512 table lookups and the portable kind) and the plain
    loops of the same order, before the float32 rounding: every float64 sum bit for bit, fast
    and slow groups (zero points beyond 2^24), one and two rows a tile."""
    if lookup and not lg.USE_LOOKUP:
        pytest.skip("the CPU has no AVX-512")
    rng = np.random.default_rng(group_size + bits)
    depth, per = 3 * group_size, 8 // bits
    x, w_q, w_scale, w_zero = random_weight_only(rng, 3, 6, depth, group_size, bits, "uniform", zero_kind)
    zeros = np.zeros(w_scale.shape, np.int32) if w_zero is None else w_zero
    packed = pack_lowbit(w_q, bits)
    x_split = np.empty((3, per, depth // per))
    lg._split_phases(x, bits, not lookup, x_split)
    partials, lane_sums, acc = np.empty(8), np.empty(8), np.empty((2, 4))
    for height in (1, 2):
        run = weight_only_tile_runner(height, bits, w_zero is not None, lookup)
        for m0 in range(4 - height):
            for n0 in (0, 2):
                run(x_split, m0, packed, n0, zeros, w_scale, group_size // (8 * per), acc)
                for r in range(height):
                    for c in range(4):
                        loop = lg._weight_only_pair(x, m0 + r, packed, n0 + c, bits, zeros, w_scale, group_size,
                                                    partials, lane_sums)
                        assert acc[r, c] == loop or (np.isnan(loop) and np.isnan(acc[r, c])), (m0, n0, r, c)


def test_dynamic_special_scales_propagate_as_defined():
    rng = np.random.default_rng(4)
    x_q, x_zero, x_scale, w_q, w_scale = random_operands(rng, 20, 8, 64, 16, 4, "uniform")
    x_scale[[1, 2]] = np.nan, np.inf
    w_scale[3, 1] = np.inf
    w_scale[4, 0] = 0
    w_scale[5, 2] = np.finfo(np.float32).smallest_subnormal
    y = lg.dynamic_int8_lowbit_gemm(x_q, x_zero, x_scale, pack_lowbit(w_q, 4), 4, w_scale, 16)
    assert_same_bits(y, oracle_dynamic(x_q, x_zero, x_scale, w_q, w_scale, 16, None))


# ----------------------------------------------------------------------------------------
# The weight-only product


@settings(max_examples=80)
@given(shapes(), st.sampled_from([4, 2]), st.sampled_from(["uniform", "uniform", "rails", "max"]),
       st.sampled_from([None, "grid", "rails"]), st.booleans(), st.integers(0, 2**32 - 1))
def test_weight_only_matches_oracle(shape, bits, fill, zero_kind, with_bias, seed):
    check_weight_only(*shape, bits, fill, zero_kind, with_bias, seed)


def check_weight_only_paths_agree(rows, cols, group_size, bits, zero_kind, monkeypatch):
    """The vector tiles and the plain loops (the order of the module docstring written out) give
    the same bits; rows alone and the batch too; parallel and serial too."""
    x, w_packed, w_scale, w_zero, bias, y = check_weight_only(rows, cols, 3 * group_size, group_size, bits,
                                                              "uniform", zero_kind, True, rows + cols)
    arguments = (w_packed, bits, w_scale, w_zero, group_size, bias)
    check_rows_alone(lg.weight_only_lowbit_gemm, (x,), arguments, y)
    for threshold in (0, 2**62):
        monkeypatch.setattr(lg, "PARALLEL_MIN_MACS", threshold)
        assert_same_bits(lg.weight_only_lowbit_gemm(x, *arguments), y)
    monkeypatch.setattr(lg, "USE_VECTOR_TILES", False)
    assert_same_bits(lg.weight_only_lowbit_gemm(x, *arguments), y)


@pytest.mark.parametrize("rows, cols, group_size, bits, zero_kind", [
    (1, 130, 32, 4, None), (5, 67, 16, 4, "grid"), (3, 4, 128, 4, "rails"), (2, 9, 32, 2, "grid"),
    (7, 70, 64, 2, None), (4, 5, 12, 4, "grid"), (1, 3, 32, 4, None), (33, 66, 48, 4, "rails"),
])
def test_weight_only_paths_rows_and_threads_agree(rows, cols, group_size, bits, zero_kind, monkeypatch):
    check_weight_only_paths_agree(rows, cols, group_size, bits, zero_kind, monkeypatch)


def test_weight_only_reads_every_weight_exactly():
    """x = the identity and unit scales: y[m, n] = w_q[n, m] - w_zero[n, m // group_size], exact
    small integers, so every unpacked weight shows through bit for bit."""
    rng = np.random.default_rng(6)
    for bits, depth, group_size in ((4, 64, 16), (2, 96, 32), (4, 45, 9), (2, 7, 7)):
        qmin, qmax = grid(bits)
        w_q = rng.integers(qmin, qmax, (11, depth), endpoint=True)
        w_zero = rng.integers(-3, 3, (11, depth // group_size), endpoint=True).astype(np.int32)
        w_scale = np.ones((11, depth // group_size), np.float32)
        y = lg.weight_only_lowbit_gemm(np.eye(depth, dtype=np.float32), pack_lowbit(w_q, bits), bits, w_scale,
                                       w_zero, group_size)
        np.testing.assert_array_equal(y, (w_q - np.repeat(w_zero, group_size, axis=1)).T.astype(np.float32))


# ----------------------------------------------------------------------------------------
# Shapes, dtypes and arguments


@pytest.mark.parametrize("rows, cols", [(0, 5), (3, 0), (0, 0)])
def test_empty_outputs(rows, cols):
    x_q, w_packed = np.zeros((rows, 8), np.int8), np.zeros((cols, 4), np.uint8)
    w_scale = np.ones((cols, 2), np.float32)
    y = lg.dynamic_int8_lowbit_gemm(x_q, np.zeros(rows, np.int32), np.ones(rows, np.float32), w_packed, 4, w_scale, 4)
    assert y.shape == (rows, cols) and y.dtype == np.float32
    y = lg.weight_only_lowbit_gemm(np.zeros((rows, 8), np.float32), w_packed, 4, w_scale, None, 4)
    assert y.shape == (rows, cols) and y.dtype == np.float32
    q, z, s = lg.quantize_per_token(np.zeros((rows, 8), np.float32))
    assert q.shape == (rows, 8) and z.shape == s.shape == (rows,)


def dynamic_call(**overrides):
    args = dict(x_q=np.zeros((2, 8), np.int8), x_zero=np.zeros(2, np.int32), x_scale=np.ones(2, np.float32),
                w_packed=np.zeros((3, 4), np.uint8), bits=4, w_scale=np.ones((3, 2), np.float32), group_size=4,
                bias=None)
    args.update(overrides)
    return lg.dynamic_int8_lowbit_gemm(**args)


def weight_only_call(**overrides):
    args = dict(x=np.zeros((2, 8), np.float32), w_packed=np.zeros((3, 4), np.uint8), bits=4,
                w_scale=np.ones((3, 2), np.float32), w_zero=None, group_size=4, bias=None)
    args.update(overrides)
    return lg.weight_only_lowbit_gemm(**args)


COMMON_REFUSALS = [
    (dict(group_size=3), ConfigError, r"K = 8 \(columns of x\) is not a multiple of group_size = 3"),
    (dict(group_size=0), ConfigError, "group_size must be a positive integer"),
    (dict(bits=3), ConfigError, "bits must be 2 or 4"),
    (dict(bits=8), ConfigError, "bits must be 2 or 4"),
    (dict(w_packed=np.zeros((3, 4), np.int8)), DTypeError, "w_packed must be a uint8 array"),
    (dict(w_packed=np.zeros((3, 5), np.uint8)), ShapeError, r"w_packed must have shape \(N, 4\) for K = 8"),
    (dict(w_packed=np.zeros((3, 8), np.uint8)[:, ::2]), ShapeError, "w_packed must be C-contiguous"),
    (dict(w_scale=np.ones((3, 2), np.float64)), DTypeError, "w_scale must be a float32 array"),
    (dict(w_scale=np.ones((3, 4), np.float32)), ShapeError,
     r"w_scale must have shape \(N, K / group_size\) = \(3, 2\)"),
    (dict(w_scale=np.ones((2, 3), np.float32).T), ShapeError, "w_scale must be C-contiguous"),
    (dict(bias=np.ones(3, np.float64)), DTypeError, "bias must be a float32 array"),
    (dict(bias=np.ones(4, np.float32)), ShapeError, r"bias must have shape \(N,\) = \(3,\)"),
]


@pytest.mark.parametrize("overrides, error, match", COMMON_REFUSALS + [
    (dict(x_q=np.zeros((2, 8), np.uint8)), DTypeError, "x_q must be a int8 array"),
    (dict(x_q=np.zeros(8, np.int8)), ShapeError, r"x_q must have shape \(M, K\)"),
    (dict(x_q=np.zeros((2, 16), np.int8)[:, ::2]), ShapeError, "x_q must be C-contiguous"),
    (dict(x_q=np.zeros((2, 0), np.int8)), ShapeError, "at least one column"),
    (dict(x_zero=np.zeros(2, np.int64)), DTypeError, "x_zero must be a int32 array"),
    (dict(x_zero=np.zeros(3, np.int32)), ShapeError, r"x_zero must have shape \(M,\) = \(2,\)"),
    (dict(x_zero=np.array([0, 128], np.int32)), ConfigError, r"x_zero must lie in \[-128, 127\]"),
    (dict(x_scale=np.ones(2, np.float64)), DTypeError, "x_scale must be a float32 array"),
    (dict(x_scale=np.ones((2, 1), np.float32)), ShapeError, "x_scale must have shape"),
])
def test_dynamic_refusals(overrides, error, match):
    with pytest.raises(error, match=match):
        dynamic_call(**overrides)


@pytest.mark.parametrize("overrides, error, match", COMMON_REFUSALS + [
    (dict(x=np.zeros((2, 8), np.float64)), DTypeError, "x must be a float32 array"),
    (dict(x=np.zeros((2, 8, 1), np.float32)), ShapeError, r"x must have shape \(M, K\)"),
    (dict(x=np.zeros((8, 2), np.float32).T), ShapeError, "x must be C-contiguous"),
    (dict(w_zero=np.zeros((3, 2), np.int64)), DTypeError, "w_zero must be a int32 array"),
    (dict(w_zero=np.zeros((3, 1), np.int32)), ShapeError, r"w_zero must have shape \(N, K / group_size\)"),
])
def test_weight_only_refusals(overrides, error, match):
    with pytest.raises(error, match=match):
        weight_only_call(**overrides)


def test_group_size_beyond_the_exact_bound_is_refused():
    depth = 2 * lg.MAX_GROUP_SIZE
    with pytest.raises(ConfigError, match="MAX_GROUP_SIZE"):
        dynamic_call(x_q=np.zeros((1, depth), np.int8), x_zero=np.zeros(1, np.int32), x_scale=np.ones(1, np.float32),
                     w_packed=np.zeros((3, depth // 2), np.uint8), w_scale=np.ones((3, 1), np.float32),
                     group_size=depth)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=np.zeros((2, 3), np.float64)), DTypeError, "x must be a float32 array"),
    (dict(x=np.zeros(3, np.float32)), ShapeError, r"x must have shape \(M, K\)"),
    (dict(x=np.zeros((2, 0), np.float32)), ShapeError, "at least one column"),
    (dict(bits=1), ConfigError, "bits must be an integer from 2 to 8"),
    (dict(bits=9), ConfigError, "bits must be an integer from 2 to 8"),
    (dict(symmetric=1), ConfigError, "symmetric must be a bool"),
])
def test_quantize_per_token_refusals(kwargs, error, match):
    arguments = dict(x=np.zeros((2, 3), np.float32))
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        lg.quantize_per_token(**arguments)


def test_inputs_left_alone():
    rng = np.random.default_rng(8)
    x_q, x_zero, x_scale, w_q, w_scale = random_operands(rng, 9, 6, 64, 32, 4, "uniform")
    w_packed, bias = pack_lowbit(w_q, 4), maybe_bias(rng, 6, True)
    x = rng.standard_normal((9, 64)).astype(np.float32)
    arrays = (x_q, x_zero, x_scale, w_packed, w_scale, bias, x)
    before = [a.copy() for a in arrays]
    lg.dynamic_int8_lowbit_gemm(x_q, x_zero, x_scale, w_packed, 4, w_scale, 32, bias)
    lg.weight_only_lowbit_gemm(x, w_packed, 4, w_scale, None, 32, bias)
    lg.quantize_per_token(x)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------
# The same kernels as plain Python


def test_runs_as_plain_python(run_without_jit):
    run_without_jit(__file__, """
        from qatcore.kernels import lowbit_gemm as lg
        assert_plain_python(lg._dynamic_loop_task, lg._weight_only_pair, lg._quantize_tokens, lg._prepare_rows)
        assert not lg.USE_VNNI and not lg.USE_VECTOR_TILES
        for i, kind in enumerate(tests.SPECIAL_ROWS):
            tests.check_quantize_per_token(3, 9, 2 + i % 7, i % 2 == 0, kind, i)
        cases = [(1, 1, 1, 1, 4, "uniform", False, 1), (5, 7, 15, 5, 4, "rails", True, 2),
                 (4, 3, 64, 32, 2, "max", True, 3), (17, 66, 9, 3, 2, "uniform", True, 4)]
        for case in cases:
            x_q, x_zero, x_scale, w_packed, w_scale, bias, y = tests.check_dynamic(*case)
        tests.check_rows_alone(lg.dynamic_int8_lowbit_gemm, (x_q, x_zero, x_scale),
                               (w_packed, 2, w_scale, 3, bias), y)
        for case in [(1, 5, 32, 32, 4, "uniform", None, True, 5), (3, 4, 64, 32, 2, "rails", "rails", False, 6),
                     (2, 66, 21, 7, 4, "uniform", "grid", True, 7)]:
            x, w_packed, w_scale, w_zero, bias, y = tests.check_weight_only(*case)
    """)
