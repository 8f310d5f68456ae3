"""Pooling: MaxPool2d, AvgPool2d, AdaptiveAvgPool2d (modules and functions).

QAT: max pooling keeps its input's grid (its outputs are input values); average pooling
gets a quantizer after it (a mean of grid values is off the grid).

Conversion: ``Int8MaxPool2d`` takes the max of the integers; ``Int8AvgPool2d`` sums the
window exactly and requantizes once, absorbing the quantizer after it:

    y_q = clamp(z_y + requant(sum over the window of (x_q - z_x); s_x / (count * s_y)), qmin, qmax)

ONNX: MaxPool (on the integers in an int8 model), AveragePool, GlobalAveragePool.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from qatcore import kernels
from qatcore.autograd import no_grad
from qatcore.errors import ConfigError
from qatcore.nn import functional as F
from qatcore.nn.container import Sequential
from qatcore.nn.conv import Conv2d
from qatcore.nn.flatten import Flatten
from qatcore.nn.pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from qatcore.quantization.config import Requantization
from qatcore.quantization.int8_layers import OUTPUT_STATE, Int8Module, int_input, requantize_array
from qatcore.quantization.qat.operators.quantizer import int8_record, module_record
from qatcore.quantization.qat.operators.registry import (
    OperatorRule,
    QATRole,
    call_arguments,
    register,
    register_onnx_import,
)
from qatcore.quantization.requantization import average_pool_float32, global_average_multiplier

__all__ = ["Int8MaxPool2d", "Int8AvgPool2d", "pair"]


def pair(value) -> tuple[int, int]:
    """An int or a pair, as a pair (the pooling modules keep what the user passed)."""
    return (value, value) if isinstance(value, int) else tuple(int(v) for v in value)


class Int8MaxPool2d(Int8Module):
    """Max over each window of the integers (padding never wins: it is the smallest value)."""

    def __init__(self, kernel_size, stride, padding, dilation) -> None:
        super().__init__()
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)

    CONFIG_KEYS = ("kernel_size", "stride", "padding", "dilation")

    def config(self) -> dict:
        return {k: list(getattr(self, k)) for k in ("kernel_size", "stride", "padding", "dilation")}

    def forward(self, x):
        q = int_input(self, x)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        h, w = q.shape[2:]
        if ((kh, kw) == (sh, sw) and self.padding == (0, 0) and self.dilation == (1, 1)
                and h % kh == 0 and w % kw == 0):
            # windows tile the plane: an elementwise max of kh * kw strided views, on the integers
            out = q[:, :, 0::kh, 0::kw]
            for i in range(kh):
                for j in range(kw):
                    if i or j:
                        out = np.maximum(out, q[:, :, i::kh, j::kw])
            return np.ascontiguousarray(out)
        # integers up to 2^24 are exact in float32, so the float kernel's max is the integer max
        out, _ = kernels.pooling.max_pool2d_forward(np.ascontiguousarray(q, dtype=np.float32), *self.kernel_size,
                                            *self.stride, *self.padding, *self.dilation)
        return out.astype(q.dtype)


class Int8AvgPool2d(Int8Module):
    """Average pooling requantized once to the output grid (module docstring).
    ``kernel_size=None`` is global average pooling (the window is the whole plane); the
    multiplier for a window size is computed once, the first time that size is seen."""

    STATE = (("input_scale", "<f8"), ("input_zero_point", "<i4"), *OUTPUT_STATE)
    REQUANTIZES = True

    def __init__(self, kernel_size, stride, input_scale: float, input_zero_point: int, output_scale: float,
                 output_zero_point: int, qmin: int, qmax: int,
                 requantization: Requantization = Requantization.FIXED_POINT) -> None:
        super().__init__()
        self.set_requantization(requantization)
        self.kernel_size = None if kernel_size is None else tuple(kernel_size)
        self.stride = None if stride is None else tuple(stride)
        self.register_buffer("input_scale", np.array(input_scale, dtype=np.float64))
        self.register_buffer("input_zero_point", np.array(input_zero_point, dtype=np.int32))
        self._set_output(output_scale, output_zero_point, qmin, qmax)

    CONFIG_KEYS = ("kernel_size", "stride")

    def config(self) -> dict:
        return {"kernel_size": None if self.kernel_size is None else list(self.kernel_size),
                "stride": None if self.stride is None else list(self.stride)}

    def _multiplier(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        cache = self.__dict__.setdefault("_multipliers", {})
        if count not in cache:
            real = float(self.input_scale.data) / (count * float(self.output_scale.data))
            cache[count] = kernels.requantize.quantize_multiplier(np.array([real]))
        return cache[count]

    def forward(self, x):
        q = int_input(self, x).astype(np.int64) - int(self.input_zero_point.data)
        if self.kernel_size is None:
            (kh, kw), (sh, sw) = q.shape[2:], q.shape[2:]
        else:
            (kh, kw), (sh, sw) = self.kernel_size, self.stride
        n, c, h, w = q.shape
        qmin, qmax = self.output_range.data.tolist()
        if self.requantization is Requantization.FLOAT32 and (kh, kw) != (h, w):
            v = average_pool_float32(int_input(self, x), self.input_scale.data, int(self.input_zero_point.data),
                                     self.output_scale.data, int(self.output_zero_point.data), (kh, kw), (sh, sw))
            return np.clip(np.rint(v), qmin, qmax).astype(self.out_dtype)
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
        if (kh, kw) == (h, w):  # one window, the whole plane: one reduction (integer sums are exact)
            total = q.reshape(n, c, 1, h * w).sum(axis=3, keepdims=True)
        else:
            total = np.zeros((n, c, oh, ow), dtype=np.int64)
            for i in range(kh):
                for j in range(kw):
                    total += q[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
        if self.requantization is Requantization.FLOAT32:  # a window over the whole plane: the global pool
            m = global_average_multiplier(self.input_scale.data, self.output_scale.data, kh * kw)
            y = kernels.requantize_float32.requantize_float32(total, m, int(self.output_zero_point.data), qmin, qmax)
            return y.astype(self.out_dtype)
        multiplier, shift = self._multiplier(kh * kw)
        y = requantize_array(total, multiplier, shift) + int(self.output_zero_point.data)
        return np.clip(y, qmin, qmax).astype(self.out_dtype)


# ---- the settings of a module or a function call ---------------------------------------------------
def _max_settings(node, module) -> tuple:
    """(kernel, stride, padding, dilation) as pairs."""
    if module is None:
        a = call_arguments(node)
        kernel, stride, padding, dilation = a["kernel_size"], a["stride"], a["padding"], a["dilation"]
    else:
        kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
    return pair(kernel), pair(stride or kernel), pair(padding), pair(dilation)


def _avg_settings(node, module) -> tuple:
    """(kernel, stride, padding, count_include_pad); kernel None for a global pool."""
    if isinstance(module, AdaptiveAvgPool2d) or node.target is F.adaptive_avg_pool2d:
        size = module.output_size if module is not None else call_arguments(node)["output_size"]
        if size not in (1, (1, 1), [1, 1]):
            raise ConfigError(f"adaptive average pool {node.name!r} must pool to 1x1, not {size}")
        return None, None, (0, 0), True
    if module is None:
        a = call_arguments(node)
        kernel, stride, padding, count = a["kernel_size"], a["stride"], a["padding"], a["count_include_pad"]
    else:
        kernel, stride, padding, count = module.kernel_size, module.stride, module.padding, module.count_include_pad
    return pair(kernel), pair(stride or kernel), pair(padding), count


# ---- conversion -----------------------------------------------------------------------------------
def _lower_max_pool(ctx, node, module):
    source, value = ctx.env[node.args[0]]
    if value is None:
        return None
    # same grid as the input, but this node's values: compare with this QAT node
    return ctx.add(node.name, Int8MaxPool2d(*_max_settings(node, module)), (source,),
                   replace(value, source=node.name))


def _lower_avg_pool(ctx, node, module):
    source, value = ctx.env[node.args[0]]
    if value is None:
        return None
    kernel, stride, padding, _ = _avg_settings(node, module)
    if padding != (0, 0):
        raise ConfigError(f"int8 conversion: average pool {node.name!r} with padding is not supported")
    quantizer, chain, _ = ctx.following_quantizer(node, fuse_relu=False)
    if quantizer is None:
        raise ConfigError(f"int8 conversion: average pool {node.name!r} has no quantizer after it")
    out = ctx.value_of(quantizer, chain[-1].name)
    ctx.absorb(chain, node)
    return ctx.add(chain[-1].name, Int8AvgPool2d(kernel, stride, value.scale, value.zero_point, out.scale,
                                                 out.zero_point, out.qmin, out.qmax, ctx.requantization),
                   (source,), out)


# ---- ONNX export ----------------------------------------------------------------------------------
def _export_max_pool(ex, node, module):
    x = ex.unary_input(node)
    return ex.max_pool(ex.node_name(node), x, *_max_settings(node, module)), None


def _export_avg_pool(ex, node, module):
    x, name = ex.unary_input(node), ex.node_name(node)
    kernel, stride, padding, count = _avg_settings(node, module)
    if kernel is None:
        return ex.b.node("GlobalAveragePool", [x], name), None
    return ex.avg_pool(name, x, kernel, stride, padding, count), None


def _export_int8_max_pool(ex, node, module: Int8MaxPool2d):
    grid = ex.same_grid_input(node)
    return ex.max_pool(node.target, ex.names[node.args[0]], module.kernel_size, module.stride, module.padding,
                       module.dilation), grid


def _export_int8_avg_pool(ex, node, module: Int8AvgPool2d):
    name, b = node.target, ex.b
    grid = ex.out_grid(module)
    x = ex.dequantize(node.args[0], name)
    y = (b.node("GlobalAveragePool", [x], f"{name}/GlobalAveragePool") if module.kernel_size is None
         else ex.avg_pool(f"{name}/AveragePool", x, module.kernel_size, module.stride, (0, 0)))
    return ex.quantize(y, grid, name), grid


# ---- ONNX import ----------------------------------------------------------------------------------
def _import_max_pool(imp, node):
    attrs = imp.attributes(node, {"auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "storage_order",
                                  "strides"})
    if len([o for o in node.output if o]) != 1:
        raise imp.fail(node, "the Indices output is not supported")
    kernel = list(attrs.get("kernel_shape", []))
    window = imp.window(node, attrs, kernel, ceil_mode=bool(attrs.get("ceil_mode", 0)))
    x = imp.runtime(node, 0)
    if not window.symmetric:  # uneven pads or ceil_mode's overhang: -inf never wins a max
        x = imp.call(node, F.pad, (x, window.pad, -np.inf), suffix="pad")
    return imp.add_layer(node, MaxPool2d(tuple(kernel), **window.layer_arguments(padded=not window.symmetric)), (x,))


def _import_average_pool(imp, node):
    """AveragePool; with uneven pads or ceil_mode's overhang, the mean over the zero-padded
    input rescaled by the fraction of each window's cells that count (the input, and the pads
    with count_include_pad=1; never the overhang)."""
    attrs = imp.attributes(node, {"auto_pad", "ceil_mode", "count_include_pad", "dilations", "kernel_shape",
                                  "pads", "strides"})
    kernel = list(attrs.get("kernel_shape", []))
    window = imp.window(node, attrs, kernel, ceil_mode=bool(attrs.get("ceil_mode", 0)))
    if window.dilation != (1, 1):
        raise imp.fail(node, "dilated average pooling is not supported")
    include_pad = bool(attrs.get("count_include_pad", 0))
    x = imp.runtime(node, 0)
    if window.symmetric:
        pool = AvgPool2d(tuple(kernel), window.stride, window.begin, count_include_pad=include_pad)
        return imp.add_layer(node, pool, (x,))
    size = imp.static_shape(node.input[0])
    if size is None or len(size) != 4 or None in size[2:]:
        raise imp.fail(node, f"uneven pads {list(window.begin + window.end)} need the input's height and width, "
                             f"which the file does not fix")
    padded = imp.call(node, F.pad, (x, window.pad, 0.0), suffix="pad")
    pooled = imp.add_layer(node, AvgPool2d(tuple(kernel), window.stride, 0, count_include_pad=True), (padded,))
    counted = _counted_fraction(window, size[2:], include_pad)
    if np.all(counted == 1):
        return pooled
    return imp.call(node, F.div, (pooled, imp.buffer(counted)), suffix="counted")


def _counted_fraction(window, size, include_pad: bool) -> np.ndarray:
    """(OH, OW): the fraction of each window's cells that an ONNX average counts."""
    (h, w), (bh, bw), (eh, ew), (oh, ow) = size, window.begin, window.end, window.overhang
    counted = np.zeros((1, 1, bh + h + eh + oh, bw + w + ew + ow), np.float32)
    if include_pad:
        counted[..., :bh + h + eh, :bw + w + ew] = 1
    else:
        counted[..., bh:bh + h, bw:bw + w] = 1
    with no_grad():
        return F.avg_pool2d(counted, window.kernel, window.stride).numpy()[0, 0]


