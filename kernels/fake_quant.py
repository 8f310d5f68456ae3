"""Fake quantization, forward and backward (STE, LSQ, LSQ+), per tensor or per channel.

The arithmetic is that of docs/numerics.md ("Fake quantization", "LSQ and LSQ+"), in float32,
and the forward and the STE gradient are bit for bit what ``torch.fake_quantize_per_tensor_affine``
/ ``..._per_channel_affine`` compute on CPU:

    inv  = float32(1) / s                          # multiply by the inverse, never divide
    q    = z + rne(x * inv)                        # z added AFTER rounding (half to even)
    y    = (clamp(q, qmin, qmax) - z) * s
    mask = qmin <= q <= qmax                       # on the unclamped q
    dx   = dy * mask                               # straight-through estimator

The backward recomputes q from x in the same single pass over memory that writes dx, counts
the clipped elements and, for LSQ/LSQ+ (g = grad_factor), sums per channel in float64:

    region      dscale                              dzero_point (LSQ+)
    q < qmin    dy * (qmin - z) * g                 -dy * s * g
    q > qmax    dy * (qmax - z) * g                 -dy * s * g
    inside      dy * ((q - z) * s - x) * inv * g    0

Each term is evaluated in float64 from the float32 operands (x, dy, s, z, q and the float32
inv; as PyTorch's CPU kernels do before storing each term as float32) and summed in float64;
grad_scale and grad_zero_point are those sums rounded to float32. They agree with
``torch._fake_quantize_learnable_per_tensor_affine`` / ``..._per_channel_affine`` up to
summation order, except where those round z + x * inv as one (ties: 1 + 2.5 -> 4, not 3)
or use int(z + 0.5) as the zero point of their backward (z + 1 for a negative z).

NaN (PyTorch maps a NaN x to qmin; qatcore lets it through): y = NaN; mask = False, so
dx = dy * 0 (a signed zero, what PyTorch's STE gives); not counted as clipped; its dscale
and dzero_point terms are NaN, so a NaN in x makes the scale (and zero-point) gradient NaN,
as y = NaN does to the loss. +-inf in x is clipped like any value beyond the grid (PyTorch's
per-channel kernel turns |x * inv| >= 2^63 into qmin through an int64 overflow; we do not).

Layout. x is viewed flat as ``rows`` of ``channels`` runs of ``inner`` contiguous elements
that share one (s, z) (per tensor: one run of every element). A task covers a group of rows,
a range of channels and a chunk of each run: long runs are cut into chunks of _RUN_CHUNK
elements, short ones are grouped, whole channels to a task, so that a task reads about
_RUN_CHUNK contiguous elements per row. The channel is thus found once per run, never per
element. When runs are shorter than _MIN_RUN (per channel along a trailing axis), the
parameters are instead expanded to one period of the interleaving (repeated to at least
_MIN_PERIOD elements) and read along with x, so the inner loop stays long and contiguous.
The tasks and the order in which their partial sums are reduced do not depend on the driver
(serial or parallel) or on the number of threads, so neither do the results. The inner
loops compile to packed AVX instructions (vmulps, vroundps or vrndscaleps, vcmpps;
vcvtps2pd and vaddpd for the float64 sums).

>>> import numpy as np
>>> x = np.array([-1.0, 0.26, 0.5, 3.0, np.nan], dtype=np.float32)
>>> one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
>>> fake_quantize_forward(x, one * np.float32(0.1), zero, -8, 7, None)
array([-0.8,  0.3,  0.5,  0.7,  nan], dtype=float32)
>>> dx, dscale, dzero_point, clipped = fake_quantize_backward(
...     np.ones(5, np.float32), x, one * np.float32(0.1), zero, -8, 7, None, "ste", 1.0)
>>> dx, dscale, clipped
(array([0., 1., 1., 0., 0.], dtype=float32), None, array([2]))
"""

import math

import numpy as np
from numba import njit, prange

