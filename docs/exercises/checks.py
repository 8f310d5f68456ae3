"""The checks of the exercises: ``check_exNN(module)`` asserts the properties exercise NN asks
for, with qatcore's own implementation as the oracle (bit for bit where qatcore is exact).

Each check takes the module (your ``docs/exercises/exNN_*.py`` or its solution), calls the
functions you wrote on inputs of its own (fixed seeds) and raises AssertionError with a message
that says what differs. You do not need to read this file to do the exercises, but you may: it
is the precise statement of what "solved" means.
"""

import math

import numpy as np

import qatcore
from qatcore.kernels.fake_quant import fake_quantize_backward
from qatcore.kernels.int8_gemm import int8_gemm_int32
from qatcore.kernels.requantize import multiply_by_quantized_multiplier, quantize_multiplier
from qatcore.nn import Parameter
from qatcore.nn import functional as F
from qatcore.quantization import (
    INT8,
    INT8_NARROW,
    UINT8,
    QParams,
    QScheme,
    QuantDType,
    QuantSpec,
    fake_quantize,
    fake_quantize_learnable,
    make_observer,
)
from qatcore.quantization.fake_quantize import default_grad_factor
from qatcore.quantization.qat import QATLinearBn1d
from qatcore.quantization.qat.statistics import sqnr_db
from qatcore.quantization.qparams import scale_zero_point_from_range

__all__ = ["check_ex01", "check_ex02", "check_ex03", "check_ex04", "check_ex05", "check_ex06", "check_ex07",
           "check_ex08", "check_ex09"]


def _equal_bits(mine, oracle: np.ndarray, what: str) -> None:
    """mine == oracle element for element, same dtype and shape (NaN equal to NaN)."""
    mine = np.asarray(mine)
    assert mine.dtype == oracle.dtype, f"{what}: dtype {mine.dtype}, expected {oracle.dtype}"
    assert mine.shape == oracle.shape, f"{what}: shape {mine.shape}, expected {oracle.shape}"
    same = mine == oracle
    if mine.dtype.kind == "f":
        same |= np.isnan(mine) & np.isnan(oracle)
    if not np.all(same):
        i = np.flatnonzero(~same)[0]
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.size} values differ from qatcore's; "
                             f"the first at flat index {i}: {mine.ravel()[i]!r}, expected {oracle.ravel()[i]!r}")


# ---------------------------------------------------------------------------------------------
# 01: fake quantization, scale and zero point


def check_ex01(module) -> None:
    rng = np.random.default_rng(1)
    cases = [  # (scale, zero point, qmin, qmax)
        (0.037, 3, 0, 15), (0.1, 0, -8, 7), (0.0213, 128, 0, 255), (0.5, 3, 0, 15), (0.25, -3, -8, 7),
        (0.00214854861, 0, 0, 255), (1.7, 0, -127, 127),
    ]
    for scale, zero_point, qmin, qmax in cases:
        s = np.float32(scale)
        randoms = (rng.normal(size=300) * s * (qmax - qmin) / 3).astype(np.float32)
        # ties: x * inv lands exactly on k + 1/2 for power-of-two scales; the test vector for the other
        ties = ((np.arange(-20, 20) + np.float32(0.5)) * s).astype(np.float32)
        for x in (randoms, ties, np.array([0.273939937, 1.25, -0.75, 0.0, -0.0], np.float32)):
            mine = module.fake_quantize(x, s, zero_point, qmin, qmax)
            oracle = fake_quantize(x, s, zero_point, qmin, qmax)
            _equal_bits(mine, oracle, f"fake_quantize(s={scale}, z={zero_point}, [{qmin}, {qmax}])")
    # the ties that decide: the inverse, and z after rounding
    assert module.fake_quantize(np.array([0.273939937], np.float32), np.float32(0.00214854861), 0, 0, 255)[0] \
        == np.float32(128) * np.float32(0.00214854861), "multiply by float32(1) / s, do not divide by s"
    assert module.fake_quantize(np.array([1.25], np.float32), 0.5, 3, 0, 15)[0] == np.float32(1.0), \
        "add the zero point after rounding: 3 + rne(2.5) = 5"

    ranges = [(-1.0, 3.0), (0.5, 2.0), (-0.6, 1.0), (-2.5, -0.3), (0.0, 0.0), (-1e-3, 7.3), (-3.7, 0.05)]
    dtypes = [(UINT8, False), (INT8, True), (INT8_NARROW, True), (UINT8, True), (QuantDType(4, True), False),
              (QuantDType(4, False), False), (QuantDType(3, True, True), True)]
    for low, high in ranges:
        for dtype, symmetric in dtypes:
            scale, zero_point = module.scale_zero_point_from_range(low, high, dtype.qmin, dtype.qmax, symmetric)
            s, z = scale_zero_point_from_range(low, high, dtype, symmetric)
            what = f"scale_zero_point_from_range({low}, {high}, [{dtype.qmin}, {dtype.qmax}], symmetric={symmetric})"
            _equal_bits(np.array([scale]), s, what + " scale")
            assert int(zero_point) == int(z[0]), f"{what}: zero point {zero_point}, expected {int(z[0])}"