def _import_global_average_pool(imp, node):
    rank = imp.ranks.get(node.input[0], 4)
    if rank != 4:
        raise imp.fail(node, f"only (N, C, H, W) inputs are supported, got rank {rank}")
    return imp.add_layer(node, AdaptiveAvgPool2d(1), (imp.runtime(node, 0),))


# ---- examples -------------------------------------------------------------------------------------
def _example(make_pool):
    def example():
        rng = np.random.default_rng(0)
        model = Sequential(Conv2d(2, 4, 3, padding=1, rng=rng), make_pool(), Conv2d(4, 3, 1, rng=rng), Flatten())
        return model, (2, 2, 6, 6)
    return example


class _FunctionalPool(Sequential):
    def __init__(self, fn, *args) -> None:
        rng = np.random.default_rng(0)
        super().__init__(Conv2d(2, 4, 3, padding=1, rng=rng), Conv2d(4, 3, 1, rng=rng), Flatten())
        self.fn, self.fn_args = fn, args

    def forward(self, x):
        return self[2](self[1](self.fn(self[0](x), *self.fn_args)))


register(
    OperatorRule(MaxPool2d, qat=QATRole.INPUT_GRID, lower=_lower_max_pool, export=_export_max_pool,
                 record=module_record(MaxPool2d, "kernel_size", "stride", "padding", "dilation"),
                 example=_example(lambda: MaxPool2d(2))),
    OperatorRule(F.max_pool2d, qat=QATRole.INPUT_GRID, lower=_lower_max_pool, export=_export_max_pool,
                 example=lambda: (_FunctionalPool(F.max_pool2d, 3, 1, 1), (2, 2, 6, 6))),
    OperatorRule(AvgPool2d, qat=QATRole.NEW_GRID, lower=_lower_avg_pool, export=_export_avg_pool,
                 record=module_record(AvgPool2d, "kernel_size", "stride", "padding", "count_include_pad"),
                 example=_example(lambda: AvgPool2d(2))),
    OperatorRule(F.avg_pool2d, qat=QATRole.NEW_GRID, lower=_lower_avg_pool, export=_export_avg_pool,
                 example=lambda: (_FunctionalPool(F.avg_pool2d, 2), (2, 2, 6, 6))),
    OperatorRule(AdaptiveAvgPool2d, qat=QATRole.NEW_GRID, lower=_lower_avg_pool, export=_export_avg_pool,
                 record=module_record(AdaptiveAvgPool2d, "output_size"),
                 example=_example(lambda: AdaptiveAvgPool2d(1))),
    OperatorRule(F.adaptive_avg_pool2d, qat=QATRole.NEW_GRID, lower=_lower_avg_pool, export=_export_avg_pool,
                 example=lambda: (_FunctionalPool(F.adaptive_avg_pool2d, 1), (2, 2, 6, 6))),
    OperatorRule(Int8MaxPool2d, export=_export_int8_max_pool, record=int8_record(Int8MaxPool2d)),
    OperatorRule(Int8AvgPool2d, export=_export_int8_avg_pool, record=int8_record(Int8AvgPool2d)),
)
register_onnx_import("MaxPool", _import_max_pool)
register_onnx_import("AveragePool", _import_average_pool)
register_onnx_import("GlobalAveragePool", _import_global_average_pool)
