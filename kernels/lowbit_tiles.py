"""The vector tiles of ``lowbit_gemm``: LLVM IR intrinsics (numba ``@intrinsic``), which run only
compiled; ``lowbit_gemm`` holds the arithmetic they implement, the plain loops that compute
the same numbers (no VNNI, ``NUMBA_DISABLE_JIT``) and the tests' oracles.

- ``unpack_vector_4`` / ``unpack_vector_2``: a packed weight row to int8, 16 bytes a step (byte
  shifts sign-extend each field, shuffles interleave them); ``group_sums_vector``: the int32
  sum of each group of an unpacked row, 16 bytes a step.
- ``dynamic_tile_2`` / ``dynamic_tile_1`` (AVX-512 VNNI): 2 (or 1) blocks of 16 activation rows
  by ``TILE_COLS`` = 4 weight rows, every group. The activations come as words of 4 bytes (4 k,
  sign bit flipped: x + 128) of 16 rows, so that one ``vpdpbusd`` adds 4 k of 16 rows in its 16
  int32 lanes with a weight word broadcast (int8_conv_lanes does the same with pixels). Each
  group's 8 accumulators start at -(z + 128) * sum_k w (the zero point moved by 128 with x), so
  after the group's steps each lane holds the exact isum; the lanes then go to float64 and add
  isum * scale into 16 float64 accumulators with a fused multiply-add, exact for
  group_size <= 2^18 (lowbit_gemm only calls the tiles then). No horizontal sums anywhere.
- ``weight_only_tile(rows, bits, has_zero, lookup)`` and ``weight_only_block``, its dispatcher:
  ``rows`` (1 or ``TILE_ROWS`` = 2) activation rows by 4 weight rows, the weight-only sums in the
  order of lowbit_gemm's docstring, 8 float64 lanes (one packed byte a lane).

Which instructions the host has is read when the module is imported (``USE_VNNI`` from
int8_gemm, ``USE_LOOKUP``) and frozen into the compiled code; numba's on-disk cache is keyed to
the host CPU.
"""

import llvmlite.binding
from llvmlite import ir
from numba import config, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .int8_gemm import USE_VNNI

__all__ = ["LANES", "TILE_COLS", "ROW_BLOCKS", "TILE_ROWS", "USE_VNNI", "USE_VECTOR_TILES", "USE_LOOKUP",
           "unpack_vector_4", "unpack_vector_2", "group_sums_vector", "dynamic_tile_vnni", "dynamic_tile_2",
           "dynamic_tile_1", "weight_only_tile", "weight_only_block"]

# float64 lanes of the weight-only tiles (one packed byte each).
LANES = 8
# Weight rows of every tile; activation blocks of 16 rows of the VNNI tile; activation rows of
# the weight-only tile.
TILE_COLS, ROW_BLOCKS, TILE_ROWS = 4, 2, 2
# The unpacking and weight-only tiles are LLVM vector code, which runs on any CPU, but not as
# plain Python.
USE_VECTOR_TILES = not config.DISABLE_JIT
# The weight-only tiles look their weights up in tables of the group's values with AVX-512's
# vpermi2pd / vpermpd where the CPU has AVX-512; elsewhere they build them in the integer
# lanes. Same numbers.
USE_LOOKUP = USE_VECTOR_TILES and bool(llvmlite.binding.get_host_cpu_features().get("avx512f", False))
# 2^52 + 2^51: a double whose ulp is 1, so its mantissa holds integers in [-2^51, 2^51).
_MAGIC, _MAGIC_BITS = float(2**52 + 2**51), 0x4338000000000000


# ----------------------------------------------------------------------------------------
# LLVM helpers for the intrinsics.


def _address(builder, array, indices, element):
    """A pointer to ``array[indices]`` (i64 values) as ``element*``, from the array's byte strides."""
    strides = cgutils.unpack_tuple(builder, array.strides, len(indices))
    offset = ir.Constant(ir.IntType(64), 0)
    for index, stride in zip(indices, strides):
        offset = builder.add(offset, builder.mul(index, stride))
    base = builder.bitcast(array.data, ir.IntType(8).as_pointer())
    return builder.bitcast(builder.gep(base, [offset]), element.as_pointer())


