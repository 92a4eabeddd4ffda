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

The input must already be padded; the op-level wrapper (:mod:`alcs_tvm.operator`) either pads into a workspace
first or receives input that the previous layer wrote with a zero border.
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

# In tirx TVMScript a plain ``x = expr`` declares a mutable scalar, which the CPU backend turns into a heap
# workspace allocated per loop iteration; ``T.meta_var`` substitutes the expression instead.

from . import SparseConvSchedule

__all__ = ["KernelGeometry", "sparse_conv2d_template", "activation_buffer_offsets", "ACTIVATIONS"]

ACTIVATIONS = (None, "relu", "relu6")


@dataclass(frozen=True)
class KernelGeometry:
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
        """Blocks of ``layout_block`` channels in a blocked output / residual."""
        if self.vector_width and self.layout_block:
            return self.num_blocks * self.vector_width // self.layout_block
        return self.num_blocks

    @property
    def batch_stride(self) -> int:
        return _prod(self.padded_shape[1:])

    @property
    def residual_shape(self) -> tuple | None:
        if self.residual is None:
            return None
        if self.residual == "nchw":
            return self.batch, self.out_channels, self.out_height, self.out_width
        top, left, bottom, right = self.residual_pad
        return (self.batch, self.layout_blocks, self.out_height + top + bottom, self.out_width + left + right,
                self.layout_block)

    @property
    def output_shape(self) -> tuple:
        top, left, bottom, right = self.out_pad
        h, w = self.out_height + top + bottom, self.out_width + left + right
        return ((self.batch, self.layout_blocks, h, w, self.layout_block) if self.out_blocked
                else (self.batch, self.out_channels, h, w))