__all__ = ["fake_quantize_forward", "fake_quantize_backward"]

MODES = ("ste", "lsq", "lsq+")

# Elements of one run handled by one task: large enough to amortise a task (a few
# divisions and array views), small enough to balance 16M elements over many threads.
_RUN_CHUNK = 16384
# Runs shorter than this switch to expanded per-element parameters ...
_MIN_RUN = 32
# ... with a period of at least this many elements, processed in tiles of _COLUMN_TILE.
_MIN_PERIOD = 1024
_COLUMN_TILE = 1024
# Enough tasks to balance the parallel driver; more only add partial sums.
_TARGET_TASKS = 64
# Below this many elements the serial driver runs. On an idle machine the parallel driver
# is faster from far smaller arrays, but right after a BLAS call OpenBLAS's threads still
# spin on the cores and a parallel region waits a scheduler slice for its worker, a delay at
# any size (benchmarks/bench_fake_quant.py measures both cases; figures in
# docs/benchmarks.md, "Measurements behind the code"). Training calls fake quant right after
# a GEMM, so only arrays large enough that a stall costs about what parallelism saves go
# parallel.
PARALLEL_MIN_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------
# Per element: the formulas, in one place.


@njit(cache=True)
def _grid_index(x, inv_scale, zero_point):
    """Unclamped q = z + rne(x * inv) in float32 (exact integers up to 2^24; NaN for NaN)."""
    return zero_point + np.rint(x * inv_scale)


@njit(cache=True)
def _fake_quantize_value(x, scale, inv_scale, zero_point, qmin, qmax):
    q = _grid_index(x, inv_scale, zero_point)
    # explicit selects, not min/max: a NaN q must pass through
    q = qmin if q < qmin else q
    q = qmax if q > qmax else q
    return (q - zero_point) * scale


@njit(cache=True)
def _straight_through(grad, x, inv_scale, zero_point, qmin, qmax):
    """(dx, clipped): dx = dy * mask, multiplied (not selected) so signs and inf*0 match torch."""
    q = _grid_index(x, inv_scale, zero_point)
    inside = (q >= qmin) & (q <= qmax)
    clipped = (q < qmin) | (q > qmax)
    return grad * (np.float32(1.0) if inside else np.float32(0.0)), clipped


@njit(cache=True)
def _learned_step(grad, x, scale, inv_scale, zero_point, qmin, qmax, grad_factor):
    """(dx, clipped, dscale, dzero_point) of one element, per the LSQ/LSQ+ table.

    The two parameter terms are evaluated in float64 from the float32 operands, which is also
    what PyTorch's CPU kernels do before storing each term as float32; in float32,
    (q - z) * s - x would lose up to log2|q - z| bits to cancellation. (np.float64(), not
    float(): under the jit float() of a float32 stays float32.)
    """
    q = _grid_index(x, inv_scale, zero_point)
    below = q < qmin
    above = q > qmax
    inside = (q >= qmin) & (q <= qmax)
    dx = grad * (np.float32(1.0) if inside else np.float32(0.0))
    dy, g = np.float64(grad), np.float64(grad_factor)
    s, z = np.float64(scale), np.float64(zero_point)
    if inside:
        dscale = dy * ((np.float64(q) - z) * s - np.float64(x)) * np.float64(inv_scale) * g
        dzero_point = np.float64(0.0)
    elif below or above:
        dscale = dy * (np.float64(qmin if below else qmax) - z) * g
        dzero_point = -dy * s * g
    else:  # NaN x
        dscale = dzero_point = np.float64(np.nan)
    return dx, below | above, dscale, dzero_point


# ----------------------------------------------------------------------------------------
# Per run: a contiguous stretch of x with one (s, z) ("scalar"), or with per-element
# parameters ("vector"). Loops index from 0 over 1-D C-contiguous views so they vectorise.