def _splat(builder, value, count):
    vector = ir.VectorType(value.type, count)
    one = builder.insert_element(ir.Constant(vector, None), value, ir.IntType(32)(0))
    return builder.shuffle_vector(one, ir.Constant(vector, None), ir.Constant(ir.VectorType(ir.IntType(32), count),
                                                                              [0] * count))


def _lane_mask(lanes):
    return ir.Constant(ir.VectorType(ir.IntType(32), len(lanes)), list(lanes))



# ----------------------------------------------------------------------------------------
# Unpacking a weight row, and its group sums.


def _unpack_vector(bits):
    """An intrinsic: out[per * j + f] = w_q[n, per * j + f] for j < 16 * steps (per = 8 / bits)."""
    per = 8 // bits

    @intrinsic
    def unpack(typingctx, packed, n, steps, out):
        def codegen(context, builder, signature, args):
            packed_a = context.make_array(signature.args[0])(context, builder, args[0])
            out_a = context.make_array(signature.args[3])(context, builder, args[3])
            i8, i16, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(64)
            sixteen = ir.VectorType(i8, 16)
            row = _address(builder, packed_a, [args[1], i64(0)], i8)
            target = _address(builder, out_a, [i64(0)], i8)
            out_type = ir.VectorType(i8, 16 * per)
            with cgutils.for_range(builder, args[2]) as loop:
                offset = builder.mul(loop.index, i64(16))
                v = builder.load(builder.bitcast(builder.gep(row, [offset]), sixteen.as_pointer()), align=1)
                fields = [builder.ashr(builder.shl(v, ir.Constant(sixteen, [8 - bits * (f + 1)] * 16)),
                                       ir.Constant(sixteen, [8 - bits] * 16)) for f in range(per)]
                pairs = _lane_mask([i + 16 * half for i in range(16) for half in range(2)])
                if per == 2:
                    result = builder.shuffle_vector(fields[0], fields[1], pairs)
                else:  # interleave (f0, f1) and (f2, f3) by bytes, then the two by 16-bit pairs
                    low = builder.bitcast(builder.shuffle_vector(fields[0], fields[1], pairs), ir.VectorType(i16, 16))
                    high = builder.bitcast(builder.shuffle_vector(fields[2], fields[3], pairs), ir.VectorType(i16, 16))
                    result = builder.bitcast(builder.shuffle_vector(low, high, pairs), out_type)
                destination = builder.gep(target, [builder.mul(offset, i64(per))])
                builder.store(result, builder.bitcast(destination, out_type.as_pointer()), align=1)
            return context.get_dummy_value()

        return types.void(packed, types.intp, types.intp, out), codegen

    return unpack


unpack_vector_4 = _unpack_vector(4)
unpack_vector_2 = _unpack_vector(2)


@intrinsic
def group_sums_vector(typingctx, rows, r, groups, steps, sums):
    """sums[r, g] = sum of rows[r, 16 * steps * g + i] for i < 16 * steps (int8 -> int32), g < groups."""
    def codegen(context, builder, signature, args):
        rows_a = context.make_array(signature.args[0])(context, builder, args[0])
        sums_a = context.make_array(signature.args[4])(context, builder, args[4])
        row, n_groups, n_steps = args[1], args[2], args[3]
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        sixteen, lanes = ir.VectorType(i8, 16), ir.VectorType(i32, 16)
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [lanes]),
                                                "llvm.vector.reduce.add.v16i32")
        total = cgutils.alloca_once_value(builder, ir.Constant(lanes, None))
        with cgutils.for_range(builder, n_groups) as group_loop:
            builder.store(ir.Constant(lanes, None), total)
            first = builder.mul(builder.mul(group_loop.index, n_steps), i64(16))
            with cgutils.for_range(builder, n_steps) as loop:
                column = builder.add(first, builder.mul(loop.index, i64(16)))
                piece = builder.load(_address(builder, rows_a, [row, column], sixteen), align=1)
                builder.store(builder.add(builder.load(total), builder.sext(piece, lanes)), total)
            target = _address(builder, sums_a, [row, group_loop.index], i32)
            builder.store(builder.call(reduce, [builder.load(total)]), target)
        return context.get_dummy_value()

    return types.void(rows, types.intp, types.intp, types.intp, sums), codegen


