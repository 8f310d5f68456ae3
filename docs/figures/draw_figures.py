"""Draw the teaching figures of the docs from qatcore's own code and data.

    python docs/figures/draw_figures.py [--output DIR]      # default: this folder

Each figure is one ``draw_<name>(output_dir) -> Path`` function; :func:`main` draws them all
and prints the numbers each figure shows. Every value plotted is computed by qatcore itself:
its fake quantization and autograd, its observers, its QAT preparer and converter, its SQNR,
and models trained here on the data that ships with qatcore (the 8x8 digits, Tiny
Shakespeare). Nothing downloads anything.

The output is deterministic: every generator is seeded, the figure sizes and the dpi are
fixed, and the PNGs carry no "Software" entry and no timestamp, so two runs in the same
environment (same numpy, numba and matplotlib) write the same bytes. Needs matplotlib
(``pip install 'qatcore[plot]'``). The two trained models are made once per process
(``functools.cache``): the digits CNN feeds two figures, and a test that draws twice
trains once.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the non-interactive backend
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

import qatcore  # noqa: E402
from qatcore.autograd import no_grad  # noqa: E402
from qatcore.data import DataLoader, load_digits, load_text, text_windows  # noqa: E402
from qatcore.models import DigitsCNN, TinyGPT  # noqa: E402
from qatcore.nn import functional as F  # noqa: E402
from qatcore.optim import SGD, AdamW  # noqa: E402
from qatcore.pipeline.gpt_experiment import validation_loss  # noqa: E402
from qatcore.quantization import (  # noqa: E402
    FakeQuantize,
    MinMaxObserver,
    PerChannelMinMaxObserver,
    QuantizationConfig,
    QuantSpec,
    fake_quantize,
    fake_quantize_learnable,
    fake_quantize_per_group,
    fake_quantize_per_token,
)
from qatcore.quantization.int8_layers import Dequantize, Int8Module, Quantize  # noqa: E402
from qatcore.quantization.qat import QATPreparer  # noqa: E402
from qatcore.quantization.qat.operators.weighted import Int8Conv2d, Int8Linear  # noqa: E402
from qatcore.quantization.qat.statistics import StatisticsConfig, sqnr_db  # noqa: E402
from qatcore.training import predict, train_one_epoch  # noqa: E402

__all__ = ["draw_staircase", "draw_qat_vs_integer_graph", "draw_per_tensor_vs_per_channel", "draw_statistics",
           "draw_tinygpt_outliers", "main", "FIGURES"]

HERE = Path(__file__).resolve().parent
DPI = 100  # every figure: inches * 100 = pixels
FONT_SIZE = 11
SEED = 0

# The digits CNN: one float epoch (SGD, lr 0.05) reaches ~92% test accuracy, two QAT epochs at the
# same rate ~95%. With two float epochs, or QAT at lr 0.01, every statistics curve is flat: the
# weights barely move any more; here the scales still visibly settle while QAT trains.
DIGITS_FLOAT_EPOCHS = 1
DIGITS_QAT_EPOCHS = 2
DIGITS_BATCH = 64
DIGITS_QAT_LR = 0.05
DIGITS_STATISTICS_EVERY = 2  # a statistics sample every 2 of the 46 QAT steps

# TinyGPT, small enough to train in ~6 s of CPU: 2 blocks of 64 channels, 32 characters of
# context, 150 AdamW steps of 8 windows. The peak rate is three times GPTSettings' 2e-3 so that
# the outlier channel at the input of the last block's fc_2 grows within those steps. Measured
# (its max/median ratio): 8 windows a step at 6e-3, ~3.7 after 50 steps, ~5.6 after 100, ~6.5
# after 150, ~8.3 after 200; 16 windows a step at 2e-3, ~4 after 100 steps, ~9 after 300.
GPT_LAYERS, GPT_CHANNELS, GPT_HEADS, GPT_BLOCK = 2, 64, 4, 32
GPT_STEPS, GPT_BATCH, GPT_LR, GPT_WARMUP = 150, 8, 6e-3, 20
GPT_VALIDATION_WINDOWS = 64
GROUP_SIZE = 32


# ----------------------------------------------------------------------------- shared helpers

def _figure(width_in: float, height_in: float, rows: int = 1, columns: int = 1, **kwargs):
    """A figure of fixed size (inches; 100 px each) and readable font, with its axes."""
    with plt.rc_context({"font.size": FONT_SIZE}):
        return plt.subplots(rows, columns, figsize=(width_in, height_in), dpi=DPI, **kwargs)


def _save(fig, output_dir: Path, name: str) -> Path:
    """Write ``fig`` as ``output_dir/name`` without the metadata that would vary, and close it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / name
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return path


