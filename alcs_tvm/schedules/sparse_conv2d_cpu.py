"""The ALCS sparse convolution as a loop-level TIR template for CPUs (the hand-written schedule).

Loop nest, outer to inner::

    parallel  task over (image n, output block ob, row tile)     # consecutive tasks share a block's weights
      serial  column tile
        acc[rows, cols, V] = bias | 0                            # < 1 KB "global" buffer -> registers
        for L in max_run .. 1:                                   # one segment per run length
          for q in runs of length L of block ob:                 # data-dependent CSR range
            unrolled rows, unrolled cols, unrolled l < L, vectorised V:
              acc[r, c, :] += values[vstart[q] + l, :] * x[base + offsets[q] + r*row_step + (c + l)*col_step]
        store activation(acc) (one V-wide store per pixel in NCHW[V]c; a lane scatter in NCHW)

``offsets[q]`` is the flat offset of a run's first kept position ``(cin, kh, kw)`` in the (padded) input,
precomputed at pack time, so the inner loop does no index arithmetic, no bounds tests, and never multiplies a
pruned zero. A *run* is up to ``max_run`` kept taps ``kw, kw+1, ..`` of one ``(cin, kh)`` (stride 1, no dilation
along W): pixel ``c`` at tap ``kw+l`` reads the same input as pixel ``c+l`` at tap ``kw``, so one broadcast input
load feeds ``L`` FMAs. Each FMA otherwise needs its own broadcast load, and 512-bit loads (2 per cycle on Intel
cores) then bound the kernel below the FMA peak; dense and lightly pruned 3x3 layers are mostly long runs.

The input must already be padded; the op-level wrapper (:mod:`alcs_tvm.kernels`) either pads into a workspace
first or receives input that the previous layer wrote with a zero border.

The template is built with TVM's IRBuilder from plain Python functions, not parsed as TVMScript macros: see
:mod:`.tir_builder` for why, and for how each TVMScript construct reads in that style.
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm

from ..layer import ACTIVATIONS
from . import SparseConvSchedule
from .tir_builder import IRBuilder, T, loop, named, only_if

__all__ = ["KernelGeometry", "sparse_conv2d_template", "activation_buffer_offsets", "activate", "bordered_shape",
           "EpilogueShapes"]



class EpilogueShapes:
    """``output_shape`` and ``residual_shape`` of a kernel that writes a conv's output (and reads its fused shortcut)
    in the layouts of :class:`~alcs_tvm.layer.KernelLayout`, from the geometry's ``batch, out_channels,
    out_height, out_width, out_blocked, out_pad, residual, residual_pad, layout_blocks, layout_block``."""

    @property
    def residual_shape(self) -> tuple | None:
        if self.residual is None:
            return None
        if self.residual == "nchw":
            return bordered_shape(self.batch, self.out_channels, self.out_height, self.out_width)
        return bordered_shape(self.batch, self.layout_blocks, self.out_height, self.out_width, self.residual_pad,
                              (self.layout_block,))

    @property
    def output_shape(self) -> tuple:
        if self.out_blocked:
            return bordered_shape(self.batch, self.layout_blocks, self.out_height, self.out_width, self.out_pad,
                                  (self.layout_block,))
        return bordered_shape(self.batch, self.out_channels, self.out_height, self.out_width, self.out_pad)


@dataclass(frozen=True)
class KernelGeometry(EpilogueShapes):
    """Memory geometry the template is specialised for (all sizes in fp32 elements).

    ``input_shape``: the (already padded) input buffer as the kernel receives it; ``input_pad``: if not all
    zero, the kernel receives the *unpadded* NCHW input and pads it into a workspace of ``padded_shape`` first.
    """

    batch: int
    input_shape: tuple
    padded_shape: tuple  # (N, C, Hp, Wp) or (N, C/b, Hp, Wp, b): what offsets index into
    input_pad: tuple  # (top, left, bottom, right) done inside the kernel; zeros when pre-padded
    row_step: int  # input elements between vertically adjacent output pixels
    col_step: int  # input elements between horizontally adjacent output pixels
    out_channels: int
    num_blocks: int
    out_height: int
    out_width: int
    out_blocked: bool  # NCHW[V]c output (one vector store per pixel) instead of NCHW
    out_pad: tuple = (0, 0, 0, 0)  # zero border written around the output, for the next conv
    nnz: int = 1  # buffer length of values (>= 1 even when every block is empty)
    nruns: int = 1  # buffer length of offsets/vstart: runs of horizontally adjacent kept taps (>= 1)
    max_run: int = 1  # longest run; runs of each length 1..max_run are a segment of their own
    # a residual added before the activation (ResNet's shortcut): None, "nchw" [N, Cout, Ho, Wo], or "blocked"
    # [N, NB, Ho + top + bottom, Wo + left + right, V] with a border of residual_pad around the values
    residual: str | None = None
    residual_pad: tuple = (0, 0, 0, 0)
    vector_width: int = 0  # V, output channels per pruning group (0: not given; blocked shapes end in None)
    # channels per block of a blocked output / residual (NCHW[b]c); 0: V. A group of V = k * b channels is
    # stored as k blocks, so layers with different V chain in one layout.
    out_block: int = 0

    @property
    def layout_block(self) -> int | None:
        return self.out_block or self.vector_width or None

    @property
    def layout_blocks(self) -> int:
        """Blocks of ``layout_block`` channels in a blocked output / residual: those holding an output channel (a
        partial last group of V = k * b channels, 72 = 4.5 * 16, is stored as the blocks of b its channels fill,
        9 of 8)."""
        if self.vector_width and self.layout_block:
            return -(-self.out_channels // self.layout_block)
        return self.num_blocks

    @property
    def batch_stride(self) -> int:
        return shape_size(self.padded_shape[1:])



def bordered_shape(batch, channels, height, width, pad=(0, 0, 0, 0), lanes=()) -> tuple:
    """``[N, C, H + top + bottom, W + left + right]`` plus ``lanes``: an NCHW tensor, or with ``lanes = (b,)`` an
    NCHW[b]c one (``channels`` counting blocks), with a zero border of ``pad`` for the next layer."""
    top, left, bottom, right = pad
    return (batch, channels, height + top + bottom, width + left + right) + tuple(lanes)


def pad_nchw(x, xp, input_shape, pad):
    """Store the NCHW input ``x`` (``input_shape``) into the flat buffer ``xp`` inside a zero border ``pad`` (top,
    left, bottom, right): one parallel task per (image, channel, padded row). Call it inside a PrimFunc being built
    (:mod:`.tir_builder`)."""
    n_images, channels, height, width = (int(d) for d in input_shape)
    top, left, bottom, right = pad
    padded_height, padded_width = height + top + bottom, width + left + right
    with loop("nch", T.parallel(n_images * channels * padded_height)) as nch:
        row = nch % padded_height
        with T.If(tvm.tirx.any(row < top, row >= top + height)):
            with T.Then():
                with loop("w", T.vectorized(padded_width)) as w:
                    T.buffer_store(xp, T.float32(0), [nch * padded_width + w])
            with T.Else():
                for start, count in ((0, left), (left + width, right)):
                    if count:  # a loop of extent 0 cannot be vectorized: pads like [1, 0, 1, 0] have none
                        with loop("w", T.vectorized(count)) as w:
                            T.buffer_store(xp, T.float32(0), [nch * padded_width + start + w])
                with loop("w", T.vectorized(width)) as w:
                    T.buffer_store(xp, x[nch // padded_height // channels, nch // padded_height % channels,
                                         row - top, w], [nch * padded_width + left + w])


def zero_border(n_images, channels, height, width, top_left, interior, lanes=None):
    """Emitter ``zero(y)`` zeroing the border around the ``interior`` of the next conv's input: NCHW[lanes]c
    (``channels`` counts blocks) when ``lanes`` is given, else NCHW. Call it inside a PrimFunc being built
    (:mod:`.tir_builder`)."""
    top, left = top_left
    rows, cols = interior
    blocked = lanes is not None

    def zero(y):
        with loop("nc", T.parallel(n_images * channels)) as nc:
            with loop("h", T.serial(height)) as h:
                with loop("w", T.serial(width)) as w:
                    with T.If(tvm.tirx.any(h < top, h >= top + rows, w < left, w >= left + cols)):
                        with T.Then():
                            if blocked:
                                with loop("v", T.vectorized(lanes)) as v:
                                    T.buffer_store(y, T.float32(0), [nc // channels, nc % channels, h, w, v])
                            else:
                                T.buffer_store(y, T.float32(0), [nc // channels, nc % channels, h, w])

    return zero


def activate(activation, value, slope=None):
    """``value`` (a TIR expression) through ``activation``, one of :data:`ACTIVATIONS` (``slope``: PReLU's, for
    the value's channel)."""
    zero, one, six = T.float32(0), T.float32(1), T.float32(6)
    if activation == "prelu":
        return T.max(value, zero) + slope * T.min(value, zero)
    if activation == "relu6":
        return T.min(T.max(value, zero), six)
    if activation == "relu":
        return T.max(value, zero)
    if activation == "hardswish":
        return value * T.min(T.max(value + T.float32(3), zero), six) * T.float32(1 / 6)
    if activation == "hardsigmoid":
        return T.min(T.max(value * T.float32(1 / 6) + T.float32(0.5), zero), one)
    if activation == "sigmoid":
        return one / (one + vector_exp(-value))
    if activation == "silu":
        return value / (one + vector_exp(-value))
    return value


def vector_exp(x):
    """``exp(x)`` in float32 arithmetic LLVM vectorizes (its ``llvm.exp`` calls libm once per lane): ``2^n * p(r)``
    with ``x = n ln2 + r``, ``|r| <= ln2 / 2``, ``p`` the degree-6 Taylor polynomial (relative error < 2e-7), the
    exponent built in the float's bits; inputs clamped to the finite range."""
    x = T.max(T.min(x, T.float32(88.0)), T.float32(-87.0))
    n = T.floor(x * T.float32(1.4426950408889634) + T.float32(0.5))
    r = x - n * T.float32(0.693359375) + n * T.float32(2.12194440e-4)  # ln2 in two parts: r stays exact
    p = T.float32(1 / 720)
    for c in (1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0):
        p = p * r + T.float32(c)
    scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return p * scale


QUARTER = 4  # lanes per copy of the bias in the bias_copies layout (a NEON q register)

ACTIVATION_ALIGN = 64  # fp32 elements (256 bytes): every array in the shared buffer starts vector-aligned


def activation_buffer_offsets(geom: KernelGeometry) -> dict:
    """Where input ``"x"``, ``"residual"`` and output ``"y"`` sit in the one-buffer variant (fp32 elements), and
    the buffer's ``"size"``."""
    offsets, end = {}, 0
    shapes = {"x": geom.input_shape, "residual": geom.residual_shape, "y": geom.output_shape}
    for key, shape in shapes.items():
        if shape is None:
            continue
        offsets[key] = end
        size = shape_size(shape)
        end += -(-size // ACTIVATION_ALIGN) * ACTIVATION_ALIGN
    offsets["size"] = end
    return offsets


def shape_size(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def sparse_conv2d_template(geom: KernelGeometry, sched: SparseConvSchedule, *, has_bias: bool,
                           activation=None, name: str = "alcs_sparse_conv2d", one_activation_buffer: bool = False,
                           prefetch_next_block: bool = False, bias_copies: int = 0, tile_tasks: bool = False):
    """Return the PrimFunc ``(x, indptr, offsets, vstart, values, bias, block_order, [residual,] y)`` for one
    conv layer (``residual`` when ``geom.residual`` is set: added to the accumulators before the activation).

    ``one_activation_buffer``: the PrimFunc is ``(io, indptr, offsets, vstart, values, bias, block_order)``
    instead, with input, residual and output side by side in ``io`` (at :func:`activation_buffer_offsets`).
    The profiler times this variant with TVM's stock ``cache_flush_cpu_non_first_arg`` so that only the weights
    are flushed: inside a model the activations are still cached, the weights are not.

    ``indptr[ob * max_run + k] : indptr[ob * max_run + k + 1]`` are the runs of length ``max_run - k`` of block
    ``ob``; run ``q`` starts at input offset ``offsets[q]`` and weight vector ``vstart[q]``.

    ``block_order`` is the order in which parallel tasks visit the output blocks: TVM splits a parallel loop into
    equal contiguous chunks per thread, so blocks are ordered to give every chunk a similar number of kept
    positions (see :func:`alcs_tvm.kernels.balanced_block_order`).

    ``has_bias=False`` initialises the accumulators with zeros and never reads ``bias`` (pass any array).

    ``prefetch_next_block``: in block order, the first column tile of a block's second row tile prefetches the
    next block's weights (a line per 16 lanes per kept position) into L2. Inside a model a layer's weights come
    from memory; without it each block's first row tile waits for them while the later ones only compute.

    ``bias_copies``: ``bias`` holds, per output block, that many copies of the block's bias, one per accumulator of
    the register tile, each 4-lane quarter followed by 4 unread lanes
    (:func:`alcs_tvm.kernels.bias_per_accumulator`), and each accumulator starts from its own copy: a
    load per accumulator instead of one load and a register copy per accumulator (0: one bias per block).

    ``tile_tasks``: one parallel task per register tile (image, block, row tile, column tile) instead of per row
    tile, for a row of whole tiles: without the column-tile loop LLVM has no loop to hoist a tile's set-up out of
    (the accumulators' bias, whose hoisted copies it would spill)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    V = sched.vector_width
    if geom.vector_width and geom.vector_width != V:
        raise ValueError(f"geometry is for V={geom.vector_width}, schedule for V={V}")
    B = geom.out_block or V  # blocked output / residual: NCHW[B]c, each group of V channels is K blocks
    if V % B:
        raise ValueError(f"the blocked layout's block ({B}) must divide V ({V})")
    K = V // B
    N, NB, Cout = geom.batch, geom.num_blocks, geom.out_channels
    LB = -(-Cout // B)  # blocks of the blocked output / residual: a partial last group leaves its empty blocks out
    Ho, Wo = geom.out_height, geom.out_width
    TR, TW = min(sched.tile_rows, Ho), min(sched.tile_cols, Wo)
    RT_FULL, TR_REM = divmod(Ho, TR)
    RT = RT_FULL + (1 if TR_REM else 0)
    CT_FULL, TW_REM = divmod(Wo, TW)
    HAS_ROW_REM, HAS_COL_REM = TR_REM > 0, TW_REM > 0
    ROW_STEP, COL_STEP = geom.row_step, geom.col_step
    BATCH_STRIDE = geom.batch_stride
    NNZ = max(1, geom.nnz)
    NRUNS = max(1, geom.nruns)
    RMAX = geom.max_run
    if not 1 <= RMAX <= 4:
        raise ValueError(f"run length must be in 1..4, got {RMAX}")
    OT, OL, OB, OR = geom.out_pad
    HOP, WOP = Ho + OT + OB, Wo + OL + OR
    BLOCKED = bool(geom.out_blocked)
    PARTIAL = Cout % V != 0
    HAS_BIAS = bool(has_bias)
    ROW_OUTER = bool(sched.row_outer)
    OUT_BORDER = bool(any(geom.out_pad))
    INTERNAL_PAD = bool(any(geom.input_pad))
    PADDED_SIZE = shape_size(geom.padded_shape)
    y_shape = (N, LB, HOP, WOP, B) if BLOCKED else (N, Cout, HOP, WOP)
    if geom.residual not in (None, "nchw", "blocked"):
        raise ValueError(f"residual layout must be None, 'nchw' or 'blocked', got {geom.residual!r}")
    HAS_RES = geom.residual is not None
    RES_BLOCKED = geom.residual == "blocked"
    RPT, RPL = geom.residual_pad[0], geom.residual_pad[1]
    res_shape = (geom.residual_shape[0], LB) + geom.residual_shape[2:4] + (B,) if RES_BLOCKED \
        else geom.residual_shape
    x_shape = tuple(geom.input_shape)
    PRELU = activation == "prelu"
    bias_len = NB * V * (2 if PRELU else 1)  # PReLU's slopes follow the bias
    BIAS_COPIES = int(bias_copies)
    if BIAS_COPIES:
        if not has_bias or PRELU or V % QUARTER or BIAS_COPIES < TR * TW:
            raise ValueError(f"bias_copies={BIAS_COPIES} needs a bias, no PReLU, V a multiple of {QUARTER} and a copy "
                             f"per accumulator of the {TR}x{TW} tile")
        bias_len = NB * BIAS_COPIES * V * 2

    def slope(bias, channel):
        return bias[NB * V + channel] if PRELU else None
    if one_activation_buffer:
        io_at = activation_buffer_offsets(geom)
        IO_SIZE, X_AT, Y_AT = io_at["size"], io_at["x"], io_at["y"]
        RES_AT, RES_SHAPE = io_at.get("residual", 0), res_shape if HAS_RES else (1,)

    TILE_TASKS = bool(tile_tasks)
    if TILE_TASKS and (ROW_OUTER or HAS_ROW_REM or HAS_COL_REM or prefetch_next_block):
        raise ValueError("tile_tasks needs block-outer order, whole tiles and no prefetch")

    def segment(xf, indptr, offsets, vstart, values, acc, base, ob, k, run, tr, tw, next_rows=None):
        with loop("q", T.serial(indptr[ob * RMAX + k], indptr[ob * RMAX + k + 1])) as q:
            if TILE_TASKS:  # in 64 bits, so that LLVM keeps the tile's input address outside the loop
                at = T.Cast("int64", base) + T.Cast("int64", offsets[q])
            else:
                at = base + offsets[q]
            vb = vstart[q]
            if next_rows is not None:
                prefetch_row(values, next_rows + vb)
            with loop("r", T.unroll(tr)) as r:
                with loop("c", T.unroll(tw)) as c:
                    # equal input addresses across (c, l) are loaded once (LLVM GVN)
                    with loop("l", T.unroll(run)) as l:
                        with loop("v", T.vectorized(V)) as v:
                            i = (r * tw + c) * V + v
                            step = r * ROW_STEP + (c + l) * COL_STEP
                            T.buffer_store(acc, acc[i] + values[vb + l, v] * xf[
                                at + (T.Cast("int64", step) if TILE_TASKS else step)], [i])

    def prefetch_row(values, row):
        for lane in range(0, V, 16):  # one 64-byte line per 16 lanes
            address = tvm.tirx.call_intrin("handle", "tirx.address_of", values[row, lane])
            T.evaluate(tvm.tirx.call_intrin("void", "tirx.prefetch", address, 0, 2, 1))

    def block_exists(block):
        """What is emitted inside runs only for ``block < LB``: a run-time test when the last group leaves blocks
        of the blocked layout empty."""
        return only_if(block < LB, NB * K > LB)

    def channel_exists(channel):
        """What is emitted inside runs only for ``channel < Cout``: a run-time test when the last block is partial."""
        return only_if(channel < Cout, PARTIAL)

    def tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, row0, col0, tr, tw, prefetch=None):
        acc = named("acc", T.decl_buffer((tr * tw * V,), "float32", scope="global"))
        if BIAS_COPIES:  # accumulator i's own copy of the bias: its quarters 8 lanes apart
            with loop("i", T.unroll(tr * tw)) as i:
                with loop("h", T.unroll(V // QUARTER)) as h:
                    with loop("v", T.vectorized(QUARTER)) as v:
                        T.buffer_store(acc, bias[((ob * BIAS_COPIES + i) * (V // QUARTER) + h) * 2 * QUARTER + v],
                                       [i * V + h * QUARTER + v])
        else:
            with loop("i", T.unroll(tr * tw)) as i:
                with loop("v", T.vectorized(V)) as v:
                    T.buffer_store(acc, bias[ob * V + v] if HAS_BIAS else T.float32(0), [i * V + v])
        base = n * BATCH_STRIDE + row0 * ROW_STEP + col0 * COL_STEP

        def segments(next_rows=None):
            for run in range(RMAX, 0, -1):  # one segment per run length, longest first
                segment(xf, indptr, offsets, vstart, values, acc, base, ob, RMAX - run, run, tr, tw, next_rows)
        if prefetch is None:
            segments()
        else:
            when, next_rows = prefetch
            with T.If(when):
                with T.Then():
                    segments(next_rows)
                with T.Else():
                    segments()
        res_in_store = HAS_RES and not RES_BLOCKED and not BLOCKED  # NCHW shortcut into an NCHW output
        if HAS_RES and not res_in_store:
            with loop("r", T.unroll(tr)) as r:
                with loop("c", T.unroll(tw)) as c:
                    if RES_BLOCKED:
                        with loop("kb", T.unroll(K)) as kb, block_exists(ob * K + kb):
                            with loop("v", T.vectorized(B)) as v:
                                i = (r * tw + c) * V + kb * B + v
                                T.buffer_store(acc, acc[i] + res[n, ob * K + kb, RPT + row0 + r, RPL + col0 + c, v],
                                               [i])
                    else:
                        with loop("v", T.serial(V)) as v, channel_exists(ob * V + v):
                            i = (r * tw + c) * V + v
                            T.buffer_store(acc, acc[i] + res[n, ob * V + v, row0 + r, col0 + c], [i])
        if BLOCKED:
            with loop("r", T.unroll(tr)) as r:
                with loop("c", T.unroll(tw)) as c:
                    with loop("kb", T.unroll(K)) as kb, block_exists(ob * K + kb):
                        with loop("v", T.vectorized(B)) as v:
                            T.buffer_store(y, activate(activation, acc[(r * tw + c) * V + kb * B + v],
                                                       slope(bias, ob * V + kb * B + v)),
                                           [n, ob * K + kb, OT + row0 + r, OL + col0 + c, v])
        else:  # NCHW: per channel, a row of the tile is one vector store (and one vector load of the shortcut)
            with loop("v", T.serial(V)) as v, channel_exists(ob * V + v):
                with loop("r", T.unroll(tr)) as r:
                    with loop("c", T.vectorized(tw)) as c:
                        value = acc[(r * tw + c) * V + v]
                        if res_in_store:
                            value = value + res[n, ob * V + v, row0 + r, col0 + c]
                        T.buffer_store(y, activate(activation, value, slope(bias, ob * V + v)),
                                       [n, ob * V + v, OT + row0 + r, OL + col0 + c])

    def row_tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, row0, tr, prefetch=None):
        with loop("ct", T.serial(CT_FULL)) as ct:
            when = None if prefetch is None else (tvm.tirx.all(prefetch[0], ct == 0), prefetch[1])
            tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, row0, ct * TW, tr, TW, when)
        if HAS_COL_REM:
            tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, row0, CT_FULL * TW, tr, TW_REM)

    def conv_per_tile(xf, indptr, offsets, vstart, values, bias, order, res, y):
        with loop("task", T.parallel(N * NB * RT * CT_FULL)) as task:
            n = task // (NB * RT * CT_FULL)
            ob = order[task // (RT * CT_FULL) % NB]
            rt = task // CT_FULL % RT
            ct = task % CT_FULL
            tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, rt * TR, ct * TW, TR, TW)

    def conv(xf, indptr, offsets, vstart, values, bias, order, res, y):
        if TILE_TASKS:
            conv_per_tile(xf, indptr, offsets, vstart, values, bias, order, res, y)
            return
        with loop("task", T.parallel(N * NB * RT)) as task:
            n = task // (NB * RT)
            if ROW_OUTER:
                rt = task // NB % RT
                ob = order[task % NB]
            else:
                ob = order[task // RT % NB]
                rt = task % RT
            prefetch = None
            if prefetch_next_block and not ROW_OUTER and RT > 1 and NB > 1:
                # the second row tile of a block walks the next block's weights into L2 beside its own
                following = order[(task // RT + 1) % NB]
                first_run = T.min(indptr[following * RMAX], NRUNS - 1)
                prefetch = (rt == 1, vstart[first_run] - vstart[T.min(indptr[ob * RMAX], NRUNS - 1)])
            if HAS_ROW_REM:
                with T.If(rt < RT_FULL):
                    with T.Then():
                        row_tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, rt * TR, TR, prefetch)
                    with T.Else():
                        row_tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, RT_FULL * TR, TR_REM,
                                 prefetch)
            else:
                row_tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, rt * TR, TR, prefetch)

    zero_output_border = zero_border(N, LB if BLOCKED else Cout, HOP, WOP, (OT, OL), (Ho, Wo),
                                     B if BLOCKED else None)

    def body(x, indptr, offsets, vstart, values, bias, order, res, y):
        if OUT_BORDER:
            zero_output_border(y)
        if INTERNAL_PAD:
            xp = named("xp", T.alloc_buffer((PADDED_SIZE,), "float32"))
            pad_nchw(x, xp, geom.input_shape, geom.input_pad)
            conv(xp, indptr, offsets, vstart, values, bias, order, res, y)
        else:
            xf = named("xf", T.decl_buffer((PADDED_SIZE,), "float32", data=x.data, elem_offset=x.elem_offset))
            conv(xf, indptr, offsets, vstart, values, bias, order, res, y)

    # the parameter list: (io, ...) holding input, residual and output side by side, or (x, ..., [res,] y)
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tirx.noalias": True})
            if one_activation_buffer:
                io = T.arg("io", T.buffer((IO_SIZE,), "float32"))
            else:
                x = T.arg("x", T.buffer(x_shape, "float32"))
            indptr = T.arg("indptr", T.buffer((NB * RMAX + 1,), "int32"))
            offsets = T.arg("offsets", T.buffer((NRUNS,), "int32"))
            vstart = T.arg("vstart", T.buffer((NRUNS,), "int32"))
            values = T.arg("values", T.buffer((NNZ, V), "float32"))
            bias = T.arg("bias", T.buffer((bias_len,), "float32"))
            order = T.arg("order", T.buffer((NB,), "int32"))
            if one_activation_buffer:
                x = named("x", T.decl_buffer(x_shape, "float32", data=io.data, elem_offset=X_AT))
                res = named("res", T.decl_buffer(RES_SHAPE, "float32", data=io.data, elem_offset=RES_AT))
                y = named("y", T.decl_buffer(y_shape, "float32", data=io.data, elem_offset=Y_AT))
            else:
                res = T.arg("res", T.buffer(res_shape, "float32")) if HAS_RES else None
                y = T.arg("y", T.buffer(y_shape, "float32"))
            body(x, indptr, offsets, vstart, values, bias, order, res, y)
    return builder.get()
