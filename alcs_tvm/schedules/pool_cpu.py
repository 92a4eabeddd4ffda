"""Max pooling in the channel-blocked layout the sparse kernels chain through (loop-level TIR template).

Between a rewritten conv (or a channel-blocked concat of them) and the rewritten convs that read the pool (ResNet's
stem -> max pool -> first block, SqueezeNet's fire -> max pool -> fire, Inception's pools between blocks) the
activations stay NCHW[V]c: the producer writes blocked (with the zero border its other readers need, which the
pool skips), this kernel reads blocked and writes blocked with the zero border its readers need, so neither side
needs a layout transform, a pad copy or a lane-scatter store. Each tap is a vector max; taps outside the input
(the pool's padding) count as -inf, as ONNX's MaxPool does::

    parallel  task over (image, channel block, output row)
      serial  output column
        vectorised V:  y[n, cb, row, col, :] = max over taps of x[n, cb, row*sh - pt + kh*dh, col*sw - pl + kw*dw, :]
"""
from __future__ import annotations

from dataclasses import dataclass

import tvm

from .sparse_conv2d_cpu import bordered_shape, zero_border
from .tir_builder import IRBuilder, T, loop, root_block

__all__ = ["PoolGeometry", "max_pool_nchwc_template"]


@dataclass(frozen=True)
class PoolGeometry:
    batch: int
    channel_blocks: int
    vector_width: int
    height: int  # the input, without padding (the pool's padding is -inf, never read)
    width: int
    kernel: tuple
    stride: tuple
    dilation: tuple
    padding: tuple  # (top, left, bottom, right)
    out_height: int
    out_width: int
    out_pad: tuple = (0, 0, 0, 0)  # zero border written around the output, for the next conv
    in_pad: tuple = (0, 0, 0, 0)  # zero border around the input, written for the input's other readers

    @property
    def input_shape(self) -> tuple:
        return bordered_shape(self.batch, self.channel_blocks, self.height, self.width, self.in_pad,
                              (self.vector_width,))

    @property
    def output_shape(self) -> tuple:
        return bordered_shape(self.batch, self.channel_blocks, self.out_height, self.out_width, self.out_pad,
                              (self.vector_width,))


def max_pool_nchwc_template(geom: PoolGeometry, name="alcs_maxpool_nchwc"):
    """PrimFunc ``(x[N, CB, H', W', V], y[N, CB, Ho', Wo', V])`` (primes: with the zero borders)."""
    N, CB, V, H, W = geom.batch, geom.channel_blocks, geom.vector_width, geom.height, geom.width
    KH, KW = geom.kernel
    SH, SW = geom.stride
    DH, DW = geom.dilation
    PT, PL = geom.padding[:2]
    Ho, Wo = geom.out_height, geom.out_width
    OT, OL = geom.out_pad[:2]
    IT, IL = geom.in_pad[:2]
    _, _, HOP, WOP, _ = geom.output_shape
    lowest = T.float32(-3.4028234663852886e38)
    zero_output_border = zero_border(N, CB, HOP, WOP, (OT, OL), (Ho, Wo), V)

    def pool(x, y, n, cb, row):
        with loop("col", T.serial(Wo)) as col:
            with loop("v", T.vectorized(V)) as v:
                value = lowest
                for kh in range(KH):
                    ih = row * SH - PT + kh * DH
                    for kw in range(KW):
                        iw = col * SW - PL + kw * DW
                        inside = tvm.tirx.all(ih >= 0, ih < H, iw >= 0, iw < W)
                        # the index is clamped too: the load stays inside the buffer whichever way it is lowered
                        tap = x[n, cb, IT + T.max(T.min(ih, H - 1), 0), IL + T.max(T.min(iw, W - 1), 0), v]
                        value = T.max(value, T.if_then_else(inside, tap, lowest))
                T.buffer_store(y, value, [n, cb, OT + row, OL + col, v])

    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tirx.noalias": True})
            x = T.arg("x", T.buffer(geom.input_shape, "float32"))
            y = T.arg("y", T.buffer(geom.output_shape, "float32"))
            with root_block():
                if any(geom.out_pad):
                    zero_output_border(y)
                with loop("task", T.parallel(N * CB * Ho)) as task:
                    pool(x, y, task // (CB * Ho), task // Ho % CB, task % Ho)
    return builder.get()