def _sqnr(x: np.ndarray, y) -> float:
    return sqnr_db(np.asarray(x, dtype=np.float32), np.asarray(y.data if isinstance(y, qatcore.Tensor) else y))


# ----------------------------------------------------------------------------- trained models

@functools.cache
def _digits_float_state() -> dict:
    """The state_dict of a DigitsCNN trained in float on the 8x8 digits (SGD, momentum 0.9,
    lr 0.05, ``DIGITS_FLOAT_EPOCHS`` epochs of batches of ``DIGITS_BATCH``, seed 0)."""
    x_train, y_train, x_test, y_test = load_digits(seed=SEED)
    model = DigitsCNN(rng=np.random.default_rng(SEED))
    optimizer = SGD(model.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(SEED)
    for _ in range(DIGITS_FLOAT_EPOCHS):
        train_one_epoch(model, DataLoader(x_train, y_train, DIGITS_BATCH, shuffle=True, rng=rng), optimizer)
    accuracy = float(np.mean(predict(model, x_test).argmax(axis=1) == y_test))
    print(f"digits CNN, float: {DIGITS_FLOAT_EPOCHS} epochs, test accuracy {accuracy:.3f}")
    return {name: value.copy() for name, value in model.state_dict().items()}


def _trained_digits_cnn() -> DigitsCNN:
    """A fresh DigitsCNN holding the float-trained weights (its own copy: QAT trains a model's
    own Parameters, and each figure starts from the same float model)."""
    model = DigitsCNN(rng=np.random.default_rng(SEED))
    model.load_state_dict({name: value.copy() for name, value in _digits_float_state().items()})
    return model


@functools.cache
def _trained_tiny_gpt() -> TinyGPT:
    """A TinyGPT (``GPT_*`` sizes) trained on Tiny Shakespeare's training characters with
    gpt_experiment's optimizer (AdamW, betas (0.9, 0.99), weight decay 0.1): ``GPT_STEPS``
    steps of ``GPT_BATCH`` windows at uniformly random offsets, the rate warming up linearly
    over ``GPT_WARMUP`` steps to ``GPT_LR`` and staying there."""
    qatcore.manual_seed(SEED)
    text = load_text()
    rng = np.random.default_rng(SEED)
    model = TinyGPT(text.vocabulary_size, GPT_BLOCK, GPT_LAYERS, GPT_CHANNELS, GPT_HEADS,
                    rng=np.random.default_rng(SEED))
    optimizer = AdamW(model.parameters(), lr=GPT_LR, betas=(0.9, 0.99), weight_decay=0.1)
    model.train()
    for step in range(GPT_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = GPT_LR * min(1.0, (step + 1) / GPT_WARMUP)
        starts = rng.integers(0, text.train.size - GPT_BLOCK - 1, GPT_BATCH)
        index = starts[:, None] + np.arange(GPT_BLOCK)
        logits = model(text.train[index])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), text.train[index + 1].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    validation, characters = validation_loss(model, text.validation, GPT_BLOCK, windows=GPT_VALIDATION_WINDOWS)
    print(f"TinyGPT: {GPT_STEPS} steps, validation loss {validation:.3f} nats/char on {characters} characters")
    return model


def _validation_windows() -> tuple[np.ndarray, np.ndarray]:
    text = load_text()
    x, y = text_windows(text.validation, GPT_BLOCK)
    return x[:GPT_VALIDATION_WINDOWS], y[:GPT_VALIDATION_WINDOWS]


# ----------------------------------------------------------------------------- 1. staircase

def draw_staircase(output_dir: Path) -> Path:
    """The 3-bit quantization staircase and its gradients: ``staircase.png``.

    Top: fq(x) = (clamp(rne(x / s) + z, qmin, qmax) - z) * s for a signed 3-bit grid
    (qmin = -4, qmax = 3, s = 0.25, z = 0) against the identity y = x, the grid points
    (q - z) * s marked and the two clipping regions shaded. Middle: the straight-through
    estimator's d fq / dx, 1 where qmin <= rne(x / s) + z <= qmax and 0 in the clipping
    regions. Bottom: LSQ's d fq / ds (Esser et al. 2020): rne(x / s) - x / s inside the
    range, qmin - z or qmax - z outside. All three come from qatcore: ``fake_quantize`` and
    ``fake_quantize_learnable`` on a Tensor that requires grad, then ``backward``; the shaded
    regions are where that gradient is 0, not a formula of this script.
    """
    scale, zero_point, qmin, qmax = 0.25, 0, -4, 3
    x_values = np.linspace(-1.6, 1.4, 1201, dtype=np.float32)
    x = qatcore.tensor(x_values, requires_grad=True)
    y = fake_quantize(x, scale, zero_point, qmin, qmax)
    y.sum().backward()
    ste_gradient = np.asarray(x.grad)
    # one scale per element (a "channel" each, axis 0), so that d y_i / d s is not summed over i;
    # grad_factor 1: the raw derivative, without LSQ's 1 / sqrt(N qmax) step-size scaling
    scales = qatcore.tensor(np.full(x_values.size, scale, np.float32), requires_grad=True)
    zero_points = qatcore.tensor(np.zeros(x_values.size, np.float32))
    learnable = fake_quantize_learnable(qatcore.tensor(x_values), scales, zero_points, qmin, qmax, axis=0,
                                        grad_factor=1.0)
    learnable.sum().backward()
    scale_gradient = np.asarray(scales.grad)
    clipped = ste_gradient == 0
    low_edge = float(x_values[~clipped].min())
    high_edge = float(x_values[~clipped].max())

    fig, (top, middle, bottom) = _figure(10, 10, 3, 1, sharex=True, constrained_layout=True,
                                         gridspec_kw={"height_ratios": (3, 1.2, 1.6)})
    grid = (np.arange(qmin, qmax + 1) - zero_point) * scale
    for axis in (top, middle, bottom):
        axis.axvspan(x_values[0], low_edge, color="tab:red", alpha=0.12, lw=0)
        axis.axvspan(high_edge, x_values[-1], color="tab:red", alpha=0.12, lw=0)
        axis.grid(alpha=0.3)
    top.plot(x_values, x_values, "--", color="gray", label="identity y = x")
    top.plot(x_values, y.data, color="tab:blue", lw=2, label="fq(x), qatcore.fake_quantize")
    top.plot(grid, grid, "o", color="tab:blue", ms=7, label=f"grid points (q - z) s, q = {qmin} .. {qmax}")
    for q, value in zip(range(qmin, qmax + 1), grid):
        top.annotate(f"q={q}", (value, value), textcoords="offset points", xytext=(-30, 6), fontsize=9)
    top.text((x_values[0] + low_edge) / 2, 0.9, f"clipped\nto q = {qmin}", ha="center", va="top", color="tab:red")
    top.text((high_edge + x_values[-1]) / 2, -1.0, f"clipped\nto q = {qmax}", ha="center", va="bottom",
             color="tab:red")
    top.set(title=f"3-bit signed fake quantization: s = {scale}, z = {zero_point}, q in [{qmin}, {qmax}]",
            ylabel="fq(x) (same units as x)", ylim=(-1.7, 1.5))
    top.legend(loc="upper left", bbox_to_anchor=(0.12, 0.99), fontsize=10)
    middle.plot(x_values, ste_gradient, color="tab:green", lw=2)
    middle.set(title="straight-through estimator: d fq / dx (autograd)", ylabel="d fq / dx", ylim=(-0.2, 1.3))
    middle.text(0.0, 0.5, "1 inside the range: the gradient passes", ha="center", va="center")
    bottom.plot(x_values, scale_gradient, color="tab:purple", lw=1.5)
    bottom.axhline(0, color="gray", lw=0.8)
    bottom.set(title="LSQ: d fq / ds (autograd, without LSQ's gradient scale)", ylabel="d fq / ds",
               xlabel="x (real value, arbitrary units)")
    bottom.text((x_values[0] + low_edge) / 2, qmin - zero_point + 0.6, f"qmin - z = {qmin}", ha="center",
                fontsize=9)
    bottom.text((high_edge + x_values[-1]) / 2, qmax - zero_point - 1.4, f"qmax - z = {qmax}",
                ha="center", fontsize=9)
    bottom.text(0.0, 1.8, "inside: rne(x/s) - x/s, in [-0.5, 0.5]", ha="center", fontsize=9)
    bottom.set_ylim(qmin - 1, qmax + 1.5)
    print(f"staircase: clipping below x = {low_edge:.4f} and above x = {high_edge:.4f} (grid {grid[0]} .. "
          f"{grid[-1]}); d fq/ds spans [{scale_gradient.min():.2f}, {scale_gradient.max():.2f}]")
    return _save(fig, output_dir, "staircase.png")


# ----------------------------------------------------------------------------- 2. QAT vs integer graph

_QAT_COLOUR, _FQ_COLOUR, _INT_COLOUR, _IO_COLOUR = "#dbe9f6", "#fde2c4", "#d9f0d3", "#eeeeee"


def _box(axis, x: float, y: float, width: float, height: float, text: str, colour: str) -> None:
    axis.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.01",
                                  facecolor=colour, edgecolor="black", lw=1))
    axis.text(x, y, text, ha="center", va="center", fontsize=9)


