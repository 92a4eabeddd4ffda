"""The sparse conv2d kernel: packing a :class:`BlockSparseWeight` for it, and its PrimFunc for one layer.

The sparsity pattern travels as runtime data (``indptr``, ``offsets``, ``values`` tensors) rather than being baked
into the generated code: one compiled kernel then serves every mask of the same shape and kept count, code size
stays independent of the number of kept blocks, and the Relax pass can bind the arrays as ordinary constants.
Baking the pattern in would save one offset load per kept block (which x86 folds into the FMA's address anyway)
at the price of code that grows linearly with the kept weights.

``build_sparse_conv2d`` compiles one layer standalone for tests, benchmarks and latency tables.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tvm

from .schedules import (SparseConvSchedule, default_sparse_conv_schedule, loads_bias_per_accumulator,
                        prefetches_next_block, splits_tasks_per_tile)
from .schedules.sparse_conv2d_cpu import QUARTER, KernelGeometry, activation_buffer_offsets, sparse_conv2d_template
from .layer import Conv2dSpec, KernelLayout, normalize_padding
from .sparse_format import BlockSparseWeight, widest_block_format
from .target import TargetInfo, resolve_target

__all__ = ["PackedSparseConv2d", "SparseConv2dKernel", "pack_sparse_conv2d", "pack_epilogue", "epilogue_slope",
           "balanced_block_order", "max_run_length", "kernel_symbol", "sparse_conv2d_kernel", "build_sparse_conv2d",
           "CompiledSparseConv2d"]


@dataclass(frozen=True, eq=False)
class PackedSparseConv2d:
    """The runtime arrays of one sparse conv, in kernel argument order.

    Kept positions are grouped into *runs* of up to ``max_run`` horizontally adjacent taps (see
    :mod:`alcs_tvm.schedules.sparse_conv2d_cpu`); with ``max_run = 1`` every kept position is its own run and
    ``indptr`` is the format's CSR row pointer."""

    indptr: np.ndarray  # int32 [nblocks * max_run + 1]: per block, one segment of runs per run length (long first)
    offsets: np.ndarray  # int32 [max(runs, 1)]: flat offset of each run's first (cin, kh, kw) in the padded input
    vstart: np.ndarray  # int32 [max(runs, 1)]: index in ``values`` of each run's first weight vector
    values: np.ndarray  # float32 [max(nnz, 1), V], in run order
    bias: np.ndarray  # float32 [nblocks * V], zero-padded (all zeros when the conv has no bias); or per accumulator
    # (bias_per_accumulator) where the kernel loads a copy for each
    block_order: np.ndarray  # int32 [nblocks]: the order parallel tasks visit the blocks (load balance)
    max_run: int = 1

    def arrays(self) -> list:
        return [self.indptr, self.offsets, self.vstart, self.values, self.bias, self.block_order]


def padded_input_shape(spec: Conv2dSpec, input_block: int = 1) -> tuple:
    """Shape of the padded input the kernel indexes: NCHW, or NCHW[b]c for ``input_block = b > 1``."""
    hp, wp = spec.padded_height, spec.padded_width
    if input_block == 1:
        return spec.batch, spec.in_channels, hp, wp
    if spec.in_channels % input_block:
        raise ValueError(f"input channels {spec.in_channels} are not a multiple of the input block {input_block}")
    return spec.batch, spec.in_channels // input_block, hp, wp, input_block


