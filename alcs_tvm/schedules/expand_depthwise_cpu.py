"""A sparse conv (a 1x1 expand conv, or a strided one) and the depthwise conv after it in one loop-level TIR
template.

MobileNet-style blocks widen the channels with a 1x1 conv and filter the wide tensor with a depthwise conv. Run
as two kernels, the wide tensor is written whole by the first and read back by the second; at the early layers it
is larger than a core's L2, so it makes a round trip through the outer caches or memory. Here each task owns one
V-wide channel group of the wide tensor and a strip of output rows, and keeps only the ``KH`` rows of that group
the depthwise conv's window needs, in a ring of rows small enough for L1::

    parallel  task over (image n, expand group ob, output row strip)
      zero the ring's border columns (the depthwise conv's left/right padding)
      expand the strip's first KH - SH padded rows into the ring
      serial  output row r of the strip
        expand the SH padded rows r*SH + KH - SH .. r*SH + KH - 1 into ring slot (row % KH):
          a padding row: zeros; else per column tile
            acc[cols, V] = expand bias
            for kept positions q of group ob:                      # data-dependent CSR range, as the sparse kernel
              acc[c, :] += values[q, :] * x[base + offsets[q] + c * col_step]
            ring[slot, left + col, :] = expand activation(acc)
        serial  column tile of the output row
          acc[cols, V] = depthwise bias
          unrolled taps (kh, kw), unrolled cols, vectorised V:
            acc[c, :] += w[ob, kh, kw, :] * ring[(r*SH + kh) % KH, (col0 + c)*SW + kw, :]
          store depthwise activation(acc) as NCHW[B]c blocks (with the next conv's zero border)

The expand's arrays (``indptr``, ``offsets``, ``vstart``, ``values``, ``bias``, ``block_order``) are the sparse
kernel's (:func:`alcs_tvm.kernels.pack_sparse_conv2d`, runs of length 1): ``offsets`` hold each kept tap's
``(cin, kh, kw)``, so the first conv may be any conv whose taps share no input loads (1x1, or strided: MobileNet's
stem), and its input NCHW or NCHW[b]c with any border, or NCHW without its padding, which the kernel then pads
into a workspace first as the sparse kernel does. Strips after the first recompute the ``KH - SH`` rows their window shares with the strip above,
which is what lets several tasks work on one group.

Built with TVM's IRBuilder from plain Python functions like :mod:`.sparse_conv2d_cpu` (see :mod:`.tir_builder`).
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm

from ..layer import ACTIVATIONS
from .sparse_conv2d_cpu import activate, pad_nchw, shape_size, zero_border
from .tir_builder import IRBuilder, T, loop, named, only_if

__all__ = ["ExpandDepthwiseGeometry", "expand_depthwise_template"]


@dataclass(frozen=True)
class ExpandDepthwiseGeometry:
    """Sizes in fp32 elements. The expand conv: its input buffer ``input_shape`` (``batch_stride`` elements per
    image; with ``input_pad``, an unpadded NCHW input the kernel first pads into a workspace of that stride), ``row_step`` / ``col_step`` between vertically / horizontally adjacent pixels, ``channels`` output
    channels in ``num_blocks`` groups of ``vector_width``, ``nnz`` / ``nruns`` its packed lengths, over an
    ``height x width`` image. The depthwise conv: ``padding`` (top, left, bottom, right), ``kernel``, ``stride``,
    its ``out_height x out_width`` output written as NCHW[``out_block``]c with ``out_pad`` zero border."""

    batch: int
    input_shape: tuple
    batch_stride: int
    row_step: int
    col_step: int
    channels: int
    num_blocks: int
    vector_width: int
    nnz: int
    nruns: int
    height: int
    width: int
    padding: tuple
    kernel: tuple
    stride: tuple
    out_height: int
    out_width: int
    out_block: int
    out_pad: tuple = (0, 0, 0, 0)
    input_pad: tuple = (0, 0, 0, 0)  # the expand's padding, done here: the input comes NCHW without it
    strip_rows: int = 0  # output rows per task (0: all)
    expand_cols: int = 8  # register tile of the expand (pixels of one row)
    depthwise_cols: int = 8  # register tile of the depthwise conv

    @property
    def out_blocks(self) -> int:
        return -(-self.channels // self.out_block)

    @property
    def output_shape(self) -> tuple:
        top, left, bottom, right = self.out_pad
        return (self.batch, self.out_blocks, self.out_height + top + bottom, self.out_width + left + right,
                self.out_block)


def expand_depthwise_template(geom: ExpandDepthwiseGeometry, *, expand_activation=None, activation=None,
                              expand_slopes: bool = False, name: str = "alcs_expand_dwconv"):
    """PrimFunc ``(x, indptr, offsets, vstart, values, expand_bias, block_order, w[NB, KH, KW, V], bias[NB*V],
    y)``. ``expand_bias`` holds the expand's bias per channel of its ``NB * V`` and, with ``expand_slopes``
    (``expand_activation == "prelu"``), its PReLU slopes after it, as the sparse kernel's ``bias`` does."""
    if expand_activation not in ACTIVATIONS or activation not in ACTIVATIONS or activation == "prelu":
        raise ValueError(f"unsupported activations: expand {expand_activation!r}, depthwise {activation!r}")
    if expand_slopes != (expand_activation == "prelu"):
        raise ValueError("expand_slopes is set exactly for a PReLU expand")
    N, V, NB = geom.batch, geom.vector_width, geom.num_blocks
    B = geom.out_block
    if V % B:
        raise ValueError(f"the output block ({B}) must divide V ({V})")
    K, LB = V // B, geom.out_blocks
    H, W = geom.height, geom.width
    PT, PL, PB, PR = geom.padding
    WP = W + PL + PR
    KH, KW = geom.kernel
    SH, SW = geom.stride
    if not 1 <= SH <= KH:
        raise ValueError(f"the row stride ({SH}) must be between 1 and the kernel height ({KH})")
    Ho, Wo = geom.out_height, geom.out_width
    OT, OL, OBOT, OR = geom.out_pad
    HOP, WOP = Ho + OT + OBOT, Wo + OL + OR
    RS = min(geom.strip_rows or Ho, Ho)
    STRIPS, RS_REM = divmod(Ho, RS)
    S = STRIPS + (1 if RS_REM else 0)
    TE, TD = min(geom.expand_cols, W), min(geom.depthwise_cols, Wo)
    ROW_STEP, COL_STEP, BATCH_STRIDE = geom.row_step, geom.col_step, geom.batch_stride
    RING = KH * WP * V
    OUT_BORDER = bool(any(geom.out_pad))

    def block_exists(block):
        """What is emitted inside runs only for ``block < LB``: a partial last group leaves blocks of the output
        layout empty."""
        return only_if(block < LB, NB * K > LB)

    def slope(ebias, channel):
        return ebias[NB * V + channel] if expand_slopes else None

    def expand_tile(xf, indptr, offsets, vstart, values, ebias, ring, n, ob, h, slot, col0, tw):
        acc = named("eacc", T.decl_buffer((tw * V,), "float32", scope="global"))
        with loop("c", T.unroll(tw)) as c:
            with loop("v", T.vectorized(V)) as v:
                T.buffer_store(acc, ebias[ob * V + v], [c * V + v])
        base = n * BATCH_STRIDE + h * ROW_STEP + col0 * COL_STEP
        with loop("q", T.serial(indptr[ob], indptr[ob + 1])) as q:
            at = base + offsets[q]
            vb = vstart[q]
            with loop("c", T.unroll(tw)) as c:
                with loop("v", T.vectorized(V)) as v:
                    T.buffer_store(acc, acc[c * V + v] + values[vb, v] * xf[at + c * COL_STEP], [c * V + v])
        with loop("c", T.unroll(tw)) as c:
            with loop("v", T.vectorized(V)) as v:
                T.buffer_store(ring, activate(expand_activation, acc[c * V + v], slope(ebias, ob * V + v)),
                               [(slot * WP + PL + col0 + c) * V + v])

    def expand_row(xf, indptr, offsets, vstart, values, ebias, ring, n, ob, p):
        """Padded row ``p`` of group ``ob`` of the wide tensor into its ring slot."""
        slot = p % KH
        with T.If(tvm.tirx.any(p < PT, p >= PT + H)):
            with T.Then():
                with loop("w", T.serial(WP)) as w:
                    with loop("v", T.vectorized(V)) as v:
                        T.buffer_store(ring, T.float32(0), [(slot * WP + w) * V + v])
            with T.Else():
                full, rem = divmod(W, TE)
                with loop("ct", T.serial(full)) as ct:
                    expand_tile(xf, indptr, offsets, vstart, values, ebias, ring, n, ob, p - PT, slot, ct * TE, TE)
                if rem:
                    expand_tile(xf, indptr, offsets, vstart, values, ebias, ring, n, ob, p - PT, slot, full * TE,
                                rem)

    def depthwise_tile(ring, w, bias, y, n, ob, kb, r, col0, tw):
        """Output pixels ``col0 ..`` of row ``r`` in output block ``ob * K + kb`` (``B`` lanes: with V-wide
        vectors the accumulators and the inputs shared between neighbouring taps outgrow the register file)."""
        lane0 = kb * B
        acc = named("dacc", T.decl_buffer((tw * B,), "float32", scope="global"))
        with loop("c", T.unroll(tw)) as c:
            with loop("v", T.vectorized(B)) as v:
                T.buffer_store(acc, bias[ob * V + lane0 + v], [c * B + v])
        with loop("kh", T.unroll(KH)) as kh:
            slot = (r * SH + kh) % KH
            with loop("kw", T.unroll(KW)) as kw:
                with loop("c", T.unroll(tw)) as c:
                    with loop("v", T.vectorized(B)) as v:
                        T.buffer_store(acc, acc[c * B + v] + w[ob, kh, kw, lane0 + v] *
                                       ring[(slot * WP + (col0 + c) * SW + kw) * V + lane0 + v], [c * B + v])
        with loop("c", T.unroll(tw)) as c:
            with loop("v", T.vectorized(B)) as v:
                T.buffer_store(y, activate(activation, acc[c * B + v]), [n, ob * K + kb, OT + r, OL + col0 + c, v])

    def strip(xf, indptr, offsets, vstart, values, ebias, w, bias, y, n, ob, r0, rows):
        ring = named("ring", T.decl_buffer((RING,), "float32", scope="global"))
        if PL or PR:
            with loop("slot", T.serial(KH)) as s:
                for start, count in ((0, PL), (PL + W, PR)):
                    if count:
                        with loop("w", T.serial(count)) as c:
                            with loop("v", T.vectorized(V)) as v:
                                T.buffer_store(ring, T.float32(0), [(s * WP + start + c) * V + v])
        with loop("j", T.serial(KH - SH)) as j:
            expand_row(xf, indptr, offsets, vstart, values, ebias, ring, n, ob, r0 * SH + j)
        with loop("rr", T.serial(rows)) as rr:
            r = r0 + rr
            with loop("j", T.serial(SH)) as j:
                expand_row(xf, indptr, offsets, vstart, values, ebias, ring, n, ob, r * SH + KH - SH + j)
            full, rem = divmod(Wo, TD)
            with loop("kb", T.serial(K)) as kb, block_exists(ob * K + kb):
                with loop("ct", T.serial(full)) as ct:
                    depthwise_tile(ring, w, bias, y, n, ob, kb, r, ct * TD, TD)
                if rem:
                    depthwise_tile(ring, w, bias, y, n, ob, kb, r, full * TD, rem)

    zero_output_border = zero_border(N, LB, HOP, WOP, (OT, OL), (Ho, Wo), B)
    INTERNAL_PAD = bool(any(geom.input_pad))  # an NCHW input padded here, as the sparse kernel pads it

    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tirx.noalias": True})
            x = T.arg("x", T.buffer(tuple(geom.input_shape), "float32"))
            indptr = T.arg("indptr", T.buffer((NB + 1,), "int32"))
            offsets = T.arg("offsets", T.buffer((max(1, geom.nruns),), "int32"))
            vstart = T.arg("vstart", T.buffer((max(1, geom.nruns),), "int32"))
            values = T.arg("values", T.buffer((max(1, geom.nnz), V), "float32"))
            ebias = T.arg("expand_bias", T.buffer((NB * V * (2 if expand_slopes else 1),), "float32"))
            order = T.arg("order", T.buffer((NB,), "int32"))
            w = T.arg("w", T.buffer((NB, KH, KW, V), "float32"))
            bias = T.arg("bias", T.buffer((NB * V,), "float32"))
            y = T.arg("y", T.buffer((N, LB, HOP, WOP, B), "float32"))
            if INTERNAL_PAD:
                xf = named("xp", T.alloc_buffer((N * BATCH_STRIDE,), "float32"))
                pad_nchw(x, xf, geom.input_shape, geom.input_pad)
            else:
                xf = named("xf", T.decl_buffer((shape_size(geom.input_shape),), "float32", data=x.data, elem_offset=x.elem_offset))
            if OUT_BORDER:
                zero_output_border(y)
            with loop("task", T.parallel(N * NB * S)) as task:
                n = task // (NB * S)
                ob = order[task // S % NB]
                st = task % S
                args = (xf, indptr, offsets, vstart, values, ebias, w, bias, y, n, ob)
                if RS_REM:
                    with T.If(st < STRIPS):
                        with T.Then():
                            strip(*args, st * RS, RS)
                        with T.Else():
                            strip(*args, STRIPS * RS, RS_REM)
                else:
                    strip(*args, st * RS, RS)
    return builder.get()