def _arrow(axis, start: tuple, end: tuple, **style) -> None:
    axis.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "lw": 1.2, **style})


def _fake_quantize_label(quantizer: FakeQuantize) -> str:
    qparams = quantizer.calculate_qparams()
    grid = (f"s = {float(qparams.scale[0]):.4g}, z = {int(qparams.zero_point[0])}" if qparams.scale.size == 1
            else f"{qparams.scale.size} scales (one per channel)")
    return f"FakeQuantize {quantizer.name}\n{quantizer.spec.dtype.name} {quantizer.spec.scheme.value}\n{grid}"


def _int8_label(name: str, module: Int8Module) -> str:
    """What an int8 runtime module computes, read from its buffers."""
    kind = type(module).__name__
    if not isinstance(module, (Quantize, Dequantize, Int8Conv2d, Int8Linear)):
        return f"{name}: {kind}\non integers, grid kept"
    scale, zero_point = float(module.output_scale.data), int(module.output_zero_point.data)
    if isinstance(module, Quantize):
        return f"{name}: Quantize\nfloat -> {module.out_dtype.name}\ns = {scale:.4g}, z = {zero_point}"
    if isinstance(module, Dequantize):
        return f"{name}: Dequantize\nint -> float32\ns = {scale:.4g}, z = {zero_point}"
    if isinstance(module, (Int8Conv2d, Int8Linear)):
        relu = ", ReLU as clamp" if int(module.clamp_min.data) == zero_point else ""
        shape = "x".join(str(d) for d in module.weight_q.data.shape)
        return (f"{name}: {kind}\nint8 weights {shape}, int32 accumulator\n"
                f"Requantize -> {module.out_dtype.name} s = {scale:.4g}, z = {zero_point}{relu}")


