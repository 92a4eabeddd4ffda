"""Depthwise conv in the channel-blocked layout the sparse kernels chain through (loop-level TIR template).

Between two rewritten 1x1 convs (MobileNetV2's expand -> depthwise -> project) the activations stay NCHW[V]c with
zero borders; this kernel reads and writes that layout directly, so the chain needs no layout transform and no
pad copy. In NCHW[V]c, V channels of one pixel are one vector: every tap is a vector load times a vector of
per-channel weights, any stride or dilation, no broadcasts, no shuffles::

    parallel  task over (image, channel block, output row)
      serial  column tile
        acc[cols, V] = bias
        unrolled taps (kh, kw), unrolled cols, vectorised V:
          acc[c, :] += w[cb, kh, kw, :] * x[n, cb, row*sh + kh*dh, (col0 + c)*sw + kw*dw, :]
        store activation(acc) into the (optionally bordered) output

Built with TVM's IRBuilder from plain Python functions like :mod:`.sparse_conv2d_cpu` (see :mod:`.tir_builder`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..layer import ACTIVATIONS
from .sparse_conv2d_cpu import activate, zero_border
from .tir_builder import IRBuilder, T, loop, named

__all__ = ["DepthwiseGeometry", "depthwise_nchwc_template"]


@dataclass(frozen=True)
class DepthwiseGeometry:
    batch: int
    channel_blocks: int
    vector_width: int
    padded_height: int  # the input buffer already carries the conv's zero padding
    padded_width: int
    kernel: tuple
    stride: tuple
    dilation: tuple
    out_height: int
    out_width: int
    out_pad: tuple = (0, 0, 0, 0)  # zero border written around the output for the next conv
    tile_cols: int = 8


def depthwise_nchwc_template(geom: DepthwiseGeometry, *, activation=None, name="alcs_depthwise_nchwc"):
    """PrimFunc ``(x[N, CB, Hp, Wp, V], weight[CB, Kh, Kw, V], bias[CB*V], y[N, CB, Ho', Wo', V])``."""
    if activation not in ACTIVATIONS or activation == "prelu":  # no per-channel slopes here
        raise ValueError(f"activation must be one of {[a for a in ACTIVATIONS if a != 'prelu']}, got "
                         f"{activation!r}")
    N, CB, V = geom.batch, geom.channel_blocks, geom.vector_width
    HP, WP = geom.padded_height, geom.padded_width
    KH, KW = geom.kernel
    SH, SW = geom.stride
    DH, DW = geom.dilation
    Ho, Wo = geom.out_height, geom.out_width
    OT, OL, OB, OR = geom.out_pad
    HOP, WOP = Ho + OT + OB, Wo + OL + OR
    TW = min(geom.tile_cols, Wo)
    CT_FULL, TW_REM = divmod(Wo, TW)
    HAS_COL_REM = TW_REM > 0
    OUT_BORDER = bool(any(geom.out_pad))

    zero_output_border = zero_border(N, CB, HOP, WOP, (OT, OL), (Ho, Wo), V)

    def tile(x, w, bias, y, n, cb, row, col0, tw):
        acc = named("acc", T.decl_buffer((tw * V,), "float32", scope="global"))
        with loop("c", T.unroll(tw)) as c:
            with loop("v", T.vectorized(V)) as v:
                T.buffer_store(acc, bias[cb * V + v], [c * V + v])
        with loop("kh", T.unroll(KH)) as kh:
            with loop("kw", T.unroll(KW)) as kw:
                with loop("c", T.unroll(tw)) as c:
                    with loop("v", T.vectorized(V)) as v:
                        T.buffer_store(acc, acc[c * V + v] + w[cb, kh, kw, v] * x[
                            n, cb, row * SH + kh * DH, (col0 + c) * SW + kw * DW, v], [c * V + v])
        with loop("c", T.unroll(tw)) as c:
            with loop("v", T.vectorized(V)) as v:
                T.buffer_store(y, activate(activation, acc[c * V + v]), [n, cb, OT + row, OL + col0 + c, v])

    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tirx.noalias": True})
            x = T.arg("x", T.buffer((N, CB, HP, WP, V), "float32"))
            w = T.arg("w", T.buffer((CB, KH, KW, V), "float32"))
            bias = T.arg("bias", T.buffer((CB * V,), "float32"))
            y = T.arg("y", T.buffer((N, CB, HOP, WOP, V), "float32"))
            if OUT_BORDER:
                zero_output_border(y)
            with loop("task", T.parallel(N * CB * Ho)) as task:
                n, cb, row = task // (CB * Ho), task // Ho % CB, task % Ho
                with loop("ct", T.serial(CT_FULL)) as ct:
                    tile(x, w, bias, y, n, cb, row, ct * TW, TW)
                if HAS_COL_REM:
                    tile(x, w, bias, y, n, cb, row, CT_FULL * TW, TW_REM)
    return builder.get()