# ---------------------------------------------------------------------------------------------
# 02: LSQ's scale gradient


def _qatcore_scale_terms(x: np.ndarray, scale: float, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """qatcore's dy/ds of every element, float32: x as a column with one channel per element (so
    each channel's scale gradient is one term), grad_factor 1 and dy = 1."""
    channels = x.size
    scales = Parameter(np.full(channels, np.float32(scale)))
    zero_points = qatcore.tensor(np.full(channels, np.float32(zero_point)))     # not learned: LSQ
    y = fake_quantize_learnable(qatcore.tensor(x), scales, zero_points, qmin, qmax, axis=0, grad_factor=1.0)
    y.sum().backward()
    return scales.grad


def _staircase(x: np.ndarray, scale: float, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """The real fake-quantization function of the scale, y(s) = s * (clamp(z + rne(x/s)) - z), float64."""
    return scale * (np.clip(zero_point + np.rint(x / scale), qmin, qmax) - zero_point)


def check_ex02(module) -> None:
    rng = np.random.default_rng(2)
    for scale, zero_point, qmin, qmax in ((0.1, 0, -8, 7), (0.037, 3, 0, 15), (0.02, 0, -127, 127)):
        s = np.float32(scale)
        x = (rng.normal(size=400) * s * (qmax - qmin) / 3).astype(np.float32)
        terms = np.asarray(module.scale_gradient_terms(x, s, zero_point, qmin, qmax))
        assert terms.shape == x.shape, f"scale_gradient_terms: shape {terms.shape}, expected {x.shape}"
        oracle = _qatcore_scale_terms(x, s, zero_point, qmin, qmax)
        q = np.rint(x * (np.float32(1) / s)) + zero_point
        clipped = (q < qmin) | (q > qmax)
        assert clipped.any() and (~clipped).any(), "the check's data must have both regions"
        # clipped: qmin - z or qmax - z, integers, exactly
        _equal_bits(terms[clipped].astype(np.float32), oracle[clipped], f"dy/ds where clipped (s={scale})")
        # inside: (q - z) - x/s, in [-1/2, 1/2]; ((q - z) * s - x) * inv in float64 gives qatcore's bits,
        # other correct forms differ by float rounding, at most a few units of 1e-7 per step of |q - z|
        error = np.abs(terms[~clipped] - oracle[~clipped])
        allowed = 1e-6 * (1 + np.abs(q[~clipped] - zero_point))
        assert np.all(error <= allowed), (
            f"dy/ds inside the range (s={scale}, z={zero_point}): largest difference from qatcore's "
            f"{error.max():.3g}; inside, dy/ds = rne(x/s) - x/s")

        # a finite difference of the staircase: equal where clipped, (q - z) inside, so LSQ's term = it - x/s
        x64, s64 = x.astype(np.float64), float(s)
        lower, upper = s64 * (1 - 1e-7), s64 * (1 + 1e-7)
        smooth = np.rint(x64 / lower) == np.rint(x64 / upper)
        slope = (_staircase(x64, upper, zero_point, qmin, qmax) - _staircase(x64, lower, zero_point, qmin, qmax)) \
            / (upper - lower)
        assert np.allclose(terms[smooth & clipped], slope[smooth & clipped], rtol=1e-6, atol=1e-6), \
            "where clipped, dy/ds is the slope of s * (qmax - z): qmax - z (or qmin - z)"
        inside = smooth & ~clipped
        assert np.allclose(terms[inside], slope[inside] - x64[inside] / s64, atol=1e-5), \
            "inside, LSQ's dy/ds is the staircase's slope (q - z) minus x/s, what the STE adds"

        assert math.isclose(module.grad_factor(x.size, qmax), default_grad_factor(x.size, qmax), rel_tol=1e-12), \
            "grad_factor: 1 / sqrt(numel * qmax)"
        grad_y = rng.normal(size=x.size).astype(np.float32)
        scale_param = Parameter(np.array([s], np.float32))
        y = fake_quantize_learnable(qatcore.tensor(x), scale_param, qatcore.tensor(np.float32([zero_point])),
                                    qmin, qmax)
        (y * qatcore.tensor(grad_y)).sum().backward()
        mine = module.scale_gradient(x, grad_y, s, zero_point, qmin, qmax)
        assert np.asarray(mine).dtype == np.float32, "scale_gradient returns a float32"
        # the same terms summed in another order: equal up to float64 rounding and one float32 rounding
        bound = 1e-6 * float(np.sum(np.abs(grad_y * oracle))) * default_grad_factor(x.size, qmax) + 1e-30
        assert abs(float(mine) - float(scale_param.grad[0])) <= bound, \
            f"scale_gradient {mine}, qatcore's {scale_param.grad[0]}"


# ---------------------------------------------------------------------------------------------
# 03: the STE mask


def check_ex03(module) -> None:
    rng = np.random.default_rng(3)
    for scale, zero_point, qmin, qmax in ((0.1, 0, -8, 7), (1 / 7, 0, -7, 7), (0.037, 3, 0, 15)):
        s = np.float32(scale)
        x = np.concatenate([(rng.normal(size=500) * s * (qmax - qmin) / 3),
                            [0.74, 0.76, -0.84, -0.86, (qmax + 0.5) * s, (qmin - 0.5) * s]]).astype(np.float32)
        grad_y = rng.normal(size=x.size).astype(np.float32)
        grad_y[:5] = [-1.0, -0.0, np.inf, -2.0, 3.0]
        dx, _, _, clipped = fake_quantize_backward(grad_y, x, np.float32([s]), np.float32([zero_point]),
                                                   qmin, qmax, None, "ste", 1.0)
        mine = module.ste_backward(grad_y, x, s, zero_point, qmin, qmax)
        _equal_bits(mine, dx, f"ste_backward(s={scale}, z={zero_point}, [{qmin}, {qmax}])")
        assert np.array_equal(np.signbit(mine), np.signbit(dx)), "ste_backward: multiply by the mask (signs of 0)"
        identity = module.identity_backward(grad_y, x, s, zero_point, qmin, qmax)
        _equal_bits(identity, grad_y, "identity_backward")
        fraction = module.clip_fraction(x, s, zero_point, qmin, qmax)
        assert fraction == int(clipped[0]) / x.size, \
            f"clip_fraction {fraction}, qatcore counted {int(clipped[0])} of {x.size} clipped"

    u = module.inputs()
    _, masked_clip, masked_loss = module.train_gain(module.ste_backward, u)
    _, identity_clip, identity_loss = module.train_gain(module.identity_backward, u)
    assert identity_clip > masked_clip + 0.2, \
        f"without the mask the clip fraction should grow: {identity_clip:.3f} vs {masked_clip:.3f} with it"
    assert identity_loss > masked_loss, "without the mask the trained loss should be worse"


# ---------------------------------------------------------------------------------------------
# 04: BatchNorm folding, Krishnamoorthi's form


def _per_channel_int8(qparams: QParams):
    """W -> fake_quant(W) on [-127, 127] with qparams' per-row scales."""
    return lambda w: fake_quantize(w, qparams.scale, qparams.zero_point, -127, 127, axis=0)


def check_ex04(module) -> None:
    for seed in (0, 1):
        linear, bn, x = module.layer_and_batch(seed)
        p = module.parameters(linear, bn)
        layer = QATLinearBn1d(linear, bn, "bn", None, None)
        q_weight, q_bias, _ = layer.folded_parameters()
        folded_weight, folded_bias = module.fold_eval(**p)
        assert np.asarray(folded_weight).dtype == np.float32 and np.asarray(folded_bias).dtype == np.float32
        assert np.allclose(folded_weight, q_weight, rtol=1e-6, atol=1e-7), "W_fold differs from qatcore's"
        assert np.allclose(folded_bias, q_bias, rtol=1e-6, atol=1e-6), "b_fold differs from qatcore's"

        # training, no quantization: the float layer with batch-statistics BatchNorm
        reference = F.batch_norm(F.linear(x, linear.weight, linear.bias), p["running_mean"].copy(),
                                 p["running_var"].copy(), bn.weight, bn.bias, training=True).numpy()
        mine = module.krishnamoorthi_forward(x, **p, weight_fake_quant=lambda w: w)
        assert np.allclose(mine, reference, atol=1e-5), \
            f"training output without quantization: largest difference {np.abs(mine - reference).max():.3g}"

        # frozen, with an int8 per-channel weight quantizer: qatcore's QAT eval output
        weight_qparams = QParams.from_range(q_weight.min(axis=1), q_weight.max(axis=1), INT8_NARROW,
                                            QScheme.PER_CHANNEL_SYMMETRIC, axis=0)

        quantize_weight = _per_channel_int8(weight_qparams)
        frozen = module.krishnamoorthi_forward(x, **p, weight_fake_quant=quantize_weight, use_batch_statistics=False)
        expected = x.astype(np.float64) @ quantize_weight(q_weight).astype(np.float64).T + q_bias
        assert np.allclose(frozen, expected, atol=1e-4), \
            "frozen (running statistics): x @ fake_quant(W_fold).T + b_fold"
        # in training with quantization the correction rescales the quantized path by sigma / sigma_B
        trained = module.krishnamoorthi_forward(x, **p, weight_fake_quant=quantize_weight)
        y_float = x.astype(np.float64) @ linear.weight.data.T.astype(np.float64) + linear.bias.data
        sigma_batch = np.sqrt(y_float.var(axis=0) + bn.eps)
        sigma = np.sqrt(bn.running_var.data.astype(np.float64) + bn.eps)
        gamma = bn.weight.data.astype(np.float64)
        corrected = (x.astype(np.float64) @ quantize_weight(q_weight).astype(np.float64).T) * sigma / sigma_batch \
            + bn.bias.data + (linear.bias.data - y_float.mean(axis=0)) * gamma / sigma_batch
        assert np.allclose(trained, corrected, atol=1e-4), "training with quantization: the corrected output"


# ---------------------------------------------------------------------------------------------
# 05: requantization and the headroom shift


def check_ex05(module) -> None:
    reals = np.array([0.000949952, 0.0016, 0.0387291, 0.2871853, 0.5, 0.75, 2.0**-20, 2.0**-31, 1 - 2.0**-40,
                      0.999999])
    m0, shift = module.quantize_multiplier(reals)
    q_m0, q_shift = quantize_multiplier(reals)
    assert np.array_equal(np.asarray(m0), q_m0) and np.array_equal(np.asarray(shift), q_shift), \
        f"quantize_multiplier: {np.asarray(m0).tolist()}, {np.asarray(shift).tolist()}; expected " \
        f"{q_m0.tolist()}, {q_shift.tolist()}"

    rng = np.random.default_rng(5)
    extremes = np.array([0, 1, -1, 10000, 2**31 - 1, -(2**31), 2**31 + 5, -(2**40), 2**20, -(2**20) - 1])
    for real in reals[q_shift >= 0]:       # M < 1 after rounding (1 - 2^-40 rounds to M0 = 2^30, n = -1)
        (m0,), (shift,) = quantize_multiplier([real])
        acc = np.concatenate([extremes, module.accumulators(real),
                              rng.integers(-(2**31), 2**31, 2000)]).astype(np.int64)
        headroom = module.headroom_shift(acc, int(shift))
        mine = module.fixed_point_multiply(acc, int(m0), int(shift), headroom)
        oracle = multiply_by_quantized_multiplier(acc, m0, shift)
        _equal_bits(np.asarray(mine, np.int64), oracle, f"fixed_point_multiply with the headroom shift, M = {real}")

    for real in module.MULTIPLIERS:
        (m0,), (shift,) = quantize_multiplier([real])
        acc = module.accumulators(real)
        exact = module.exact_product(acc, int(m0), int(shift))
        with_headroom = module.fixed_point_multiply(acc, int(m0), int(shift), module.headroom_shift(acc, int(shift)))
        without = module.fixed_point_multiply(acc, int(m0), int(shift), 0)
        wrong_with, wrong_without = int(np.sum(with_headroom != exact)), int(np.sum(without != exact))
        assert wrong_with == 0, f"M = {real}: {wrong_with} wrong results with the headroom shift"
        # double rounding: about acc.size / 2^(n+1) wrong; well above 0 and below a few times that
        expected = acc.size / 2 ** (int(shift) + 1)
        assert 0.3 * expected < wrong_without < 3 * expected, \
            f"M = {real}: {wrong_without} wrong results without the headroom shift, about {expected:.0f} expected"
    assert module.mismatches(module.accumulators(module.MULTIPLIERS[0]), module.MULTIPLIERS[0], False) > 0


# ---------------------------------------------------------------------------------------------
# 06: per tensor vs per channel


def check_ex06(module) -> None:
    weight = module.weight_matrix()
    dtype = QuantDType(4, signed=True, narrow_range=True)
    per_channel = module.symmetric_scales(weight, dtype.qmax, per_channel=True)
    per_tensor = module.symmetric_scales(weight, dtype.qmax, per_channel=False)
    oracle_channel = QParams.from_range(weight.min(axis=1), weight.max(axis=1), dtype,
                                        QScheme.PER_CHANNEL_SYMMETRIC, axis=0).scale
    oracle_tensor = QParams.from_range(weight.min(), weight.max(), dtype, QScheme.PER_TENSOR_SYMMETRIC).scale
    _equal_bits(per_channel, oracle_channel, "per-channel scales")
    _equal_bits(per_tensor, oracle_tensor, "per-tensor scale")

    rng = np.random.default_rng(6)
    x = rng.normal(size=200).astype(np.float32)
    for y in (x, x + np.float32(0.01), np.round(x, 1), np.zeros_like(x)):
        assert math.isclose(module.sqnr_db(x, y), sqnr_db(x, y), rel_tol=1e-12), "sqnr_db differs from qatcore's"
    quantized_channel = module.fake_quantize_rows(weight, per_channel, dtype.qmax)
    quantized_tensor = module.fake_quantize_rows(weight, per_tensor, dtype.qmax)
    sqnr_channel = module.sqnr_db(weight, quantized_channel)
    sqnr_tensor = module.sqnr_db(weight, quantized_tensor)
    assert sqnr_channel > sqnr_tensor + 3, f"per channel {sqnr_channel:.1f} dB vs per tensor {sqnr_tensor:.1f} dB"
    smallest = int(np.argmin(np.abs(weight).max(axis=1)))
    smallest_tensor = module.sqnr_db(weight[smallest], quantized_tensor[smallest])
    smallest_channel = module.sqnr_db(weight[smallest], quantized_channel[smallest])
    assert smallest_tensor < 1.0 and smallest_channel > 15, \
        f"the smallest row: {smallest_tensor:.1f} dB per tensor, {smallest_channel:.1f} dB per channel"


# ---------------------------------------------------------------------------------------------
# 07: observers on outliers


def check_ex07(module) -> None:
    x, bulk = module.data()
    observer = make_observer(QuantSpec(observer="minmax"))
    observer.observe(x)
    low, high = module.minmax_range(x)
    assert (low, high) == (observer.min_val.data[0], observer.max_val.data[0]), "minmax_range: MinMaxObserver's"

    for percentile in (module.PERCENTILE, 99.0):
        spec = QuantSpec(observer="histogram", observer_options={"percentile": percentile})
        observer = make_observer(spec)
        observer.observe(x)
        width = float(observer.bin_width.data[0])
        p_low, p_high = module.percentile_range(x, percentile)
        assert abs(float(p_low) - float(observer.min_val.data[0])) <= 2 * width, \
            f"percentile_range low {p_low} vs the histogram observer's {observer.min_val.data[0]} (bin {width:.3g})"
        assert abs(float(p_high) - float(observer.max_val.data[0])) <= 2 * width, \
            f"percentile_range high {p_high} vs the histogram observer's {observer.max_val.data[0]} (bin {width:.3g})"

    def reference_mse(range_low, range_high):
        values = x[bulk]
        s, z = scale_zero_point_from_range(range_low, range_high, UINT8, symmetric=False)
        error = fake_quantize(values, s[0], z[0], 0, 255).astype(np.float64) - values
        return float(np.mean(error**2))

    p_low, p_high = module.percentile_range(x, module.PERCENTILE)
    mse_minmax = module.bulk_mse(x, bulk, low, high)
    mse_percentile = module.bulk_mse(x, bulk, p_low, p_high)
    assert math.isclose(mse_minmax, reference_mse(low, high), rel_tol=1e-9), "bulk_mse with the min/max range"
    assert math.isclose(mse_percentile, reference_mse(p_low, p_high), rel_tol=1e-9), "bulk_mse, percentile range"
    assert mse_percentile < mse_minmax / 5, "the percentile range should quantize the bulk far better"
    histogram_low, histogram_high = module.observer_range(x, "histogram", percentile=module.PERCENTILE)
    assert module.bulk_mse(x, bulk, histogram_low, histogram_high) < mse_minmax / 5
    # the MSE observer weighs the outlier too, and keeps it in its range
    mse_low, mse_high = module.observer_range(x, "mse")
    assert mse_high > x[bulk].max() and module.bulk_mse(x, bulk, mse_low, mse_high) > mse_minmax / 2


# ---------------------------------------------------------------------------------------------
# 08: the bit-width sweep


def check_ex08(module) -> None:
    for bits in range(2, 17):
        assert math.isclose(module.predicted_sqnr_db(bits), 20 * math.log10(2**bits - 1), rel_tol=1e-12), \
            f"predicted_sqnr_db({bits})"
    data = module.samples()
    for name, x in data.items():
        table = module.sweep(x)
        assert list(table) == list(module.BIT_WIDTHS), f"sweep({name}): one entry per width, in order"
        for bits, value in table.items():
            dtype = QuantDType(bits, signed=False)
            scale, zero_point = scale_zero_point_from_range(x.min(), x.max(), dtype, symmetric=False)
            oracle = sqnr_db(x, fake_quantize(x, scale[0], zero_point[0], dtype.qmin, dtype.qmax))
            assert math.isclose(value, oracle, rel_tol=1e-12), f"sweep({name})[{bits}] = {value}, expected {oracle}"
        gaps = module.db_per_bit(table)
        assert sorted(gaps) == sorted(b for b in table if b - 1 in table), "db_per_bit: one entry per width"
        for bits, gap in gaps.items():
            assert math.isclose(gap, table[bits] - table[bits - 1], rel_tol=1e-12), f"db_per_bit[{bits}]"
    uniform = module.sweep(data["uniform"])
    for bits, value in uniform.items():   # the documented tolerances
        assert abs(value - 20 * math.log10(2**bits - 1)) < 0.1, f"uniform data, {bits} bits: {value:.2f} dB"
    for bits, gap in module.db_per_bit(uniform).items():
        if bits >= 5:
            assert abs(gap - 20 * math.log10(2)) < 0.35, f"uniform data, {bits - 1} -> {bits} bits: {gap:.2f} dB"


# ---------------------------------------------------------------------------------------------
# 09: integer matmul with zero points


def check_ex09(module) -> None:
    rng = np.random.default_rng(9)
    for rows, depth, outputs in ((5, 40, 6), (1, 1, 1), (7, 300, 3)):
        a_q = rng.integers(0, 256, (rows, depth)).astype(np.uint8)
        b_q = rng.integers(-127, 128, (outputs, depth)).astype(np.int8)
        for a_zero, b_zero in ((128, 0), (0, 0), (37, 5), (255, -3)):
            direct = np.asarray(module.matmul_direct(a_q, a_zero, b_q, b_zero))
            expanded = np.asarray(module.matmul_expanded(a_q, a_zero, b_q, b_zero))
            by_loops = np.array([[sum((int(a_q[i, k]) - a_zero) * (int(b_q[j, k]) - b_zero) for k in range(depth))
                                  for j in range(outputs)] for i in range(rows)], dtype=np.int64)
            assert direct.shape == by_loops.shape and np.array_equal(direct, by_loops), \
                f"matmul_direct(z_a={a_zero}, z_b={b_zero})"
            assert np.array_equal(expanded, by_loops), f"matmul_expanded(z_a={a_zero}, z_b={b_zero})"
            if b_zero == 0:
                assert np.array_equal(direct, int8_gemm_int32(a_q, a_zero, b_q).astype(np.int64)), \
                    "z_b = 0: qatcore's int8 GEMM"