def _qat_rows(qat) -> tuple[list, dict]:
    """The QAT graph as drawing rows: (key, text, colour, side text or None) in the order of the
    graph's nodes; a QAT layer contributes its box and, after it, its output FakeQuantize, with
    its weight FakeQuantize beside it. Also: each FakeQuantize's ValueSource name -> row key."""
    records = {record.name: record for record in QATPreparer.controller(qat).layers}
    rows, sources = [], {}
    for node in qat.graph.nodes:
        if node.op == "input":
            rows.append((node.name, f"input {node.name} (float)", _IO_COLOUR, None))
        elif node.op == "output":
            rows.append((node.name, "output (float)", _IO_COLOUR, None))
        elif node.op == "call_module":
            module = qat.get_submodule(node.target)
            if isinstance(module, FakeQuantize):
                rows.append((node.name, _fake_quantize_label(module), _FQ_COLOUR, None))
                sources[node.name] = node.name
                continue
            record = records.get(node.name)
            children = dict(module.named_children())
            weight = children.get("weight_fake_quant")
            if record is not None:
                fused = f"\n{', '.join(record.fused)} folded in" if record.fused else ""
                text = f"{node.name}: {record.qat_type}\n(float {record.float_type}){fused}"
            else:
                text = f"{node.name}: {type(module).__name__}"
            side = _fake_quantize_label(weight) if isinstance(weight, FakeQuantize) else None
            rows.append((node.name, text, _QAT_COLOUR, side))
            output = children.get("output_fake_quant")
            if isinstance(output, FakeQuantize):
                key = f"{node.name} (output)"  # how conversion names a layer's output quantizer
                rows.append((key, _fake_quantize_label(output), _FQ_COLOUR, None))
                sources[key] = key
    return rows, sources


def _aligned_rows(keys: list[str], left_y: dict[str, float]) -> dict[str, float]:
    """The height of each integer node: that of the QAT row of the same name (an int8 node
    keeps its QAT node's name), and for a node new in conversion (a Dequantize) the middle of
    its neighbours' heights."""
    heights = {key: left_y[key] for key in keys if key in left_y}
    for index, key in enumerate(keys):
        if key not in heights:
            above = next(heights[k] for k in reversed(keys[:index]) if k in heights)
            below = next(heights[k] for k in keys[index + 1:] if k in heights)
            heights[key] = (above + below) / 2
    return heights