def zero_border(n_images, channels, height, width, top_left, interior, lanes=None):
    """Macro zeroing the border around the ``interior`` of the next conv's input: NCHW[lanes]c (``channels``
    counts blocks) when ``lanes`` is given, else NCHW."""
    top, left = top_left
    rows, cols = interior
    blocked = lanes is not None

    @T.macro
    def zero(y):
        for nc in T.parallel(n_images * channels):
            for h in range(height):
                for w in range(width):
                    if h < top or h >= top + rows or w < left or w >= left + cols:
                        if blocked:
                            for v in T.vectorized(lanes):
                                y[nc // channels, nc % channels, h, w, v] = T.float32(0)
                        else:
                            y[nc // channels, nc % channels, h, w] = T.float32(0)

    return zero


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
        size = _prod(shape)
        end += -(-size // ACTIVATION_ALIGN) * ACTIVATION_ALIGN
    offsets["size"] = end
    return offsets


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def sparse_conv2d_template(geom: KernelGeometry, sched: SparseConvSchedule, *, has_bias: bool,
                           activation=None, name: str = "alcs_sparse_conv2d", one_activation_buffer: bool = False):
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
    positions (see :func:`alcs_tvm.operator.balanced_block_order`).

    ``has_bias=False`` initialises the accumulators with zeros and never reads ``bias`` (pass any array)."""
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
    Ho, Wo = geom.out_height, geom.out_width
    TR, TW = min(sched.tile_rows, Ho), min(sched.tile_cols, Wo)
    RT_FULL, TR_REM = divmod(Ho, TR)
    RT = RT_FULL + (1 if TR_REM else 0)
    CT_FULL, TW_REM = divmod(Wo, TW)
    HAS_ROW_REM, HAS_COL_REM = TR_REM > 0, TW_REM > 0  # TVMScript's static `if` needs real bools
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
    RELU = activation in ("relu", "relu6")
    RELU6 = activation == "relu6"
    OUT_BORDER = bool(any(geom.out_pad))
    PT, PL, PB, PR = geom.input_pad
    INTERNAL_PAD = bool(any(geom.input_pad))
    PADDED_SIZE = _prod(geom.padded_shape)
    if INTERNAL_PAD:
        _, C, H, W = geom.input_shape
        HP, WP = H + PT + PB, W + PL + PR
    else:
        C = H = W = HP = WP = 1  # unused
    y_shape = (N, NB * K, HOP, WOP, B) if BLOCKED else (N, Cout, HOP, WOP)
    if geom.residual not in (None, "nchw", "blocked"):
        raise ValueError(f"residual layout must be None, 'nchw' or 'blocked', got {geom.residual!r}")
    HAS_RES = geom.residual is not None
    RES_BLOCKED = geom.residual == "blocked"
    RPT, RPL = geom.residual_pad[0], geom.residual_pad[1]
    res_shape = (geom.residual_shape[0], NB * K) + geom.residual_shape[2:4] + (B,) if RES_BLOCKED \
        else geom.residual_shape
    x_shape = tuple(geom.input_shape)
    bias_len = NB * V

    @T.macro
    def segment(xf, indptr, offsets, vstart, values, acc, base, ob, k, run, tr, tw):
        for q in range(indptr[ob * RMAX + k], indptr[ob * RMAX + k + 1]):
            at = T.meta_var(base + offsets[q])
            vb = T.meta_var(vstart[q])
            for r in T.unroll(tr):
                for c in T.unroll(tw):
                    for l in T.unroll(run):  # equal input addresses across (c, l) are loaded once (LLVM GVN)
                        for v in T.vectorized(V):
                            acc[(r * tw + c) * V + v] = acc[(r * tw + c) * V + v] + values[vb + l, v] * xf[
                                at + r * ROW_STEP + (c + l) * COL_STEP]

    @T.macro
    def tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, row0, col0, tr, tw):
        acc = T.decl_buffer((tr * tw * V,), "float32", scope="global")
        for i in T.unroll(tr * tw):
            for v in T.vectorized(V):
                if HAS_BIAS:
                    acc[i * V + v] = bias[ob * V + v]
                else:
                    acc[i * V + v] = T.float32(0)
        base = T.meta_var(n * BATCH_STRIDE + row0 * ROW_STEP + col0 * COL_STEP)
        if RMAX >= 4:
            segment(xf, indptr, offsets, vstart, values, acc, base, ob, RMAX - 4, 4, tr, tw)
        if RMAX >= 3:
            segment(xf, indptr, offsets, vstart, values, acc, base, ob, RMAX - 3, 3, tr, tw)
        if RMAX >= 2:
            segment(xf, indptr, offsets, vstart, values, acc, base, ob, RMAX - 2, 2, tr, tw)
        segment(xf, indptr, offsets, vstart, values, acc, base, ob, RMAX - 1, 1, tr, tw)
        if HAS_RES:
            for r in T.unroll(tr):
                for c in T.unroll(tw):
                    if RES_BLOCKED:
                        for kb in T.unroll(K):
                            for v in T.vectorized(B):
                                acc[(r * tw + c) * V + kb * B + v] = acc[(r * tw + c) * V + kb * B + v] + res[
                                    n, ob * K + kb, RPT + row0 + r, RPL + col0 + c, v]
                    else:
                        for v in range(V):
                            if not PARTIAL or ob * V + v < Cout:
                                acc[(r * tw + c) * V + v] = acc[(r * tw + c) * V + v] + res[
                                    n, ob * V + v, row0 + r, col0 + c]
        for r in T.unroll(tr):
            for c in T.unroll(tw):
                if BLOCKED:
                    for kb in T.unroll(K):
                        for v in T.vectorized(B):
                            if RELU6:
                                y[n, ob * K + kb, OT + row0 + r, OL + col0 + c, v] = T.min(
                                    T.max(acc[(r * tw + c) * V + kb * B + v], T.float32(0)), T.float32(6))
                            elif RELU:
                                y[n, ob * K + kb, OT + row0 + r, OL + col0 + c, v] = T.max(
                                    acc[(r * tw + c) * V + kb * B + v], T.float32(0))
                            else:
                                y[n, ob * K + kb, OT + row0 + r, OL + col0 + c, v] = acc[
                                    (r * tw + c) * V + kb * B + v]
                else:
                    for v in range(V):
                        if not PARTIAL or ob * V + v < Cout:
                            if RELU6:
                                y[n, ob * V + v, OT + row0 + r, OL + col0 + c] = T.min(
                                    T.max(acc[(r * tw + c) * V + v], T.float32(0)), T.float32(6))
                            elif RELU:
                                y[n, ob * V + v, OT + row0 + r, OL + col0 + c] = T.max(
                                    acc[(r * tw + c) * V + v], T.float32(0))
                            else:
                                y[n, ob * V + v, OT + row0 + r, OL + col0 + c] = acc[(r * tw + c) * V + v]

    @T.macro
    def row_tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, row0, tr):
        for ct in range(CT_FULL):
            tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, row0, ct * TW, tr, TW)
        if HAS_COL_REM:
            tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, row0, CT_FULL * TW, tr, TW_REM)

    @T.macro
    def conv(xf, indptr, offsets, vstart, values, bias, order, res, y):
        for task in T.parallel(N * NB * RT):
            n = T.meta_var(task // (NB * RT))
            if ROW_OUTER:
                rt = T.meta_var(task // NB % RT)
                ob = T.meta_var(order[task % NB])
            else:
                ob = T.meta_var(order[task // RT % NB])
                rt = T.meta_var(task % RT)
            if HAS_ROW_REM:
                if rt < RT_FULL:
                    row_tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, rt * TR, TR)
                else:
                    row_tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, RT_FULL * TR, TR_REM)
            else:
                row_tile(xf, indptr, offsets, vstart, values, bias, res, y, n, ob, rt * TR, TR)

    zero_output_border = zero_border(N, NB * K if BLOCKED else Cout, HOP, WOP, (OT, OL), (Ho, Wo),
                                     B if BLOCKED else None)

    @T.macro
    def body(x, indptr, offsets, vstart, values, bias, order, res, y):
        if OUT_BORDER:
            zero_output_border(y)
        if INTERNAL_PAD:
            xp = T.alloc_buffer((PADDED_SIZE,), "float32")
            for nch in T.parallel(N * C * HP):
                if nch % HP < PT or nch % HP >= PT + H:
                    for w in T.vectorized(WP):
                        xp[nch * WP + w] = T.float32(0)
                else:
                    if PL > 0:  # a loop of extent 0 cannot be vectorized: pads like [1, 0, 1, 0] have none
                        for w in T.vectorized(PL):
                            xp[nch * WP + w] = T.float32(0)
                    for w in T.vectorized(W):
                        xp[nch * WP + PL + w] = x[nch // HP // C, nch // HP % C, nch % HP - PT, w]
                    if PR > 0:
                        for w in T.vectorized(PR):
                            xp[nch * WP + PL + W + w] = T.float32(0)
            conv(xp, indptr, offsets, vstart, values, bias, order, res, y)
        else:
            xf = T.decl_buffer((PADDED_SIZE,), "float32", data=x.data, elem_offset=x.elem_offset)
            conv(xf, indptr, offsets, vstart, values, bias, order, res, y)

    # a PrimFunc's parameter list is fixed when it is parsed: one signature with the shortcut, one without
    if one_activation_buffer:
        io_at = activation_buffer_offsets(geom)
        IO_SIZE, X_AT, Y_AT = io_at["size"], io_at["x"], io_at["y"]
        RES_AT, RES_SHAPE = io_at.get("residual", 0), res_shape if HAS_RES else (1,)

        @T.prim_func
        def func(io: T.Buffer((IO_SIZE,), "float32"), indptr: T.Buffer((NB * RMAX + 1,), "int32"),
                 offsets: T.Buffer((NRUNS,), "int32"), vstart: T.Buffer((NRUNS,), "int32"),
                 values: T.Buffer((NNZ, V), "float32"),
                 bias: T.Buffer((bias_len,), "float32"), order: T.Buffer((NB,), "int32")):
            T.func_attr({"tirx.noalias": True})
            x = T.decl_buffer(x_shape, "float32", data=io.data, elem_offset=X_AT)
            res = T.decl_buffer(RES_SHAPE, "float32", data=io.data, elem_offset=RES_AT)
            y = T.decl_buffer(y_shape, "float32", data=io.data, elem_offset=Y_AT)
            body(x, indptr, offsets, vstart, values, bias, order, res, y)
    elif HAS_RES:
        @T.prim_func
        def func(x: T.Buffer(x_shape, "float32"), indptr: T.Buffer((NB * RMAX + 1,), "int32"),
                 offsets: T.Buffer((NRUNS,), "int32"), vstart: T.Buffer((NRUNS,), "int32"),
                 values: T.Buffer((NNZ, V), "float32"),
                 bias: T.Buffer((bias_len,), "float32"), order: T.Buffer((NB,), "int32"),
                 res: T.Buffer(res_shape, "float32"), y: T.Buffer(y_shape, "float32")):
            T.func_attr({"tirx.noalias": True})
            body(x, indptr, offsets, vstart, values, bias, order, res, y)
    else:
        @T.prim_func
        def func(x: T.Buffer(x_shape, "float32"), indptr: T.Buffer((NB * RMAX + 1,), "int32"),
                 offsets: T.Buffer((NRUNS,), "int32"), vstart: T.Buffer((NRUNS,), "int32"),
                 values: T.Buffer((NNZ, V), "float32"),
                 bias: T.Buffer((bias_len,), "float32"), order: T.Buffer((NB,), "int32"),
                 y: T.Buffer(y_shape, "float32")):
            T.func_attr({"tirx.noalias": True})
            body(x, indptr, offsets, vstart, values, bias, order, None, y)

    return func.with_attr("global_symbol", name)