# ----------------------------------------------------------------------------------------
# The dynamic product's VNNI tile.


def dynamic_tile_vnni(blocks, cols=TILE_COLS):
    """An intrinsic: the float64 sums over all groups of ``blocks`` x 16 activation rows by
    TILE_COLS weight rows (module docstring, "Paths")."""

    @intrinsic
    def tile(typingctx, words, block0, rows, row0, sums, scales, negative_zeros, groups, chunks, acc):
        """acc[c, 16 * b + lane] = sum_g float64(isum) * scales[row0 + c, g] for activation row
        16 * (block0 + b) + lane; words uint32 (blocks, chunks, 16), rows int8 (r, chunks * 4),
        sums int32 and scales float64 (r, G), negative_zeros int32 (blocks, 16), acc float64."""
        def codegen(context, builder, signature, args):
            arrays = [context.make_array(t)(context, builder, v) if isinstance(t, types.Array) else v
                      for t, v in zip(signature.args, args)]
            words_a, first_block, rows_a, first_row, sums_a, scales_a, zeros_a, n_groups, n_chunks, acc_a = arrays
            i32, i64, f64 = ir.IntType(32), ir.IntType(64), ir.DoubleType()
            lanes, doubles = ir.VectorType(i32, 16), ir.VectorType(f64, 8)
            dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes, [lanes] * 3),
                                                    "llvm.x86.avx512.vpdpbusd.512")
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(doubles, [doubles] * 3),
                                                 "llvm.fma.v8f64")
            block_index = [builder.add(first_block, i64(b)) for b in range(blocks)]
            row_index = [builder.add(first_row, i64(c)) for c in range(cols)]
            zeros = [builder.load(_address(builder, zeros_a, [block_index[b], i64(0)], lanes), align=4)
                     for b in range(blocks)]
            sum_vars = [[cgutils.alloca_once_value(builder, ir.Constant(lanes, None)) for _ in range(cols)]
                        for _ in range(blocks)]
            totals = [[[cgutils.alloca_once_value(builder, ir.Constant(doubles, None)) for _ in range(2)]
                       for _ in range(cols)] for _ in range(blocks)]
            with cgutils.for_range(builder, n_groups) as group_loop:
                g = group_loop.index
                for c in range(cols):  # each group's sums start at -(z + 128) * sum_k w
                    weight_sum = _splat(builder, builder.load(_address(builder, sums_a, [row_index[c], g], i32)), 16)
                    for b in range(blocks):
                        builder.store(builder.mul(zeros[b], weight_sum), sum_vars[b][c])
                first_chunk = builder.mul(g, n_chunks)
                with cgutils.for_range(builder, n_chunks) as chunk_loop:
                    chunk = builder.add(first_chunk, chunk_loop.index)
                    xs = [builder.load(_address(builder, words_a, [block_index[b], chunk, i64(0)], lanes), align=4)
                          for b in range(blocks)]
                    for c in range(cols):
                        word = builder.load(_address(builder, rows_a, [row_index[c], builder.mul(chunk, i64(4))], i32),
                                            align=1)
                        broadcast = _splat(builder, word, 16)
                        for b in range(blocks):
                            total = builder.call(dpbusd, [builder.load(sum_vars[b][c]), xs[b], broadcast])
                            builder.store(total, sum_vars[b][c])
                for c in range(cols):  # |isum| < 2^29: isum * scale is exact, and a fused multiply-add rounds once
                    scale = _splat(builder, builder.load(_address(builder, scales_a, [row_index[c], g], f64)), 8)
                    for b in range(blocks):
                        total = builder.load(sum_vars[b][c])
                        for half in range(2):
                            lanes8 = builder.shuffle_vector(total, total, _lane_mask(range(8 * half, 8 * half + 8)))
                            part = builder.sitofp(lanes8, doubles)
                            builder.store(builder.call(fma, [part, scale, builder.load(totals[b][c][half])]),
                                          totals[b][c][half])
            for c in range(cols):
                for b in range(blocks):
                    for half in range(2):
                        target = _address(builder, acc_a, [i64(c), i64(16 * b + 8 * half)], doubles)
                        builder.store(builder.load(totals[b][c][half]), target, align=8)
            return context.get_dummy_value()

        return types.void(words, types.intp, rows, types.intp, sums, scales, negative_zeros, types.intp, types.intp,
                          acc), codegen

    return tile