def draw_qat_vs_integer_graph(output_dir: Path) -> Path:
    """A QAT graph beside its integer graph: ``qat_vs_integer_graph.png``.

    The float-trained DigitsCNN (conv-bn-relu, pool, conv-bn-relu, pool, flatten, linear) is
    prepared for QAT with the default config (int8 per-channel weights, uint8 per-tensor
    activations), calibrated on 4 batches of training digits, and converted. Left: the
    prepared GraphModule's nodes, read from ``qat.graph.nodes`` (a QAT layer's weight
    FakeQuantize beside it, its output FakeQuantize after it; BN and ReLU folded in as the
    preparer's layer records say). Right: the converted Int8Model's nodes, each labelled from
    its integer buffers (grid, weights, requantization). Dashed lines join each FakeQuantize
    to the integer node that reproduces its values, from the Int8Model's ``value_sources``
    (activations) and from the weighted layer of the same name (weights).
    """
    x_train, _, _, _ = load_digits(seed=SEED)
    preparer = QATPreparer(statistics=StatisticsConfig(enabled=False))
    qat = preparer.prepare_for_qat(_trained_digits_cnn(), QuantizationConfig())
    preparer.calibrate(qat, [x_train[i:i + DIGITS_BATCH] for i in range(0, 4 * DIGITS_BATCH, DIGITS_BATCH)])
    qat.eval()
    converted = preparer.convert_to_quantized(qat)

    left_rows, fake_quant_keys = _qat_rows(qat)
    right_rows = []
    for node in converted.graph.nodes:
        if node.op == "call_module":
            right_rows.append((node.name, _int8_label(node.name, converted.get_submodule(node.target)), _INT_COLOUR))
        else:
            right_rows.append((node.name, f"{node.op} {node.name} (float)" if node.op == "input" else "output (float)",
                               _IO_COLOUR))

    height = len(left_rows)
    fig, axis = _figure(14, 0.62 * height + 1.4, constrained_layout=True)
    fig.suptitle("The DigitsCNN prepared for QAT (left) and converted to integers (right): each FakeQuantize "
                 "becomes a Quantize or a Requantize")
    axis.set(xlim=(0, 14), ylim=(-0.9, height + 0.1))
    axis.axis("off")
    box_height, left_x, side_x, right_x = 0.78, 2.3, 5.6, 11.0
    left_y = {key: height - 1 - i for i, (key, *_rest) in enumerate(left_rows)}
    right_y = _aligned_rows([key for key, *_rest in right_rows], left_y)
    axis.text(left_x, height - 0.3, "QAT graph (float, fake-quantized)", ha="center", fontweight="bold")
    axis.text(right_x, height - 0.3, "integer graph (Int8Model)", ha="center", fontweight="bold")
    previous = None
    weight_positions = {}
    for key, text, colour, side in left_rows:
        y = left_y[key]
        _box(axis, left_x, y, 3.9, box_height, text, colour)
        if previous is not None:
            _arrow(axis, (left_x, previous - box_height / 2), (left_x, y + box_height / 2))
        if side is not None:
            _box(axis, side_x, y, 2.5, box_height, side, _FQ_COLOUR)
            _arrow(axis, (side_x - 1.25, y), (left_x + 1.95, y))
            weight_positions[key] = y
        previous = y
    previous = None
    for key, text, colour in right_rows:
        y = right_y[key]
        _box(axis, right_x, y, 4.6, box_height, text, colour)
        if previous is not None:
            _arrow(axis, (right_x, previous - box_height / 2), (right_x, y + box_height / 2))
        previous = y
    style = {"color": "tab:orange", "lw": 1.3, "ls": "--"}
    links = 0
    for int_name, value_source in converted.value_sources.items():
        if value_source.source in fake_quant_keys:  # an activation quantizer -> Quantize / Requantize
            # into the lower half of the integer box, so that the line passes under the weight box
            axis.plot([left_x + 1.95, right_x - 2.3], [left_y[value_source.source], right_y[int_name] - 0.2], **style)
            links += 1
    for key, y in weight_positions.items():  # a weight quantizer -> the int8 weights of its layer
        if key in right_y:
            axis.plot([side_x + 1.25, right_x - 2.3], [y, right_y[key] + 0.2], **{**style, "color": "tab:brown"})
            links += 1
    axis.plot([], [], **style, label="activation FakeQuantize -> the integer node holding its grid")
    axis.plot([], [], **{**style, "color": "tab:brown"}, label="weight FakeQuantize -> the int8 weights")
    axis.legend(loc="lower center", ncol=2, fontsize=10, frameon=False)
    print(f"qat_vs_integer_graph: {len(left_rows)} QAT rows, {len(right_rows)} integer nodes, {links} links")
    return _save(fig, output_dir, "qat_vs_integer_graph.png")


# ----------------------------------------------------------------------------- 3. per tensor vs per channel