@njit(cache=True)
def _forward_run_scalar(x, y, scale, inv_scale, zero_point, qmin, qmax):
    for i in range(x.size):
        y[i] = _fake_quantize_value(x[i], scale, inv_scale, zero_point, qmin, qmax)


@njit(cache=True)
def _forward_run_vector(x, y, scale, inv_scale, zero_point, qmin, qmax):
    for i in range(x.size):
        y[i] = _fake_quantize_value(x[i], scale[i], inv_scale[i], zero_point[i], qmin, qmax)


@njit(cache=True)
def _ste_run_scalar(grad, x, dx, inv_scale, zero_point, qmin, qmax):
    clipped = 0
    for i in range(x.size):
        dx[i], outside = _straight_through(grad[i], x[i], inv_scale, zero_point, qmin, qmax)
        clipped += 1 if outside else 0
    return clipped


# With per-element parameters each output gets its own loop over the run (at most
# _COLUMN_TILE elements, so the repeated reads hit L1): one loop writing two arrays from
# five needs more runtime alias checks than LLVM's vectoriser allows, and stays scalar.


@njit(cache=True)
def _ste_run_vector(grad, x, dx, inv_scale, zero_point, qmin, qmax, clipped):
    for i in range(x.size):
        dx[i] = _straight_through(grad[i], x[i], inv_scale[i], zero_point[i], qmin, qmax)[0]
    for i in range(x.size):
        q = _grid_index(x[i], inv_scale[i], zero_point[i])
        clipped[i] += 1 if (q < qmin) | (q > qmax) else 0


# The float64 sums may be reassociated (fastmath "reassoc", here only: the terms come from
# _learned_step, compiled without it, so each is still evaluated exactly as written) so that
# the loop vectorises; the run is then summed in a few interleaved partial sums, which
# differs from the sequential sum only by float64 rounding.


@njit(cache=True, fastmath={"reassoc"})
def _lsq_run_scalar(grad, x, dx, scale, inv_scale, zero_point, qmin, qmax, grad_factor):
    clipped = 0
    dscale = 0.0
    dzero_point = 0.0
    for i in range(x.size):
        dx[i], outside, ds, dz = _learned_step(
            grad[i], x[i], scale, inv_scale, zero_point, qmin, qmax, grad_factor)
        clipped += 1 if outside else 0
        dscale += ds
        dzero_point += dz
    return clipped, dscale, dzero_point


@njit(cache=True)
def _lsq_run_vector(grad, x, dx, scale, inv_scale, zero_point, qmin, qmax, grad_factor,
                    clipped, dscale, dzero_point):
    _ste_run_vector(grad, x, dx, inv_scale, zero_point, qmin, qmax, clipped)
    for i in range(x.size):
        dscale[i] += _learned_step(grad[i], x[i], scale[i], inv_scale[i], zero_point[i], qmin, qmax,
                                   grad_factor)[2]
    for i in range(x.size):
        dzero_point[i] += _learned_step(grad[i], x[i], scale[i], inv_scale[i], zero_point[i], qmin, qmax,
                                        grad_factor)[3]


# ----------------------------------------------------------------------------------------
# Per task: rows [row_lo, row_hi) x channels [c_lo, c_hi) x columns [col_lo, col_hi) of
# each run. ``tiling`` = (rows, channels, inner, chunk, chunks, channels_per_task,
# rows_per_group); see _Plan.


