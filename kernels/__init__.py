"""Numba kernels behind qatcore's hot ops: convolution, pooling, batch norm and fake quantization.

This folder sits at the top of the repository and is installed as ``qatcore.kernels``.

Modules:
    window   -- the geometry of a sliding window along one axis: ``output_size`` and
                ``valid_range`` (which taps or outputs read inside the input), shared by
                im2col, pooling and int8_conv.
    layout   -- the two memory layouts of an (N, C, ...) activation the float kernels read as
                they are: C-contiguous and channel-major ((C, N, ...) order, what conv2d
                produces); and ``channels_last``, the (N, H, W, C) copy of the int8 convolutions.
    im2col   -- ``im2col`` / ``col2im``: the column layout that turns conv2d into one GEMM per
                layer (done by NumPy), and its adjoint for the input gradient.
    depthwise_conv -- ``depthwise_conv2d_forward`` / ``depthwise_conv2d_input_grad`` /
                ``depthwise_conv2d_weight_grad``: the depthwise conv (groups == C == K)
                computed directly, without im2col, for float training.
    pooling  -- ``max_pool2d_forward`` / ``max_pool2d_backward`` and ``avg_pool2d_forward`` /
                ``avg_pool2d_backward``, matching PyTorch's CPU kernels (ceil_mode=False).
    batch_norm -- ``batch_norm_train_forward`` / ``batch_norm_train_backward``: per-channel
                statistics (float64), normalization and the backward reductions, fused.
    fake_quant -- ``fake_quantize_forward`` / ``fake_quantize_backward``: fake quantization
                per tensor or per channel (docs/numerics.md, "Fake quantization"), and its
                single-pass backward (STE, LSQ, LSQ+, clipped counts).
    block_fake_quant -- ``block_fake_quantize_forward`` / ``block_fake_quantize_backward``:
                per-token and per-group fake quantization with qparams from each block's own
                values (docs/numerics.md, "Per-group and per-token fake quantization"), and its
                straight-through backward.
    requantize -- the fixed-point requantization of the int8 runtime: ``quantize_multiplier``,
                gemmlowp's helpers, and qatcore's headroom shift that avoids double rounding.
    requantize_float32 -- the float32 requantization (ONNX Runtime's: a float32 product,
                round half to even), ``requantize_float32_value`` and its array form.
    int8_gemm  -- ``int8_gemm_int32`` / ``int8_linear``: blocked int8 GEMM (AVX-512 VNNI
                ``vpdpbusd`` where available) with the fused requantization epilogue.
    int8_conv  -- ``int8_conv2d``: channels-last gather + int8 GEMM, zero padding at the input's
                zero point, groups and depthwise.
    int8_conv_lanes -- the pixel-lane path of ``int8_conv2d`` (VNNI with output pixels in the
                vector lanes) for ungrouped convolutions.
    int8_depthwise -- the depthwise path of ``int8_conv2d`` (groups == C == K), along the channels.
    lowbit_pack -- ``pack_lowbit`` / ``unpack_lowbit``: int4 and int2 weights 8 / bits to a byte
                (ONNX's INT4 layout, generalised to 2 bits), each row packed on its own.
    lowbit_gemm -- ``dynamic_int8_lowbit_gemm`` (per-token int8 activations, 8da4w) and
                ``weight_only_lowbit_gemm`` against packed grouped weights, both read straight
                from the packed bytes, and ``quantize_per_token``, the activations' integers.
    lowbit_tiles -- the vector tiles of lowbit_gemm (LLVM IR intrinsics: AVX-512 VNNI with
                activation rows in the lanes, float64 lanes of the weight-only order).
    int8_add   -- ``add_fixed_point`` / ``add_float32``: the int8 residual add (and add + ReLU)
                in both requantization arithmetics, elementwise.
    lookup     -- ``lookup``: ``table[q - offset]``, the gather of the int8 runtime's lookup
                tables (unary activations).
    erf        -- ``erf``: the error function elementwise (libm's, through numba), for the exact GELU.

Conventions shared by every kernel:
    * Pure functions over NumPy arrays: arguments are never modified, results are new arrays
      (``im2col.col2im_add`` adds into its output argument, and says so), inputs are
      C-contiguous float32 or float64 (the caller passes ``np.ascontiguousarray``) or, where a
      docstring says so, channel-major (``layout``);
      per-tensor and per-channel fake quantization (``fake_quant``) is float32 by contract.
    * Argument validation is the caller's job; each docstring states its preconditions and the
      formula or index mapping it implements.
    * The jit is applied only here: ``@njit(cache=True)``, no explicit signatures, so a loop is
      compiled on its first call (one specialisation per dtype) and then loaded from the on-disk
      cache. Nothing compiles at import time.
    * With ``NUMBA_DISABLE_JIT=1`` every kernel runs unchanged as plain Python, so it can be
      stepped through in a debugger.
    * Each kernel has a NumPy reference oracle in ``tests/kernels``.

This package imports neither numba nor its submodules, so ``import qatcore`` stays fast and
compiles nothing: the submodules are attributes imported on first use (PEP 562), so an op
imports the package once, at the top of its module, and numba loads when a kernel first runs:

    from qatcore import kernels
    ...
    cols = kernels.im2col.im2col(x, kh, kw, sh, sw, ph, pw, dh, dw)
"""

from qatcore.lazy_exports import lazy_exports

__all__ = ["layout", "window", "im2col", "depthwise_conv", "pooling", "batch_norm", "fake_quant", "block_fake_quant",
           "requantize", "requantize_float32", "int8_gemm", "int8_conv", "int8_conv_lanes", "int8_depthwise",
           "lowbit_pack", "lowbit_gemm", "lowbit_tiles", "int8_add", "lookup", "erf"]

__getattr__, __dir__ = lazy_exports(__name__, submodules=(
    "layout", "window", "im2col", "depthwise_conv", "pooling", "batch_norm", "fake_quant", "block_fake_quant",
    "requantize", "requantize_float32", "int8_gemm", "int8_conv", "int8_conv_lanes", "int8_depthwise", "lowbit_pack",
    "lowbit_gemm", "lowbit_tiles", "int8_add", "lookup", "erf",
))