def draw_per_tensor_vs_per_channel(output_dir: Path) -> Path:
    """4-bit per-tensor vs per-channel grids on a trained conv: ``per_tensor_vs_per_channel.png``.

    The weights are conv2 of the float-trained DigitsCNN with its batch norm folded in,
    W_c * gamma_c / sqrt(var_c + eps): what the QAT weight quantizer sees. Three output
    channels are drawn, the largest, the median and the smallest by max |w|. Left column:
    each channel's histogram against the per-tensor grid (MinMaxObserver, int4 narrow
    symmetric: s = max|W| / 7 for the whole layer); right column: against the channel's own
    grid (PerChannelMinMaxObserver: s_c = max|W_c| / 7). Each panel gives how many grid
    points the channel's values use and the SQNR of the fake-quantized channel (qatcore's
    ``sqnr_db``: 10 log10(sum w^2 / sum (w - fq(w))^2)).
    """
    model = _trained_digits_cnn()
    bn = model.bn2
    gain = bn.weight.data / np.sqrt(bn.running_var.data + bn.eps)
    weights = (model.conv2.weight.data * gain[:, None, None, None]).astype(np.float32)
    rows = weights.reshape(weights.shape[0], -1)
    spec = QuantSpec(bits=4, signed=True, narrow_range=True, scheme="per_tensor_symmetric", observer="minmax")
    per_tensor = MinMaxObserver(spec)
    per_tensor.observe(rows)
    per_channel = PerChannelMinMaxObserver(spec.replace(scheme="per_channel_symmetric", axis=0))
    per_channel.observe(rows)
    tensor_q, channel_q = per_tensor.calculate_qparams(), per_channel.calculate_qparams()
    qmin, qmax = tensor_q.qmin, tensor_q.qmax
    tensor_fq = fake_quantize(rows, tensor_q.scale[0], 0, qmin, qmax)
    channel_fq = fake_quantize(rows, channel_q.scale, channel_q.zero_point, qmin, qmax, axis=0)
    peaks = np.abs(rows).max(axis=1)
    order = np.argsort(peaks, kind="stable")
    chosen = [int(order[-1]), int(order[len(order) // 2]), int(order[0])]

    fig, axes = _figure(13, 9.5, 3, 2, constrained_layout=True)
    fig.suptitle(f"conv2 of the trained DigitsCNN (BN folded), 4-bit symmetric weights: whole layer SQNR "
                 f"{_sqnr(rows, tensor_fq):.1f} dB per tensor, {_sqnr(rows, channel_fq):.1f} dB per channel\n"
                 f"channel max |w| from {peaks.min():.3f} to {peaks.max():.3f} "
                 f"(ratio {peaks.max() / peaks.min():.1f}); ticks: the grid points (q in [{qmin}, {qmax}])")
    for row, channel in enumerate(chosen):
        values = rows[channel]
        half_width = 1.15 * peaks[channel]
        for column, (label, scale, quantized) in enumerate((
                ("per tensor", float(tensor_q.scale[0]), tensor_fq[channel]),
                ("per channel", float(channel_q.scale[channel]), channel_fq[channel]))):
            axis = axes[row, column]
            axis.hist(values, bins=np.linspace(-half_width, half_width, 41), color="tab:blue", alpha=0.75)
            grid = np.arange(qmin, qmax + 1) * scale
            for point in grid[np.abs(grid) <= half_width]:
                axis.axvline(point, color="tab:red", lw=1, alpha=0.8)
            used = np.unique(np.rint(values / scale)).size
            axis.set_xlim(-half_width, half_width)
            axis.set(title=f"channel {channel} (max|w| = {peaks[channel]:.3f}), {label}: "
                           f"{used} grid points used, SQNR {_sqnr(values, quantized):.1f} dB",
                     ylabel="weights per bin")
            axis.title.set_fontsize(10)
            if row == 2:
                axis.set_xlabel("folded weight value (dimensionless)")
    axes[0, 0].plot([], [], color="tab:red", label="4-bit grid point")
    axes[0, 0].legend(loc="upper right", fontsize=9)
    print(f"per_tensor_vs_per_channel: SQNR per tensor {_sqnr(rows, tensor_fq):.1f} dB, per channel "
          f"{_sqnr(rows, channel_fq):.1f} dB; channel max|w| {peaks.min():.3f} .. {peaks.max():.3f}; channels "
          f"{chosen}")
    return _save(fig, output_dir, "per_tensor_vs_per_channel.png")


# ----------------------------------------------------------------------------- 4. statistics

def draw_statistics(output_dir: Path) -> Path:
    """What quantization did while the DigitsCNN trained: ``statistics.png``.

    The float-trained DigitsCNN is prepared with the default config (int8 per-channel
    weights, uint8 activations), trained ``DIGITS_QAT_EPOCHS`` epochs with QAT (SGD, lr
    ``DIGITS_QAT_LR``, momentum 0.9), a statistics sample every ``DIGITS_STATISTICS_EVERY`` steps; then
    ``preparer.get_qat_statistics(model).plot(path, title)`` draws each quantizer's scale,
    each activation quantizer's observed range, and the fraction of elements clipped.
    """
    x_train, y_train, x_test, y_test = load_digits(seed=SEED)
    preparer = QATPreparer(statistics=StatisticsConfig(every=DIGITS_STATISTICS_EVERY))
    qat = preparer.prepare_for_qat(_trained_digits_cnn(), QuantizationConfig())
    optimizer = SGD(qat.parameters(), lr=DIGITS_QAT_LR, momentum=0.9)
    rng = np.random.default_rng(SEED + 1)
    for _ in range(DIGITS_QAT_EPOCHS):
        train_one_epoch(qat, DataLoader(x_train, y_train, DIGITS_BATCH, shuffle=True, rng=rng), optimizer)
    qat.eval()
    accuracy = float(np.mean(predict(qat, x_test).argmax(axis=1) == y_test))
    statistics = preparer.get_qat_statistics(qat)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "statistics.png"
    with plt.rc_context({"font.size": FONT_SIZE}):
        statistics.plot(path, title=f"DigitsCNN on the 8x8 digits, {DIGITS_QAT_EPOCHS} QAT epochs after "
                                    f"{DIGITS_FLOAT_EPOCHS} float: int8 weights, uint8 activations "
                                    f"(test accuracy {accuracy:.1%})")
    print(f"statistics: QAT test accuracy {accuracy:.3f}\n{statistics.summary()}")
    return path


# ----------------------------------------------------------------------------- 5. TinyGPT outliers

def _linear_inputs(model: TinyGPT, x: np.ndarray) -> dict[str, np.ndarray]:
    """The input of every Linear of every block on the tokens ``x``, flattened to (tokens,
    features), recorded by forward hooks."""
    inputs, handles = {}, []
    for index, block in enumerate(model.blocks):
        for name, layer in (("attn.qkv", block.attn.qkv), ("attn.proj", block.attn.proj), ("fc_1", block.fc_1),
                            ("fc_2", block.fc_2)):
            def record(module, args, output, key=f"blocks.{index}.{name}"):
                inputs[key] = np.array(args[0].data).reshape(-1, args[0].shape[-1])
            handles.append(layer.register_forward_hook(record))
    with no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return inputs


def draw_tinygpt_outliers(output_dir: Path) -> Path:
    """Why LLM activations are quantized per token and weights per group: ``tinygpt_outliers.png``.

    A TinyGPT trained briefly on Tiny Shakespeare (``_trained_tiny_gpt``) reads the first
    ``GPT_VALIDATION_WINDOWS`` validation windows; forward hooks record every Linear's input.
    The Linear whose input has the largest ratio max_c / median_c of the per-channel
    max |x| is drawn (the ratios of all of them are printed):

    (a) per-channel max over tokens of |x|, with the median; the largest channel relative to
        the median, and how many channels exceed 4 x the median;
    (b) per-token max over channels of |x| for the first four windows, with the SQNR of int8
        activations with one asymmetric scale per tensor vs one per token
        (``fake_quantize_per_token``; per tensor = the same on the whole batch as one row);
    (c) that Linear's weight (out, in): the absmax of each group of ``GROUP_SIZE`` input
        features relative to its row's absmax (the one per-channel scale), per output channel;
    (d) the distribution of that ratio, with the SQNR of int4 symmetric weights per channel
        (one group per row) vs per group of 32 (``fake_quantize_per_group``).
    """
    model = _trained_tiny_gpt()
    x, _ = _validation_windows()
    inputs = _linear_inputs(model, x)
    ratios = {}
    for key, activations in inputs.items():
        channel_max = np.abs(activations).max(axis=0)
        ratios[key] = float(channel_max.max() / np.median(channel_max))
    name = max(ratios, key=ratios.get)
    activations = inputs[name]
    channel_max = np.abs(activations).max(axis=0)
    token_max = np.abs(activations).max(axis=1)
    per_tensor = fake_quantize_per_token(activations.reshape(1, -1), bits=8).reshape(activations.shape)
    per_token = fake_quantize_per_token(activations, bits=8)
    weight = model.get_submodule(name).weight.data
    out_features, in_features = weight.shape
    per_row = fake_quantize_per_group(weight, in_features, bits=4)
    per_group = fake_quantize_per_group(weight, GROUP_SIZE, bits=4)
    group_max = np.abs(weight).reshape(out_features, -1, GROUP_SIZE).max(axis=2)
    group_ratio = group_max / group_max.max(axis=1, keepdims=True)
    median_channel = float(np.median(channel_max))
    outlier = int(np.argmax(channel_max))

    fig, axes = _figure(13, 9, 2, 2, constrained_layout=True)
    fig.suptitle(f"TinyGPT ({GPT_LAYERS} blocks, {GPT_CHANNELS} channels, {GPT_STEPS} training steps) on "
                 f"{x.size} validation characters: the input of {name} (a Linear, {in_features} features)")
    a, b, c, d = axes.ravel()
    a.bar(np.arange(channel_max.size), channel_max, width=1.0, color="tab:blue")
    a.axhline(median_channel, color="tab:orange", lw=1.5, label=f"median {median_channel:.2f}")
    # the label beside the bar, on the side with more room, above every other bar
    width = channel_max.size
    label_x = outlier + 0.08 * width if outlier < 0.6 * width else outlier - 0.4 * width
    a.annotate(f"channel {outlier}: {channel_max[outlier]:.2f}\n= {ratios[name]:.1f} x median",
               (outlier, channel_max[outlier]), xytext=(label_x, 1.08 * channel_max.max()), fontsize=10,
               arrowprops={"arrowstyle": "->"})
    large = int(np.sum(channel_max > 4 * median_channel))
    a.set(title=f"(a) per channel: max |x| over {activations.shape[0]} tokens\n{large} of {channel_max.size} "
                f"channels above 4 x the median", xlabel="input channel",
          ylabel="max |x| (activation units)", ylim=(0, 1.35 * channel_max.max()))
    a.legend(loc="upper left", fontsize=10)
    a.title.set_fontsize(10)
    shown = 4 * GPT_BLOCK
    b.bar(np.arange(shown), token_max[:shown], width=1.0, color="tab:green")
    b.axhline(float(np.median(token_max)), color="tab:orange", lw=1.5,
              label=f"median over all tokens {np.median(token_max):.2f}")
    for boundary in range(GPT_BLOCK, shown, GPT_BLOCK):
        b.axvline(boundary - 0.5, color="gray", lw=0.8, ls=":")
    b.set(title=f"(b) per token: max |x| over channels (4 windows of {GPT_BLOCK})\nint8 SQNR: one scale per "
                f"tensor {_sqnr(activations, per_tensor):.1f} dB, per token {_sqnr(activations, per_token):.1f} dB; "
                f"max/median {token_max.max() / np.median(token_max):.1f}",
          xlabel="token (position in the batch)", ylabel="max |x| (activation units)",
          ylim=(0, 1.3 * token_max[:shown].max()))
    b.title.set_fontsize(10)
    b.legend(loc="upper left", fontsize=10)
    rows = np.repeat(np.arange(out_features), group_ratio.shape[1])
    c.scatter(rows, group_ratio.ravel(), s=9, color="tab:purple", alpha=0.6,
              label=f"one group of {GROUP_SIZE} inputs: its max |w| / the row's")
    c.axhline(1.0, color="tab:red", lw=1.5, label="the row's max |w| (one per-channel scale)")
    c.set(title=f"(c) weights {out_features} x {in_features}: absmax of each group vs its row",
          xlabel="output channel (weight row)", ylabel="group max |w| / row max |w|", ylim=(0, 1.55))
    c.legend(loc="upper center", fontsize=9)
    d.hist(group_ratio.ravel(), bins=np.linspace(0, 1, 21), color="tab:purple", alpha=0.75)
    d.set(title=f"(d) int4 weight SQNR: per channel {_sqnr(weight, per_row):.1f} dB, per group of {GROUP_SIZE} "
                f"{_sqnr(weight, per_group):.1f} dB\nmedian group uses {np.median(group_ratio):.0%} of its row's "
                f"range",
          xlabel="group max |w| / row max |w|", ylabel="groups")
    d.title.set_fontsize(10)
    print("tinygpt_outliers: max/median of the per-channel max |x| at each Linear's input: "
          + ", ".join(f"{key} {value:.1f}" for key, value in ratios.items()))
    print(f"tinygpt_outliers: drawn {name}: channel {outlier} max |x| {channel_max[outlier]:.2f}, median "
          f"{median_channel:.2f}, {large} channels above 4 x median; per-token max/median "
          f"{token_max.max() / np.median(token_max):.2f}; int8 "
          f"activation SQNR per tensor {_sqnr(activations, per_tensor):.1f} dB, per token "
          f"{_sqnr(activations, per_token):.1f} dB; int4 weight SQNR per channel {_sqnr(weight, per_row):.1f} dB, "
          f"per group {_sqnr(weight, per_group):.1f} dB; median group/row absmax {np.median(group_ratio):.2f}")
    return _save(fig, output_dir, "tinygpt_outliers.png")


FIGURES = {
    "staircase.png": draw_staircase,
    "qat_vs_integer_graph.png": draw_qat_vs_integer_graph,
    "per_tensor_vs_per_channel.png": draw_per_tensor_vs_per_channel,
    "statistics.png": draw_statistics,
    "tinygpt_outliers.png": draw_tinygpt_outliers,
}


def main(argv: list[str] | None = None) -> list[Path]:
    """Draw every figure of ``FIGURES`` into ``--output`` (default: this script's folder)."""
    parser = argparse.ArgumentParser(description="Draw the teaching figures of qatcore's docs.")
    parser.add_argument("--output", type=Path, default=HERE, help="folder for the PNG files (default: %(default)s)")
    output = parser.parse_args(argv).output
    return [draw(output) for draw in FIGURES.values()]


if __name__ == "__main__":
    for written in main():
        print(f"wrote {written}")