@njit(cache=True)
def _task_bounds(task, tiling):
    rows, channels, inner, chunk, chunks, channels_per_task, rows_per_group = tiling
    tasks_per_group = -(-channels // channels_per_task) * chunks
    group, rest = divmod(task, tasks_per_group)
    channel_group, k = divmod(rest, chunks)
    row_lo, c_lo, col_lo = group * rows_per_group, channel_group * channels_per_task, k * chunk
    return (row_lo, min(rows, row_lo + rows_per_group), c_lo, min(channels, c_lo + channels_per_task),
            col_lo, min(inner, col_lo + chunk))


@njit(cache=True)
def _run_span(row, channel, col_lo, col_hi, tiling, size):
    """Flat [start, stop) of one run; the last row of an expanded period may be short."""
    channels, inner = tiling[1], tiling[2]
    start = (row * channels + channel) * inner + col_lo
    return start, min(start + col_hi - col_lo, size)


@njit(cache=True)
def _forward_task(task, x, y, scale, inv_scale, zero_point, qmin, qmax, tiling, per_element):
    row_lo, row_hi, c_lo, c_hi, col_lo, col_hi = _task_bounds(task, tiling)
    for row in range(row_lo, row_hi):
        for c in range(c_lo, c_hi):
            start, stop = _run_span(row, c, col_lo, col_hi, tiling, x.size)
            if per_element:
                cols = slice(col_lo, col_lo + stop - start)
                _forward_run_vector(x[start:stop], y[start:stop], scale[cols], inv_scale[cols],
                                    zero_point[cols], qmin, qmax)
            else:
                _forward_run_scalar(x[start:stop], y[start:stop], scale[c], inv_scale[c], zero_point[c],
                                    qmin, qmax)


@njit(cache=True)
def _backward_task(task, grad, x, dx, scale, inv_scale, zero_point, qmin, qmax, grad_factor, learned,
                   tiling, per_element, clipped, dscale, dzero_point):
    """Partial results go to row ``task`` of clipped/dscale/dzero_point: column c - c_lo for
    channel c, or one column per tile column when the parameters are per element."""
    row_lo, row_hi, c_lo, c_hi, col_lo, col_hi = _task_bounds(task, tiling)
    for row in range(row_lo, row_hi):
        for c in range(c_lo, c_hi):
            start, stop = _run_span(row, c, col_lo, col_hi, tiling, x.size)
            g, xs, d = grad[start:stop], x[start:stop], dx[start:stop]
            if per_element:
                cols, part = slice(col_lo, col_lo + stop - start), slice(0, stop - start)
                if learned:
                    _lsq_run_vector(g, xs, d, scale[cols], inv_scale[cols], zero_point[cols], qmin, qmax,
                                    grad_factor, clipped[task, part], dscale[task, part],
                                    dzero_point[task, part])
                else:
                    _ste_run_vector(g, xs, d, inv_scale[cols], zero_point[cols], qmin, qmax,
                                    clipped[task, part])
            elif learned:
                n_clipped, ds, dz = _lsq_run_scalar(g, xs, d, scale[c], inv_scale[c], zero_point[c], qmin,
                                                    qmax, grad_factor)
                clipped[task, c - c_lo] += n_clipped
                dscale[task, c - c_lo] += ds
                dzero_point[task, c - c_lo] += dz
            else:
                clipped[task, c - c_lo] += _ste_run_scalar(g, xs, d, inv_scale[c], zero_point[c], qmin,
                                                           qmax)


# Two drivers per pass, the same loop over the same tasks: separate function objects so
# the parallel and serial compilations have separate caches. (prange hands out uint64
# indices; mixed with int64 numba would promote the task arithmetic to float64.)


@njit(cache=True, parallel=True)
def _forward_parallel(x, y, scale, inv_scale, zero_point, qmin, qmax, tiling, per_element, n_tasks):
    for task in prange(n_tasks):
        _forward_task(np.int64(task), x, y, scale, inv_scale, zero_point, qmin, qmax, tiling, per_element)


@njit(cache=True)
def _forward_serial(x, y, scale, inv_scale, zero_point, qmin, qmax, tiling, per_element, n_tasks):
    for task in range(n_tasks):
        _forward_task(task, x, y, scale, inv_scale, zero_point, qmin, qmax, tiling, per_element)


@njit(cache=True, parallel=True)
def _backward_parallel(grad, x, dx, scale, inv_scale, zero_point, qmin, qmax, grad_factor, learned,
                       tiling, per_element, n_tasks, clipped, dscale, dzero_point):
    for task in prange(n_tasks):
        _backward_task(np.int64(task), grad, x, dx, scale, inv_scale, zero_point, qmin, qmax, grad_factor,
                       learned, tiling, per_element, clipped, dscale, dzero_point)


@njit(cache=True)
def _backward_serial(grad, x, dx, scale, inv_scale, zero_point, qmin, qmax, grad_factor, learned,
                     tiling, per_element, n_tasks, clipped, dscale, dzero_point):
    for task in range(n_tasks):
        _backward_task(task, grad, x, dx, scale, inv_scale, zero_point, qmin, qmax, grad_factor, learned,
                       tiling, per_element, clipped, dscale, dzero_point)


# ----------------------------------------------------------------------------------------
# Python wrappers: geometry, parameter preparation, reduction of partial sums.


class _Plan:
    """How one call splits x (size > 0) into tasks (see the module docstring)."""

    def __init__(self, shape, axis, scale, zero_point):
        size = math.prod(shape)
        if axis is None:
            outer, channels, inner = 1, 1, size
        else:
            outer, channels, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
        self.channels, self.inner = channels, inner
        if scale.size and scale.min() > np.float32(1e-37):
            inv_scale = np.float32(1.0) / scale
        else:  # s = 0 or subnormal: inv = inf (entering errstate costs more than the division)
            with np.errstate(divide="ignore", over="ignore"):
                inv_scale = np.float32(1.0) / scale
        self.per_element = axis is not None and inner < _MIN_RUN
        if self.per_element:
            # one period holds every channel's run; repeat it to at least _MIN_PERIOD elements
            period = channels * inner
            self.repeats = -(-_MIN_PERIOD // period)
            self.period = period * self.repeats
            params = np.stack([scale, inv_scale, zero_point])[:, None, :, None]
            expanded = np.broadcast_to(params, (3, self.repeats, channels, inner)).reshape(3, self.period)
            self.scale, self.inv_scale, self.zero_point = expanded
            rows, run_channels, run_length = -(-size // self.period), 1, self.period
            chunk = _COLUMN_TILE
            channels_per_task = 1
        else:
            self.scale, self.inv_scale, self.zero_point = scale, inv_scale, zero_point
            rows, run_channels, run_length = outer, channels, inner
            # long runs are split into chunks; short ones are grouped, whole channels to a task,
            # so that a task reads a contiguous stretch of about _RUN_CHUNK elements per row
            chunk = min(inner, _RUN_CHUNK)
            channels_per_task = max(1, min(channels, _RUN_CHUNK // inner))
        chunks = -(-run_length // chunk)
        tasks_per_group = -(-run_channels // channels_per_task) * chunks
        groups = max(1, min(rows, _TARGET_TASKS // tasks_per_group, size // (_RUN_CHUNK * tasks_per_group)))
        rows_per_group = -(-rows // groups)
        self.groups = -(-rows // rows_per_group)
        self.chunks, self.channel_groups = chunks, -(-run_channels // channels_per_task)
        self.tiling = (rows, run_channels, run_length, chunk, chunks, channels_per_task, rows_per_group)
        self.n_tasks = self.groups * tasks_per_group
        self.partial_width = chunk if self.per_element else channels_per_task
        self.parallel = size >= PARALLEL_MIN_ELEMENTS

    def per_channel(self, partial):
        """Sum a (n_tasks, partial_width) array of partial results to one value per channel."""
        if self.per_element:
            columns = partial.reshape(self.groups, self.chunks * self.partial_width)[:, :self.period]
            return columns.sum(axis=0).reshape(self.repeats, self.channels, self.inner).sum(axis=(0, 2))
        by_channel = partial.reshape(self.groups, self.channel_groups, self.chunks, self.partial_width)
        by_channel = by_channel.transpose(0, 2, 1, 3).reshape(self.groups, self.chunks, -1)
        return by_channel[:, :, :self.channels].sum(axis=(0, 1))


def fake_quantize_forward(x, scale, zero_point, qmin, qmax, axis):
    """y = (clamp(z + rne(x * inv), qmin, qmax) - z) * s, elementwise in float32.

    Args:
        x: C-contiguous float32 array of any shape (0-d and empty included).
        scale, zero_point: float32 arrays of shape (1,) for ``axis=None`` (per tensor), else
            (x.shape[axis],); zero_point holds integers (rounded by the caller); scale > 0.
        qmin, qmax: the integer grid, qmin < qmax, at most 16 bits.
        axis: None, or the channel axis in [0, x.ndim).

    Returns:
        y, a new float32 array shaped like x; NaN where x is NaN.
    """
    y = np.empty(x.shape, np.float32)
    if x.size == 0:
        return y
    plan = _Plan(x.shape, axis, scale, zero_point)
    driver = _forward_parallel if plan.parallel else _forward_serial
    with np.errstate(all="ignore"):  # IEEE results as the jit gives them, also in plain Python
        driver(x.reshape(-1), y.reshape(-1), plan.scale, plan.inv_scale, plan.zero_point,
               np.float32(qmin), np.float32(qmax), plan.tiling, plan.per_element, plan.n_tasks)
    return y


def fake_quantize_backward(grad_y, x, scale, zero_point, qmin, qmax, axis, mode, grad_factor):
    """Gradients of :func:`fake_quantize_forward`, recomputing q from x in one pass.

    Args:
        grad_y: C-contiguous float32 array shaped like x, the gradient of y.
        x, scale, zero_point, qmin, qmax, axis: as given to the forward.
        mode: "ste" (gradient of x only), "lsq" (and of the scale) or "lsq+" (and of the
            zero point).
        grad_factor: g, the LSQ gradient scale (a float; ignored by "ste").

    Returns:
        (grad_x, grad_scale, grad_zero_point, clipped): grad_x = grad_y * mask like x;
        grad_scale (for "lsq", "lsq+") and grad_zero_point (for "lsq+") float32 arrays shaped
        like scale, summed in float64, else None; clipped, int64 shaped like scale, counts the
        elements whose unclamped q lies outside [qmin, qmax] (NaN does not count).
    """
    if mode not in MODES:
        raise ValueError(f"fake_quantize_backward: mode must be one of {MODES}, got {mode!r}")
    learned = mode != "ste"
    dx = np.empty(x.shape, np.float32)
    if x.size == 0:
        zeros = np.zeros(scale.shape, np.float32)
        return (dx, zeros if learned else None, zeros.copy() if mode == "lsq+" else None,
                np.zeros(scale.shape, np.int64))
    plan = _Plan(x.shape, axis, scale, zero_point)
    shape = (plan.n_tasks, plan.partial_width)
    clipped = np.zeros(shape, np.int64)
    dscale = np.zeros(shape if learned else (0, 0), np.float64)
    dzero_point = np.zeros(shape if learned else (0, 0), np.float64)
    driver = _backward_parallel if plan.parallel else _backward_serial
    with np.errstate(all="ignore"):
        driver(grad_y.reshape(-1), x.reshape(-1), dx.reshape(-1), plan.scale, plan.inv_scale,
               plan.zero_point, np.float32(qmin), np.float32(qmax), float(grad_factor),
               learned, plan.tiling, plan.per_element, plan.n_tasks, clipped, dscale, dzero_point)
    clipped = plan.per_channel(clipped).reshape(scale.shape)
    if not learned:
        return dx, None, None, clipped
    grad_scale = plan.per_channel(dscale).astype(np.float32).reshape(scale.shape)
    grad_zero_point = plan.per_channel(dzero_point).astype(np.float32).reshape(scale.shape)
    return dx, grad_scale, grad_zero_point if mode == "lsq+" else None, clipped
