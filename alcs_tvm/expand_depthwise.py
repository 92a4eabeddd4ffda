"""A conv - a 1x1 expand conv, or a strided one such as MobileNet's stem - fused with the depthwise conv that
reads it: when it applies, and its kernel with its constants.

The two run as one kernel (:mod:`alcs_tvm.schedules.expand_depthwise_cpu`) that never writes the wide tensor
between them: each task expands one channel group a few rows at a time into a ring of rows the depthwise window
reads, so the wide tensor stays in L1 instead of making a round trip through the outer caches. The expand is the
sparse kernel's loop (its packed arrays are the same), the depthwise conv the blocked depthwise kernel's.

:func:`fusion_blocker` is the rule the layout planner applies (:mod:`alcs_tvm.passes.layout_chain`), on shapes
only: a conv without a fused shortcut whose taps share no input loads (1x1, or strided along the width: the
sparse kernel groups a stride-1 conv's adjacent taps into runs, which the fused loop, one tap at a time, would
give up) and whose one reader is a depthwise conv (chained channel-blocked) with a kernel at least as tall as its
row stride and no dilation. No size limit: on the pairs of MobileNetV2 the fused kernel is at least as fast as
the two kernels alone with warm caches, from 7x7 to 112x112 (docs/peers.md), and inside a model it also saves
the wide tensor's round trip and a call.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .kernels import epilogue_slope, max_run_length, pack_sparse_conv2d, padded_input_shape
from .schedules import choose_tile, register_budget
from .layer import Conv2dSpec, KernelLayout, conv_output_size, normalize_padding
from .schedules.expand_depthwise_cpu import ExpandDepthwiseGeometry, expand_depthwise_template
from .sparse_format import BlockSparseWeight
from .target import resolve_target

__all__ = ["DepthwiseConv", "ExpandDepthwiseKernel", "expand_depthwise_kernel", "fusion_blocker",
           "strip_rows"]

@dataclass(frozen=True)
class DepthwiseConv:
    """A depthwise conv over ``channels`` channels of ``batch`` images of ``height x width``: ``weight`` [C, 1, KH, KW]
    float32, ``bias`` [C] or None, ``activation``. The pass's one description of a depthwise conv, which the
    blocked depthwise kernel and the fused kernel both run."""

    channels: int
    height: int
    width: int
    weight: np.ndarray
    padding: tuple = (0, 0, 0, 0)
    stride: tuple = (1, 1)
    dilation: tuple = (1, 1)
    bias: np.ndarray | None = None
    activation: str | None = None
    batch: int = 1

    @property
    def kernel(self) -> tuple:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def out_height(self) -> int:
        return conv_output_size(self.height + self.padding[0] + self.padding[2], self.kernel[0], self.stride[0],
                                self.dilation[0])

    @property
    def out_width(self) -> int:
        return conv_output_size(self.width + self.padding[1] + self.padding[3], self.kernel[1], self.stride[1],
                                self.dilation[1])


def fusion_blocker(spec: Conv2dSpec, layout: KernelLayout, depthwise: DepthwiseConv) -> str | None:
    """Why the conv ``spec`` (called as ``layout``) cannot run fused with the depthwise conv reading its output,
    or None when it runs fused."""
    if max_run_length(spec) > 1:
        return "the conv's taps share input loads (a stride-1 conv wider than 1x1), which the fused loop, one " \
               "tap at a time, would give up"
    if layout.residual is not None:
        return "the conv adds a shortcut"
    if depthwise.channels != spec.out_channels or (depthwise.height, depthwise.width) != \
            (spec.out_height, spec.out_width):
        return "the depthwise conv does not read the conv's output"
    kh, kw = depthwise.kernel
    if depthwise.dilation != (1, 1) or not 1 <= depthwise.stride[0] <= kh:
        return "the depthwise conv is dilated or strides over more rows than its kernel has"
    if depthwise.activation == "prelu":
        return "the depthwise conv's activation is PReLU"
    return None


def strip_rows(out_height: int, groups: int, batch: int = 1) -> int:
    """Output rows per task: the whole image when there are enough groups to share out, else strips of at
    least :data:`MIN_STRIP_ROWS` rows (each strip recomputes the rows its window shares with the one above) for
    about :data:`MIN_TASKS` tasks."""
    strips = max(1, min(-(-MIN_TASKS // (groups * batch)), out_height // MIN_STRIP_ROWS))
    return -(-out_height // strips)


#: tasks a fused kernel is split into when it can: enough for a few cores; each strip beyond one per group
#: recomputes KH - SH expanded rows, so no more than that
MIN_TASKS = 4

#: the shortest strip: a strip of r output rows recomputes KH - SH expanded rows
MIN_STRIP_ROWS = 8


@dataclass(frozen=True, eq=False)
class ExpandDepthwiseKernel:
    func: object  # tvm.tirx.PrimFunc
    arrays: list  # the constants after the input, in argument order
    geometry: ExpandDepthwiseGeometry

    @property
    def output_shape(self) -> tuple:
        return self.geometry.output_shape


def kernel_symbol(geom: ExpandDepthwiseGeometry, expand_activation, activation) -> str:
    """``alcs_expand_dwconv_k3x3s1_v32_relu6_relu6``."""
    kh, kw = geom.kernel
    acts = "".join(f"_{a}" for a in (expand_activation, activation) if a)
    return f"alcs_expand_dwconv_k{kh}x{kw}s{geom.stride[0]}_v{geom.vector_width}{acts}"


def expand_depthwise_kernel(weight: BlockSparseWeight, spec: Conv2dSpec, layout: KernelLayout,
                            depthwise: DepthwiseConv, *, bias=None, slope=None, out_block: int | None = None,
                            output_pad=(0, 0, 0, 0), strip: int | None = None,
                            target="x86") -> ExpandDepthwiseKernel:
    """The fused kernel of the conv ``weight`` at ``spec`` - its input read as ``layout`` says (pre-padded,
    channel-blocked, a border), its ``bias``, ``layout.activation`` (``slope``: PReLU's) - and ``depthwise``,
    whose output it writes as NCHW[``out_block``]c (default V) with an ``output_pad`` zero border. ``strip``:
    output rows per task (default :func:`strip_rows`). The expand's register tile is one row of as many pixels
    as ``target``'s register file holds accumulators for (:func:`~alcs_tvm.schedules.register_budget`)."""
    why = fusion_blocker(spec, layout, depthwise)
    if why:
        raise ValueError(f"cannot fuse {spec.describe()} with its depthwise conv: {why}")
    if layout.bias != (bias is not None):
        raise ValueError("a bias array must be given exactly when layout.bias is set")
    v = weight.vector_width
    b = out_block or v
    if v % b or spec.out_channels % b:
        raise ValueError(f"the output block {b} must divide V ({v}) and the channels ({spec.out_channels})")
    input_block = layout.input_block
    if input_block != 1 and not layout.input_prepadded:
        raise ValueError("a channel-blocked input must come pre-padded")
    # as the sparse kernel reads its input: offsets into the bordered buffer, shifted to where this conv's
    # padding starts; an unpadded NCHW input is padded inside the kernel
    border = spec.padding if layout.input_border is None else normalize_padding(layout.input_border)
    if any(b < p for b, p in zip(border, spec.padding)):
        raise ValueError(f"input border {border} is narrower than the conv's padding {spec.padding}")
    if border != spec.padding and not layout.input_prepadded:
        raise ValueError("an input border needs a pre-padded input")
    buffer_spec = replace(spec, padding=tuple(border))
    slope = epilogue_slope(layout.activation, slope, spec.out_channels)
    packed = pack_sparse_conv2d(weight, buffer_spec, bias, input_block, 1, slope)
    shift = ((border[0] - spec.padding[0]) * buffer_spec.padded_width + border[1] - spec.padding[1]) * input_block
    offsets = packed.offsets
    if shift and weight.nnz_blocks:
        offsets = (offsets + shift).astype(np.int32)
    padded = padded_input_shape(buffer_spec, input_block)
    batch_stride = int(np.prod(padded[1:]))
    nb = weight.num_blocks
    kh, kw = depthwise.kernel
    dw = np.zeros((nb * v, kh, kw), np.float32)
    dw[:spec.out_channels] = np.asarray(depthwise.weight, np.float32).reshape(spec.out_channels, kh, kw)
    dw = np.ascontiguousarray(dw.reshape(nb, v, kh, kw).transpose(0, 2, 3, 1))
    dw_bias = np.zeros(nb * v, np.float32)
    if depthwise.bias is not None:
        dw_bias[:spec.out_channels] = depthwise.bias
    ho = depthwise.out_height
    family = resolve_target(target, v).family
    max_accumulators, max_cols = register_budget(family, v)
    expand_cols = choose_tile(1, spec.out_width, max_accumulators, max_cols)[1]
    geom = ExpandDepthwiseGeometry(
        batch=spec.batch, input_shape=padded if layout.input_prepadded else spec.input_shape,
        batch_stride=batch_stride, row_step=spec.stride[0] * buffer_spec.padded_width * input_block,
        col_step=spec.stride[1] * input_block,
        input_pad=tuple(spec.padding) if not layout.input_prepadded else (0, 0, 0, 0),
        channels=spec.out_channels, num_blocks=nb, vector_width=v, nnz=len(packed.values),
        nruns=len(packed.offsets), height=spec.out_height, width=spec.out_width,
        padding=tuple(depthwise.padding), kernel=(kh, kw), stride=tuple(depthwise.stride), out_height=ho,
        out_width=depthwise.out_width, out_block=b, out_pad=tuple(output_pad),
        strip_rows=strip or strip_rows(ho, nb, spec.batch), expand_cols=expand_cols)
    func = expand_depthwise_template(geom, expand_activation=layout.activation, activation=depthwise.activation,
                                     expand_slopes=layout.activation == "prelu",
                                     name=kernel_symbol(geom, layout.activation, depthwise.activation))
    arrays = [packed.indptr, offsets, packed.vstart, packed.values, packed.bias, packed.block_order, dw, dw_bias]
    return ExpandDepthwiseKernel(func, arrays, geom)
