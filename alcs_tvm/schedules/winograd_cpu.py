"""Winograd convolution's two data transforms as loop-level TIR templates (channel-blocked, vectorised over lanes).

A 3x3 stride-1 conv computed as F(m x m, 3 x 3) (Lavin & Gray, 2016) is three kernels::

    input transform   d[alpha, alpha] tile of the padded NCHW[b]c input -> B^T d B   (this module)
    batched GEMM      M[xi] = U[xi] . V[xi] for each of the alpha^2 points xi       (the sparse kernel, 1x1)
    output transform  A^T M A + bias, shortcut, activation -> the conv's output     (this module)

with ``alpha = m + 2``. The GEMM is the ALCS kernel as a 1x1 conv whose weight is block-diagonal over the points
(each output block keeps exactly its point's input channels, so it multiplies no zero): the same register-tiled
FMA loop as every other conv. Both transforms are constant matrices applied to V-lane vectors: the products
below are generated with the matrices' entries as literals, zeros skipped and +-1 written as adds.

Tiles at the bottom and right edge read past the conv's padded input: their indices are clamped into the
buffer (finite values that only feed the outputs the output transform drops) and their outputs past the edge
are not stored. Interior tiles do neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..layer import ACTIVATIONS
from .sparse_conv2d_cpu import EpilogueShapes, activate, zero_border
from .tir_builder import IRBuilder, T, loop, named, root_block

__all__ = ["winograd_matrices", "WinogradGeometry", "winograd_input_template", "winograd_output_template",
           "WINOGRAD_POINTS"]

#: interpolation points per output tile size m (alpha - 1 finite points and infinity): small integers and their
#: halves keep the matrices' entries, and so float32 rounding, small (the points wincnn and ncnn use)
WINOGRAD_POINTS = {
    2: (0, 1, -1),
    4: (0, 1, -1, 2, -2),
    6: (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2)),
}


def _inverse(matrix):
    """Exact inverse of a square matrix of Fractions (Gauss-Jordan)."""
    n = len(matrix)
    work = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if work[r][col] != 0)
        work[col], work[pivot] = work[pivot], work[col]
        scale = work[col][col]
        work[col] = [v / scale for v in work[col]]
        for r in range(n):
            if r != col and work[r][col] != 0:
                factor = work[r][col]
                work[r] = [a - factor * b for a, b in zip(work[r], work[col])]
    return [row[n:] for row in work]


def winograd_matrices(m: int, r: int = 3):
    """``(AT [m, alpha], G [alpha, r], BT [alpha, alpha])`` of F(m, r), exact (lists of Fractions), such that the
    correlation ``y[i] = sum_k g[k] d[i + k]`` of ``d`` (alpha values) is ``AT @ ((G @ g) * (BT @ d))``.

    Toom-Cook: a linear convolution is evaluation at alpha points (the last at infinity), a product, and
    interpolation; correlation is its transpose. Rows of BT are scaled to integers, the scale moved into G."""
    if m not in WINOGRAD_POINTS or r != 3:
        raise ValueError(f"Winograd tiles are F(m, 3) with m in {sorted(WINOGRAD_POINTS)}, got F({m}, {r})")
    alpha = m + r - 1
    points = [Fraction(p) for p in WINOGRAD_POINTS[m]]

    def evaluation(columns):  # rows: p^0..p^(columns-1) per finite point, then the leading coefficient
        rows = [[p ** j for j in range(columns)] for p in points]
        rows.append([Fraction(int(j == columns - 1)) for j in range(columns)])
        return rows

    a = evaluation(m)  # [alpha, m]: evaluates the polynomial of the output tile
    g = evaluation(r)  # [alpha, r]: evaluates the filter's polynomial
    e_inv = _inverse(evaluation(alpha))  # interpolation: values at the points -> coefficients
    bt = [[e_inv[j][i] for j in range(alpha)] for i in range(alpha)]  # E^-T
    for i in range(alpha):  # integer rows in BT, the reciprocal scale in G
        denominators = [v.denominator for v in bt[i] if v != 0]
        scale = Fraction(int(np.lcm.reduce(denominators)))
        numerators = [abs((v * scale).numerator) for v in bt[i] if v != 0]
        scale /= int(np.gcd.reduce(numerators))
        bt[i] = [v * scale for v in bt[i]]
        g[i] = [v / scale for v in g[i]]
    at = [[a[i][j] for i in range(alpha)] for j in range(m)]
    return at, g, bt


def _linear_combination(coefficients, terms):
    """``sum(c * t)`` over the non-zero coefficients, +-1 as adds and subtracts (a TIR expression)."""
    out = None
    for c, t in zip(coefficients, terms):
        if c == 0:
            continue
        if abs(c) == 1:
            term, negative = t, c < 0
        else:
            term, negative = T.float32(float(abs(c))) * t, c < 0
        if out is None:
            out = -term if negative else term
        else:
            out = out - term if negative else out + term
    return T.float32(0) if out is None else out


@dataclass(frozen=True)
class WinogradGeometry(EpilogueShapes):
    """Shapes of one F(m x m, 3 x 3) conv's transforms (fp32 elements).

    The input is the conv's input as the previous layer wrote it: NCHW[b]c with a zero border of
    ``input_border`` (at least the conv's padding); ``origin``: where the conv's padded input starts in it."""

    batch: int
    in_blocks: int  # input channels / input_block
    input_block: int  # b: lanes of the input layout and of the transformed input
    buffer_height: int  # of the bordered input buffer
    buffer_width: int
    origin: tuple  # (row, col) of the conv's padded input inside the buffer
    out_channels: int
    vector_width: int  # V: lanes of the GEMM's output blocks
    out_height: int
    out_width: int
    tile: int  # m
    out_blocked: bool = True
    out_block: int = 0  # channels per block of a blocked output / residual; 0: V
    out_pad: tuple = (0, 0, 0, 0)
    residual: str | None = None  # None, "nchw" or "blocked" (with residual_pad)
    residual_pad: tuple = (0, 0, 0, 0)

    @property
    def alpha(self) -> int:
        return self.tile + 2

    @property
    def tiles_high(self) -> int:
        return -(-self.out_height // self.tile)

    @property
    def tiles_wide(self) -> int:
        return -(-self.out_width // self.tile)

    @property
    def transformed_input_shape(self) -> tuple:
        """``[N, alpha^2 * in_blocks, tiles_high, tiles_wide, b]``: point ``xi``'s channels are blocks
        ``xi * in_blocks ..``, the GEMM's 1x1 input."""
        return (self.batch, self.alpha ** 2 * self.in_blocks, self.tiles_high, self.tiles_wide, self.input_block)

    @property
    def gemm_output_shape(self) -> tuple:
        return (self.batch, self.alpha ** 2 * self.out_channels // self.vector_width, self.tiles_high,
                self.tiles_wide, self.vector_width)

    @property
    def layout_block(self) -> int:
        return self.out_block or self.vector_width

    @property
    def layout_blocks(self) -> int:
        return self.out_channels // self.layout_block


def winograd_input_template(geom: WinogradGeometry, name="alcs_winograd_input"):
    """PrimFunc ``(x[N, CB, Hb, Wb, b], v[N, alpha^2 * CB, TH, TW, b])``: ``v = B^T d B`` per tile and lane."""
    _, _, bt = winograd_matrices(geom.tile)
    m, alpha, b = geom.tile, geom.alpha, geom.input_block
    N, CB, HB, WB = geom.batch, geom.in_blocks, geom.buffer_height, geom.buffer_width
    TH, TW = geom.tiles_high, geom.tiles_wide
    R0, C0 = geom.origin
    # tiles whose alpha x alpha window lies inside the buffer need no clamping
    safe_rows = max(0, min(TH, (HB - R0 - alpha) // m + 1))
    safe_cols = max(0, min(TW, (WB - C0 - alpha) // m + 1))

    def tile(x, v, n, cb, th, tw, clamp):
        rows = [R0 + th * m + i for i in range(alpha)]
        cols = [C0 + tw * m + j for j in range(alpha)]
        if clamp:
            rows = [T.min(r, HB - 1) for r in rows]
            cols = [T.min(c, WB - 1) for c in cols]
        t = named("t", T.decl_buffer((alpha * alpha * b,), "float32", scope="global"))
        with loop("l", T.vectorized(b)) as l:
            for i in range(alpha):  # t[i, xi2] = sum_j d[i, j] BT[xi2, j]
                d = [x[n, cb, rows[i], cols[j], l] for j in range(alpha)]
                for xi2 in range(alpha):
                    T.buffer_store(t, _linear_combination(bt[xi2], d), [(i * alpha + xi2) * b + l])
        with loop("l", T.vectorized(b)) as l:
            for xi2 in range(alpha):  # v[xi1, xi2] = sum_i BT[xi1, i] t[i, xi2]
                column = [t[(i * alpha + xi2) * b + l] for i in range(alpha)]
                for xi1 in range(alpha):
                    T.buffer_store(v, _linear_combination(bt[xi1], column),
                                   [n, (xi1 * alpha + xi2) * CB + cb, th, tw, l])

    def row(x, v, n, cb, th, clamp_rows):
        with loop("tw", T.serial(safe_cols)) as tw:
            tile(x, v, n, cb, th, tw, clamp_rows)
        if safe_cols < TW:
            with loop("tw", T.serial(safe_cols, TW)) as tw:
                tile(x, v, n, cb, th, tw, True)

    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tirx.noalias": True})
            x = T.arg("x", T.buffer((N, CB, HB, WB, b), "float32"))
            v = T.arg("v", T.buffer(geom.transformed_input_shape, "float32"))
            with root_block(), loop("task", T.parallel(N * CB * TH)) as task:
                n, cb, th = task // (CB * TH), task // TH % CB, task % TH
                if safe_rows < TH:
                    with T.If(th < safe_rows):
                        with T.Then():
                            row(x, v, n, cb, th, False)
                        with T.Else():
                            row(x, v, n, cb, th, True)
                else:
                    row(x, v, n, cb, th, False)
    return builder.get()


def winograd_output_template(geom: WinogradGeometry, *, has_bias: bool, activation=None,
                             name="alcs_winograd_output"):
    """PrimFunc ``(mv[N, alpha^2 * Cout/V, TH, TW, V], bias, [residual,] y)``: ``y = act(A^T M A + bias
    [+ residual])`` per tile, written in the conv's output layout (``bias`` holds PReLU's slopes after the bias,
    as the sparse kernel's does)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    at, _, _ = winograd_matrices(geom.tile)
    m, alpha, V = geom.tile, geom.alpha, geom.vector_width
    N, Cout = geom.batch, geom.out_channels
    if Cout % V:
        raise ValueError(f"output channels {Cout} are not a multiple of V={V}")
    OBK = Cout // V
    Ho, Wo = geom.out_height, geom.out_width
    TH, TW = geom.tiles_high, geom.tiles_wide
    OT, OL, OB, OR = geom.out_pad
    HOP, WOP = Ho + OT + OB, Wo + OL + OR
    BLOCKED = geom.out_blocked
    B = geom.layout_block
    if B % V and V % B:
        raise ValueError(f"the output block ({B}) and V ({V}) must divide one another")
    PRELU = activation == "prelu"
    HAS_RES = geom.residual is not None
    RES_BLOCKED = geom.residual == "blocked"
    RPT, RPL = geom.residual_pad[:2]
    full_rows, full_cols = Ho // m, Wo // m

    def tile(mv, bias, res, y, n, ob, th, tw, edge):
        s = named("s", T.decl_buffer((alpha * m * V,), "float32", scope="global"))
        out = named("o", T.decl_buffer((m * m * V,), "float32", scope="global"))
        with loop("l", T.vectorized(V)) as l:
            for xi1 in range(alpha):  # s[xi1, j] = sum_xi2 M[xi1, xi2] AT[j, xi2]
                row = [mv[n, (xi1 * alpha + xi2) * OBK + ob, th, tw, l] for xi2 in range(alpha)]
                for j in range(m):
                    T.buffer_store(s, _linear_combination(at[j], row), [(xi1 * m + j) * V + l])
        with loop("l", T.vectorized(V)) as l:
            for j in range(m):  # out[i, j] = sum_xi1 AT[i, xi1] s[xi1, j] + bias
                column = [s[(xi1 * m + j) * V + l] for xi1 in range(alpha)]
                for i in range(m):
                    value = _linear_combination(at[i], column)
                    if has_bias:
                        value = value + bias[ob * V + l]
                    T.buffer_store(out, value, [(i * m + j) * V + l])
        for i in range(m):
            for j in range(m):
                h, w = th * m + i, tw * m + j
                if edge:
                    with T.If(T.And(h < Ho, w < Wo)):
                        with T.Then():
                            store(out, bias, res, y, n, ob, i, j, h, w)
                else:
                    store(out, bias, res, y, n, ob, i, j, h, w)

    def lanes():
        """``(sub-blocks, lanes each)`` a V-wide group is stored as in the blocked layout."""
        return (V // B, B) if B < V else (1, V)

    def store(out, bias, res, y, n, ob, i, j, h, w):
        k, width = lanes()
        for kb in range(k):
            channel0 = ob * V + kb * width
            block, lane0 = channel0 // B, channel0 % B
            # blocked: one vector store per pixel; NCHW: a lane scatter
            with loop("l", T.vectorized(width) if BLOCKED else T.serial(width)) as l:
                value = out[(i * m + j) * V + kb * width + l]
                if HAS_RES:
                    value = value + (res[n, block, RPT + h, RPL + w, lane0 + l] if RES_BLOCKED
                                     else res[n, channel0 + l, h, w])
                slope = bias[OBK * V + channel0 + l] if PRELU else None
                index = [n, block, OT + h, OL + w, lane0 + l] if BLOCKED else [n, channel0 + l, OT + h, OL + w]
                T.buffer_store(y, activate(activation, value, slope), index)

    def row(mv, bias, res, y, n, ob, th, edge_row):
        with loop("tw", T.serial(full_cols)) as tw:
            tile(mv, bias, res, y, n, ob, th, tw, edge_row)
        if full_cols < TW:
            tile(mv, bias, res, y, n, ob, th, full_cols, True)

    def body(mv, bias, res, y):
        if any(geom.out_pad):
            zero_output_border(y)
        with loop("task", T.parallel(N * OBK * TH)) as task:
            n, ob, th = task // (OBK * TH), task // TH % OBK, task % TH
            if full_rows < TH:
                with T.If(th < full_rows):
                    with T.Then():
                        row(mv, bias, res, y, n, ob, th, False)
                    with T.Else():
                        row(mv, bias, res, y, n, ob, th, True)
            else:
                row(mv, bias, res, y, n, ob, th, False)

    zero_output_border = zero_border(N, Cout // B if BLOCKED else Cout, HOP, WOP, (OT, OL), (Ho, Wo),
                                     B if BLOCKED else None)
    bias_len = Cout * (2 if PRELU else 1)
    with IRBuilder() as builder:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tirx.noalias": True})
            mv = T.arg("m", T.buffer(geom.gemm_output_shape, "float32"))
            bias = T.arg("bias", T.buffer((bias_len,), "float32"))
            res = T.arg("res", T.buffer(geom.residual_shape, "float32")) if HAS_RES else None
            y = T.arg("y", T.buffer(geom.output_shape, "float32"))
            with root_block():
                body(mv, bias, res, y)
    return builder.get()