def balanced_block_order(block_nnz) -> np.ndarray:
    """Visit order that balances kept positions across contiguous thread chunks: blocks sorted by work, then
    interleaved largest, smallest, second largest, ... so every adjacent pair (and any chunk of whole pairs)
    carries about the same work whatever the thread count. Matters for pruned models, whose blocks keep very
    different numbers of positions; random masks are balanced anyway."""
    by_work = np.argsort(-np.asarray(block_nnz), kind="stable")
    order = np.empty_like(by_work)
    order[0::2] = by_work[: (len(by_work) + 1) // 2]
    order[1::2] = by_work[(len(by_work) + 1) // 2:][::-1]
    return order.astype(np.int32)


def max_run_length(spec: Conv2dSpec) -> int:
    """Longest run of adjacent kw taps the kernel shares input loads over: only where tap ``kw+1`` of pixel ``c``
    reads the input of tap ``kw`` of pixel ``c+1`` (stride 1 and no dilation along W)."""
    if spec.stride[1] != 1 or spec.dilation[1] != 1:
        return 1
    return min(spec.kernel[1], 3)


def _runs(weight: BlockSparseWeight, max_run: int):
    """Split each block's kept positions into runs of <= ``max_run`` adjacent kw taps of one (cin, kh) row and
    order them by length within the block. Returns ``(indptr, first_entry, run_length, entry_order)``."""
    nb, kw = weight.num_blocks, weight.kernel_size[1]
    pos = weight.indices.astype(np.int64)
    block = np.repeat(np.arange(nb), weight.block_nnz())
    n = len(pos)
    starts_maximal = np.ones(n, bool)
    if n:
        starts_maximal[1:] = (pos[1:] != pos[:-1] + 1) | (pos[1:] % kw == 0) | (block[1:] != block[:-1])
    maximal_id = np.cumsum(starts_maximal) - 1
    maximal_start = np.flatnonzero(starts_maximal)
    offset_in_maximal = np.arange(n) - maximal_start[maximal_id]
    starts = offset_in_maximal % max_run == 0
    first = np.flatnonzero(starts)  # entry index of each run's first tap
    length = np.diff(np.append(first, n))
    run_block = block[first]
    order = np.lexsort((first, -length, run_block))  # by block, long runs first, then position order
    first, length, run_block = first[order], length[order], run_block[order]
    counts = np.zeros((nb, max_run), np.int64)  # [block, k]: runs of length max_run - k
    np.add.at(counts, (run_block, max_run - length), 1)
    indptr = np.zeros(nb * max_run + 1, np.int64)
    np.cumsum(counts.ravel(), out=indptr[1:])
    entry_order = np.concatenate([np.arange(f, f + l) for f, l in zip(first, length)]) if n else \
        np.zeros(0, np.int64)
    return indptr, first, length, entry_order


#: the slope a PReLU kernel built without its model's slopes (to be timed, estimated or tuned) gets: PReLU's
#: initial value; the slopes are data, the code is the same for any
DEFAULT_PRELU_SLOPE = 0.25


def epilogue_slope(activation, slope, out_channels: int):
    """PReLU's per-channel slopes for a kernel fusing ``activation``: ``slope`` as given, or
    :data:`DEFAULT_PRELU_SLOPE` for every channel when none is; None for any other activation (which takes none)."""
    if slope is not None and activation != "prelu":
        raise ValueError(f"slopes are given for a {activation or 'plain'} epilogue, not prelu")
    if activation == "prelu" and slope is None:
        return np.full(out_channels, DEFAULT_PRELU_SLOPE, np.float32)
    return slope


def pack_epilogue(bias, slope, out_channels: int, padded_channels: int) -> np.ndarray:
    """The kernels' ``bias`` argument: the bias (zeros without one) zero-padded to ``padded_channels`` (whole
    output blocks), then, when ``slope`` is given, PReLU's per-channel slopes padded the same way: the kernel reads
    both per output block."""
    packed = np.zeros(padded_channels * (1 if slope is None else 2), np.float32)
    if bias is not None:
        bias = np.asarray(bias)
        if bias.dtype != np.float32:
            raise TypeError(f"bias must be float32, got {bias.dtype}")
        if bias.shape != (out_channels,):
            raise ValueError(f"bias shape {bias.shape} does not match {out_channels} output channels")
        packed[:out_channels] = bias
    if slope is not None:
        slope = np.asarray(slope, np.float32).reshape(-1)
        if slope.shape != (out_channels,):
            raise ValueError(f"slope shape {slope.shape} does not match {out_channels} output channels")
        packed[padded_channels:padded_channels + out_channels] = slope
    return packed


def pack_sparse_conv2d(weight: BlockSparseWeight, spec: Conv2dSpec, bias=None, input_block: int = 1,
                       max_run: int | None = None, slope=None) -> PackedSparseConv2d:
    """Turn kept positions into runs with input offsets for ``spec``'s padded input layout. ``slope`` (PReLU's
    per-channel slopes) is stored after the bias, in the same array: the kernel reads both per output block."""
    if tuple(weight.shape) != spec.weight_shape:
        raise ValueError(f"sparse weight shape {weight.shape} does not match the conv {spec.weight_shape}")
    max_run = max_run_length(spec) if max_run is None else max_run
    indptr, first, length, entry_order = _runs(weight, max_run)
    cin, kh, kw = (c.astype(np.int64)[first] for c in weight.position_coords())
    hp, wp = spec.padded_height, spec.padded_width
    dh, dw = spec.dilation
    b = input_block
    offsets = (cin // b) * hp * wp * b + kh * dh * wp * b + kw * dw * b + cin % b
    if offsets.size and offsets.max() >= np.iinfo(np.int32).max // 2:
        raise ValueError(f"input too large for 32-bit offsets: {spec.describe()}")
    v = weight.vector_width
    values = weight.values[entry_order]
    vstart = np.cumsum(np.concatenate([[0], length[:-1]])) if len(length) else np.zeros(0, np.int64)
    if weight.nnz_blocks == 0:  # keep buffers non-empty; indptr guarantees they are never read
        offsets, vstart, values = np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros((1, v), np.float32)
    packed_bias = pack_epilogue(bias, slope, spec.out_channels, weight.num_blocks * v)
    return PackedSparseConv2d(indptr.astype(np.int32), offsets.astype(np.int32), vstart.astype(np.int32),
                              np.ascontiguousarray(values, np.float32), packed_bias,
                              balanced_block_order(weight.block_nnz()), max_run)


@dataclass(frozen=True, eq=False)
class SparseConv2dKernel:
    """A PrimFunc for one conv layer with the constant arrays it takes after the input."""

    func: object  # tvm.tirx.PrimFunc
    packed: PackedSparseConv2d
    geometry: KernelGeometry
    schedule: SparseConvSchedule

    @property
    def activation_offsets(self) -> dict:
        """Offsets of ``"x"``, ``"residual"``, ``"y"`` and the ``"size"`` of the one-buffer variant's ``io``."""
        return activation_buffer_offsets(self.geometry)

    @property
    def output_shape(self) -> tuple:
        shape = self.geometry.output_shape
        return shape[:-1] + (self.schedule.vector_width,) if shape[-1] is None else shape

    @property
    def residual_shape(self) -> tuple | None:
        shape = self.geometry.residual_shape
        return shape[:-1] + (self.schedule.vector_width,) if shape and shape[-1] is None else shape


def kernel_symbol(spec: Conv2dSpec, schedule: SparseConvSchedule, layout: KernelLayout) -> str:
    """A name that says what the kernel is, readable in a profile or a disassembly:
    ``alcs_spconv_k3x3s1_v16_r2x14_relu_res`` (kernel size, stride, group width V, register tile, epilogue)."""
    kh, kw = spec.kernel
    sh, sw = spec.stride
    stride = f"s{sh}" if sh == sw else f"s{sh}x{sw}"
    epilogue = "".join(part for part, on in (("_res", layout.residual), (f"_{layout.activation}", layout.activation))
                       if on)
    order = "_rowouter" if schedule.row_outer else ""
    return f"alcs_spconv_k{kh}x{kw}{stride}_v{schedule.vector_width}_r{schedule.tile_rows}x{schedule.tile_cols}" \
        f"{order}{epilogue}"


def bias_per_accumulator(bias: np.ndarray, vector_width: int, accumulators: int) -> np.ndarray:
    """The bias argument of a kernel whose accumulators load their own copies (``bias_copies`` of
    :func:`~.schedules.sparse_conv2d_cpu.sparse_conv2d_template`): per output block, per accumulator of the register
    tile, per quarter of the group, its ``QUARTER`` lanes then as many unread zeros (so that LLVM does not pair two
    loads into one ``ldp q``)."""
    quarters = np.asarray(bias, np.float32).reshape(-1, 1, vector_width // QUARTER, 1, QUARTER)
    out = np.zeros((quarters.shape[0], accumulators, vector_width // QUARTER, 2, QUARTER), np.float32)
    out[:, :, :, :1, :] = quarters
    return out.reshape(-1)


def sparse_conv2d_kernel(weight: BlockSparseWeight, spec: Conv2dSpec, layout: KernelLayout = KernelLayout(), *,
                         bias=None, target="x86", schedule: SparseConvSchedule | None = None, name: str | None = None,
                         one_activation_buffer=False, slope=None) -> SparseConv2dKernel:
    """Generate the sparse conv PrimFunc ``(x, indptr, offsets, vstart, values, bias, block_order, [residual,] y)``
    for ``weight`` at ``spec``, called as ``layout`` says (:class:`~alcs_tvm.layer.KernelLayout`: fused epilogue,
    pre-padded / channel-blocked input and output, a fused shortcut). ``bias``: the float32 bias array, given iff
    ``layout.bias``. ``schedule``: the register tile and task order (default: the target's).
    ``name``: the PrimFunc's symbol (default :func:`kernel_symbol`). ``one_activation_buffer``: input, residual
    and output in one ``io`` argument (the profiler's cold timing). ``slope``: PReLU's per-channel slopes when
    ``layout.activation`` is ``"prelu"`` (default :data:`DEFAULT_PRELU_SLOPE` for every channel)."""
    if not isinstance(weight, BlockSparseWeight):
        raise TypeError(f"weight must be a BlockSparseWeight, got {type(weight).__name__}")
    if not isinstance(layout, KernelLayout):
        raise TypeError(f"layout must be a KernelLayout, got {type(layout).__name__}")
    if layout.bias != (bias is not None):
        raise ValueError("a bias array must be given exactly when layout.bias is set")
    info = resolve_target(target, weight.vector_width)
    max_run = max_run_length(spec)
    if schedule is None:
        schedule = default_sparse_conv_schedule(info.family, weight.vector_width, spec.out_height, spec.out_width,
                                                max_run, pointwise=spec.kernel == (1, 1), density=weight.density)
    if schedule.vector_width != weight.vector_width:
        raise ValueError(f"schedule vector width {schedule.vector_width} != weight's {weight.vector_width}")
    input_block, input_prepadded = layout.input_block, layout.input_prepadded
    if input_block != 1 and not input_prepadded:
        raise ValueError("a channel-blocked input must come pre-padded")
    border = spec.padding if layout.input_border is None else normalize_padding(layout.input_border)
    if any(b < p for b, p in zip(border, spec.padding)):
        raise ValueError(f"input border {border} is narrower than the conv's padding {spec.padding}")
    if border != spec.padding and not input_prepadded:
        raise ValueError("an input border needs a pre-padded input")
    out_block = layout.out_block
    if out_block and (out_block < 1 or weight.vector_width % out_block):
        raise ValueError(f"out_block {out_block} must divide the weight's vector width {weight.vector_width}")
    # offsets index the bordered buffer; the shift starts each receptive field where this conv's padding does
    buffer_spec = replace(spec, padding=tuple(border))
    slope = epilogue_slope(layout.activation, slope, spec.out_channels)
    packed = pack_sparse_conv2d(weight, buffer_spec, bias, input_block, max_run, slope)
    shift = ((border[0] - spec.padding[0]) * buffer_spec.padded_width + border[1] - spec.padding[1]) * input_block
    if shift and weight.nnz_blocks:
        packed = replace(packed, offsets=(packed.offsets + shift).astype(np.int32))
    padded = padded_input_shape(buffer_spec, input_block)
    needs_pad = any(spec.padding) and not input_prepadded
    pixel = input_block  # elements between horizontally adjacent input pixels
    geom = KernelGeometry(
        batch=spec.batch,
        input_shape=spec.input_shape if not input_prepadded else padded,
        padded_shape=padded,
        input_pad=spec.padding if needs_pad else (0, 0, 0, 0),
        row_step=spec.stride[0] * buffer_spec.padded_width * pixel,
        col_step=spec.stride[1] * pixel,
        out_channels=spec.out_channels,
        num_blocks=weight.num_blocks,
        out_height=spec.out_height,
        out_width=spec.out_width,
        out_blocked=layout.output_blocked,
        out_pad=layout.output_pad,
        nnz=len(packed.values),
        nruns=len(packed.offsets),
        max_run=max_run,
        residual=layout.residual,
        residual_pad=layout.residual_pad,
        vector_width=weight.vector_width,
        out_block=out_block,
    )
    tile_tasks = splits_tasks_per_tile(info.family, spec.kernel == (1, 1), spec.out_height, spec.out_width, schedule,
                                       layout.activation) and not prefetches_next_block(info.family)
    bias_copies = 0
    if layout.bias and loads_bias_per_accumulator(info.family, spec.out_width, schedule, layout.activation,
                                                  tile_tasks):
        bias_copies = min(schedule.tile_rows, spec.out_height) * min(schedule.tile_cols, spec.out_width)
        packed = replace(packed, bias=bias_per_accumulator(packed.bias, weight.vector_width, bias_copies))
    func = sparse_conv2d_template(geom, schedule, has_bias=layout.bias, activation=layout.activation,
                                  name=name or kernel_symbol(spec, schedule, layout),
                                  one_activation_buffer=one_activation_buffer,
                                  prefetch_next_block=prefetches_next_block(info.family), bias_copies=bias_copies,
                                  tile_tasks=tile_tasks)
    return SparseConv2dKernel(func, packed, geom, schedule)


class CompiledSparseConv2d:
    """One conv layer compiled for a target: NCHW in, NCHW out (plus a kernel-only variant for timing)."""

    def __init__(self, weight: np.ndarray, spec: Conv2dSpec, bias, activation, info: TargetInfo,
                 schedule: SparseConvSchedule | None):
        self.spec, self.info = spec, info
        self.layout = KernelLayout(bias=bias is not None, activation=activation)
        self.sparse_weight = widest_block_format(weight, info.group_widths())
        self._bias, self._schedule = bias, schedule
        self.kernel = sparse_conv2d_kernel(self.sparse_weight, spec, self.layout, bias=bias, target=info.target,
                                           schedule=schedule)
        self.executable = tvm.compile(self.kernel.func, target=info.target)
        self._kernel_only = None

    @property
    def density(self) -> float:
        return self.sparse_weight.density

    def export_library(self, path: str, **kwargs):
        self.executable.export_library(path, **kwargs)

    @staticmethod
    def _device_args(kernel: SparseConv2dKernel, x: np.ndarray, device):
        arrays = [x] + kernel.packed.arrays() + [np.zeros(kernel.output_shape, np.float32)]
        return [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays]

    def _check_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype != np.float32:
            raise TypeError(f"input must be float32, got {x.dtype}")
        if x.shape != self.spec.input_shape:
            raise ValueError(f"input shape {x.shape} does not match the conv's {self.spec.input_shape}")
        return x

    def _function(self, executable, kernel):
        return executable.mod[kernel.func.attrs["global_symbol"]]

    def run(self, x: np.ndarray) -> np.ndarray:
        args = self._device_args(self.kernel, self._check_input(x), tvm.cpu())
        self._function(self.executable, self.kernel)(*args)
        return args[-1].numpy()

    def time_callable(self, x: np.ndarray):
        """A zero-argument function running one NCHW -> NCHW inference on pre-bound device tensors."""
        args = self._device_args(self.kernel, self._check_input(x), tvm.cpu())
        func = self._function(self.executable, self.kernel)
        return lambda: func(*args)

    def kernel_time_callable(self, x: np.ndarray):
        """Like :meth:`time_callable`, but only the kernel as it runs inside a compiled model: input already
        zero-padded (written so by the previous layer), output channel-blocked NCHW[V]c."""
        if self._kernel_only is None:
            layout = replace(self.layout, input_prepadded=True, output_blocked=True)
            kernel = sparse_conv2d_kernel(self.sparse_weight, self.spec, layout, bias=self._bias,
                                          target=self.info.target, schedule=self._schedule)
            self._kernel_only = (kernel, tvm.compile(kernel.func, target=self.info.target))
        kernel, executable = self._kernel_only
        pt, pl, pb, pr = self.spec.padding
        padded = np.pad(self._check_input(x), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        args = self._device_args(kernel, padded, tvm.cpu())
        func = self._function(executable, kernel)
        return lambda: func(*args)


def build_sparse_conv2d(weight, *, input_shape, stride=1, padding=0, dilation=1, bias=None, activation=None,
                        target="x86", vector_width=None, schedule: SparseConvSchedule | None = None,
                        layout="NCHW") -> CompiledSparseConv2d:
    """Compile one sparse conv layer from a dense (already masked) OIHW float32 weight."""
    if layout != "NCHW":
        raise ValueError(f"only NCHW layout is supported, got {layout!r}")
    weight = np.asarray(weight)  # rank is checked by Conv2dSpec.create, dtype by BlockSparseWeight.from_dense
    spec = Conv2dSpec.create(input_shape, weight.shape, stride, padding, dilation)
    info = resolve_target(target, vector_width)
    return CompiledSparseConv2d(weight, spec, bias, activation, info, schedule)