dynamic_tile_2 = dynamic_tile_vnni(ROW_BLOCKS)
dynamic_tile_1 = dynamic_tile_vnni(1)


# ----------------------------------------------------------------------------------------
# The weight-only product's vector tile: the summation order of the module docstring as 8-lane
# float64 vectors, one lane a packed byte (LLVM vector code, which any CPU runs).


def weight_only_tile(rows, bits, has_zero, lookup):
    """An intrinsic: acc[r, c] = the weight-only sum of activation row row0 + r and weight row
    col0 + c for c < TILE_COLS, for group sizes that are a multiple of 8 * per (``chunks`` =
    group_size / (8 * per) steps of 8 packed bytes a group); ``has_zero``: read the zero points
    (else they are 0).

    Each step turns 8 bytes of a weight row into per vectors of 8 exact float64 weights w - z:
    ``lookup`` (AVX-512): each field, shifted to the low bits of a 64-bit lane, indexes a table
    of the 2^bits values (w - z) of the group (``vpermi2pd`` / ``vpermpd``); otherwise in LLVM
    vector code any CPU runs, with no conversion instruction: field f, scaled by 2^(bits * f), is
    or'ed into (the top one, signed, added to) the mantissa of 2^52 + 2^51, and subtracting
    2^52 + 2^51 + 2^(bits * f) * z leaves 2^(bits * f) (w - z) exactly (x_split then holds
    x / 2^(bits * f), also exact). A group whose zero points all lie within +-2^24 multiplies and
    adds with a fused multiply-add: the product of a float32 and an integer below 2^29 (scaled by
    a power of two) is exact, so it rounds as the multiply-then-add of the definition, which the
    other groups run."""
    per, cols = 8 // bits, TILE_COLS

    @intrinsic
    def tile(typingctx, x_split, row0, packed, col0, zeros, scales, groups, chunks, acc):
        """x_split float64 (M, per, width): x_split[m, f, j] = x[m, per * j + f] (divided by
        2^(bits * f) unless ``lookup``); packed uint8 (N, width); zeros int32 and scales float32
        (N, G), any strides; acc float64 (rows, cols)."""
        def codegen(context, builder, signature, args):
            arrays = [context.make_array(t)(context, builder, v) if isinstance(t, types.Array) else v
                      for t, v in zip(signature.args, args)]
            x_a, first_row, packed_a, first_col, zeros_a, scales_a, n_groups, n_chunks, acc_a = arrays
            i8, i32, i64, f32, f64 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType(), ir.DoubleType()
            doubles, bytes8, longs = ir.VectorType(f64, LANES), ir.VectorType(i8, LANES), ir.VectorType(i64, LANES)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(doubles, [doubles] * 3),
                                                 "llvm.fma.v8f64")
            row_index = [builder.add(first_row, i64(r)) for r in range(rows)]
            col_index = [builder.add(first_col, i64(c)) for c in range(cols)]
            zero = ir.Constant(doubles, None)
            lane_sums = [[cgutils.alloca_once_value(builder, zero) for _ in range(cols)] for _ in range(rows)]
            partials = [[cgutils.alloca_once_value(builder, zero) for _ in range(cols)] for _ in range(rows)]
            if lookup:
                # the 2^bits values of w, in the order of the field's bits; for int2 twice, since
                # vpermpd reads 3 index bits
                grid_values = [v - (1 << bits) if v >= 1 << (bits - 1) else v for v in range(1 << bits)]
                if bits == 2:
                    grid_values = grid_values * 2
                grid_tables = [ir.Constant(doubles, [float(v) for v in grid_values[i:i + 8]])
                               for i in range(0, len(grid_values), 8)]
                if bits == 4:
                    permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                        doubles, [doubles, longs, doubles]), "llvm.x86.avx512.vpermi2var.pd.512")
                else:
                    permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                        doubles, [doubles, longs]), "llvm.x86.avx512.permvar.df.512")
                shifts = [ir.Constant(longs, [bits * f] * LANES) for f in range(per)]
            else:
                masks = [ir.Constant(longs, [((1 << bits) - 1) << (bits * f)] * LANES) for f in range(per - 1)]
                tags = [ir.Constant(longs, [_MAGIC_BITS | ((1 << (bits - 1)) << (bits * f))] * LANES)
                        for f in range(per - 1)]
                top_mask = ir.Constant(longs, [~((1 << (8 - bits)) - 1)] * LANES)
                magic = ir.Constant(longs, [_MAGIC_BITS] * LANES)
                offsets = [(1 << (bits - 1)) << (bits * f) for f in range(per - 1)] + [0]

            def group_state(points):
                """Per column, what turns its fields into w - z in this group: the tables (lookup),
                or the subtrahends 2^52 + 2^51 + offset_f + 2^(bits f) z (offset_f = h_f but 0 for
                the top field). z = 0 without zero points: constants."""
                if points is None:
                    if lookup:
                        return [grid_tables] * cols
                    return [[ir.Constant(doubles, [_MAGIC + offsets[f]] * LANES) for f in range(per)]] * cols
                state = []
                for point in points:
                    z = builder.sitofp(point, f64)
                    if lookup:
                        state.append([builder.fsub(table, _splat(builder, z, LANES)) for table in grid_tables])
                    else:
                        state.append([_splat(builder, builder.fadd(builder.fmul(z, f64(float(1 << (bits * f)))),
                                                                   f64(_MAGIC + offsets[f])), LANES)
                                      for f in range(per)])
                return state

            def weights(raw, state):
                """The per vectors of (scaled) w - z of 8 packed bytes, exact."""
                if lookup:
                    wide = builder.zext(raw, longs)
                    indexes = [wide if f == 0 else builder.lshr(wide, shifts[f]) for f in range(per)]
                    if bits == 4:
                        return [builder.call(permute, [state[0], index, state[1]]) for index in indexes]
                    return [builder.call(permute, [state[0], index]) for index in indexes]
                signed = builder.sext(raw, longs)
                fields = [builder.xor(builder.and_(signed, masks[f]), tags[f]) for f in range(per - 1)]
                fields.append(builder.add(builder.and_(signed, top_mask), magic))
                return [builder.fsub(builder.bitcast(field, doubles), state[f]) for f, field in enumerate(fields)]

            def chunk_loop(first_chunk, fast, state):
                with cgutils.for_range(builder, n_chunks) as loop:
                    byte = builder.mul(builder.add(first_chunk, loop.index), i64(LANES))
                    xs = [[builder.load(_address(builder, x_a, [row_index[r], i64(f), byte], doubles), align=8)
                           for f in range(per)] for r in range(rows)]
                    for c in range(cols):
                        raw = builder.load(_address(builder, packed_a, [col_index[c], byte], bytes8), align=1)
                        for f, weight in enumerate(weights(raw, state[c])):
                            for r in range(rows):
                                partial = builder.load(partials[r][c])
                                if fast:
                                    total = builder.call(fma, [xs[r][f], weight, partial])
                                else:
                                    total = builder.fadd(partial, builder.fmul(xs[r][f], weight))
                                builder.store(total, partials[r][c])

            with cgutils.for_range(builder, n_groups) as group_loop:
                g = group_loop.index
                for r in range(rows):
                    for c in range(cols):
                        builder.store(zero, partials[r][c])
                first_chunk = builder.mul(g, n_chunks)
                if has_zero:
                    points = [builder.load(_address(builder, zeros_a, [col_index[c], g], i32)) for c in range(cols)]
                    small = ir.Constant(ir.IntType(1), 1)
                    for point in points:
                        inside = builder.icmp_unsigned("<=", builder.add(point, i32(1 << 24)), i32(1 << 25))
                        small = builder.and_(small, inside)
                    state = group_state(points)
                    with builder.if_else(small, likely=True) as (fast_branch, slow_branch):
                        with fast_branch:
                            chunk_loop(first_chunk, True, state)
                        with slow_branch:
                            chunk_loop(first_chunk, False, state)
                else:
                    chunk_loop(first_chunk, True, group_state(None))
                for c in range(cols):
                    scale = _splat(builder, builder.fpext(
                        builder.load(_address(builder, scales_a, [col_index[c], g], f32)), f64), LANES)
                    for r in range(rows):
                        value = builder.fmul(builder.load(partials[r][c]), scale)
                        builder.store(builder.fadd(builder.load(lane_sums[r][c]), value), lane_sums[r][c])
            for r in range(rows):
                for c in range(cols):
                    value = builder.load(lane_sums[r][c])
                    for width in (4, 2, 1):  # A_l + A_(l + width) for l < width
                        low = builder.shuffle_vector(value, value, _lane_mask(list(range(width)) * (LANES // width)))
                        high = builder.shuffle_vector(value, value, _lane_mask(
                            list(range(width, 2 * width)) * (LANES // width)))
                        value = builder.fadd(low, high)
                    target = _address(builder, acc_a, [i64(r), i64(c)], f64)
                    builder.store(builder.extract_element(value, i32(0)), target)
            return context.get_dummy_value()

        return types.void(x_split, types.intp, packed, types.intp, zeros, scales, types.intp, types.intp, acc), codegen

    return tile


# (bits, rows, has_zero): the tiles of the 2 x 2 x 2 cases, named for numba
_wo_4_1_z, _wo_4_2_z, _wo_2_1_z, _wo_2_2_z = (weight_only_tile(r, b, True, USE_LOOKUP) for b in (4, 2)
                                              for r in (1, TILE_ROWS))
_wo_4_1, _wo_4_2, _wo_2_1, _wo_2_2 = (weight_only_tile(r, b, False, USE_LOOKUP) for b in (4, 2)
                                      for r in (1, TILE_ROWS))


@njit(cache=True)
def weight_only_block(x_split, m0, rows, packed, n0, bits, has_zero, zeros, scales, chunks, acc):
    groups = scales.shape[1]
    if has_zero:
        if bits == 4:
            if rows == TILE_ROWS:
                _wo_4_2_z(x_split, m0, packed, n0, zeros, scales, groups, chunks, acc)
            else:
                _wo_4_1_z(x_split, m0, packed, n0, zeros, scales, groups, chunks, acc)
        elif rows == TILE_ROWS:
            _wo_2_2_z(x_split, m0, packed, n0, zeros, scales, groups, chunks, acc)
        else:
            _wo_2_1_z(x_split, m0, packed, n0, zeros, scales, groups, chunks, acc)
    elif bits == 4:
        if rows == TILE_ROWS:
            _wo_4_2(x_split, m0, packed, n0, zeros, scales, groups, chunks, acc)
        else:
            _wo_4_1(x_split, m0, packed, n0, zeros, scales, groups, chunks, acc)
    elif rows == TILE_ROWS:
        _wo_2_2(x_split, m0, packed, n0, zeros, scales, groups, chunks, acc)
    else:
        _wo_2_1(x_split, m0, packed, n0, zeros, scales, groups, chunks, acc)
