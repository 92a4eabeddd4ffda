"""The sparse conv2d operator: conv geometry, packing a :class:`BlockSparseWeight` for a kernel, the PrimFunc.

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

from .schedules import SparseConvSchedule, default_sparse_conv_schedule
from .schedules.sparse_conv2d_cpu import KernelGeometry, activation_buffer_offsets, sparse_conv2d_template
from .sparse_format import BlockSparseWeight, widest_block_format
from .target import TargetInfo, resolve_target

__all__ = ["Conv2dSpec", "PackedSparseConv2d", "SparseConv2dKernel", "pack_sparse_conv2d", "balanced_block_order",
           "max_run_length",
           "sparse_conv2d_kernel", "build_sparse_conv2d", "CompiledSparseConv2d"]


def normalize_pair(value, name: str) -> tuple:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value}")
    return value


def normalize_padding(value) -> tuple:
    """Normalise padding to ``(top, left, bottom, right)`` (ONNX order is top, left, bottom, right)."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * 4
    value = tuple(int(v) for v in value)
    if len(value) == 2:
        return value[0], value[1], value[0], value[1]
    if len(value) == 4:
        return value
    raise ValueError(f"padding must be an int, (pad_h, pad_w) or (top, left, bottom, right), got {value}")


@dataclass(frozen=True)
class Conv2dSpec:
    """Geometry of one NCHW/OIHW ``groups == 1`` convolution."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple  # (kh, kw)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)  # (top, left, bottom, right)
    dilation: tuple = (1, 1)

    @classmethod
    def create(cls, input_shape, weight_shape, stride=1, padding=0, dilation=1) -> "Conv2dSpec":
        input_shape = tuple(int(d) for d in input_shape)
        weight_shape = tuple(int(d) for d in weight_shape)
        if len(input_shape) != 4:
            raise ValueError(f"conv input must be 4-D NCHW, got shape {input_shape}")
        if len(weight_shape) != 4:
            raise ValueError(f"conv weight must be 4-D OIHW, got shape {weight_shape}")
        if input_shape[1] != weight_shape[1]:
            if weight_shape[1] and input_shape[1] % weight_shape[1] == 0:
                raise ValueError(
                    f"grouped convolution (groups={input_shape[1] // weight_shape[1]}) is not supported by the "
                    f"sparse operator: input has {input_shape[1]} channels, weight {weight_shape[1]}")
            raise ValueError(f"input channels {input_shape[1]} do not match weight input channels "
                             f"{weight_shape[1]} (input {input_shape}, weight {weight_shape})")
        spec = cls(input_shape[0], input_shape[1], input_shape[2], input_shape[3], weight_shape[0],
                   weight_shape[2:], normalize_pair(stride, "stride"), normalize_padding(padding),
                   normalize_pair(dilation, "dilation"))
        spec.validate()
        return spec

    def validate(self):
        if min(self.batch, self.in_channels, self.height, self.width, self.out_channels, *self.kernel) < 1:
            raise ValueError(f"conv dimensions must be positive: {self}")
        if min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"invalid stride/dilation/padding: {self.stride}/{self.dilation}/{self.padding}")
        if self.out_height < 1 or self.out_width < 1:
            raise ValueError(f"conv output would be empty ({self.out_height}x{self.out_width}) for {self}")

    @property
    def padded_height(self) -> int:
        return self.height + self.padding[0] + self.padding[2]

    @property
    def padded_width(self) -> int:
        return self.width + self.padding[1] + self.padding[3]

    @property
    def out_height(self) -> int:
        return (self.padded_height - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1

    @property
    def out_width(self) -> int:
        return (self.padded_width - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1

    @property
    def input_shape(self) -> tuple:
        return self.batch, self.in_channels, self.height, self.width

    @property
    def weight_shape(self) -> tuple:
        return (self.out_channels, self.in_channels) + tuple(self.kernel)

    @property
    def output_shape(self) -> tuple:
        return self.batch, self.out_channels, self.out_height, self.out_width

    @property
    def dense_flops(self) -> int:
        return 2 * self.batch * self.out_channels * self.out_height * self.out_width * \
            self.in_channels * self.kernel[0] * self.kernel[1]

    def describe(self) -> str:
        kh, kw = self.kernel
        text = f"{kh}x{kw} {self.in_channels}->{self.out_channels} @{self.height}x{self.width}"
        if self.stride != (1, 1):
            text += f" s{self.stride[0]}" if self.stride[0] == self.stride[1] else f" s{self.stride}"
        if any(self.padding):
            text += f" p{self.padding[0]}" if len(set(self.padding)) == 1 else f" p{self.padding}"
        if self.dilation != (1, 1):
            text += f" d{self.dilation[0]}"
        if self.batch != 1:
            text += f" n{self.batch}"
        return text


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
    bias: np.ndarray  # float32 [nblocks * V], zero-padded (all zeros when the conv has no bias)
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


def pack_sparse_conv2d(weight: BlockSparseWeight, spec: Conv2dSpec, bias=None, input_block: int = 1,
                       max_run: int | None = None) -> PackedSparseConv2d:
    """Turn kept positions into runs with input offsets for ``spec``'s padded input layout."""
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
    packed_bias = np.zeros(weight.num_blocks * v, np.float32)
    if bias is not None:
        bias = np.asarray(bias)
        if bias.dtype != np.float32:
            raise TypeError(f"bias must be float32, got {bias.dtype}")
        if bias.shape != (spec.out_channels,):
            raise ValueError(f"bias shape {bias.shape} does not match {spec.out_channels} output channels")
        packed_bias[: spec.out_channels] = bias
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


def sparse_conv2d_kernel(weight: BlockSparseWeight, spec: Conv2dSpec, *, bias=None, activation=None,
                         target="x86", schedule: SparseConvSchedule | None = None, input_prepadded=False,
                         input_block: int = 1, output_blocked=False, output_pad=(0, 0, 0, 0),
                         input_border=None, residual=None, residual_pad=(0, 0, 0, 0), out_block: int = 0,
                         name: str = "alcs_sparse_conv2d", one_activation_buffer=False) -> SparseConv2dKernel:
    """Generate the sparse conv PrimFunc ``(x, indptr, offsets, vstart, values, bias, block_order, y)``.

    ``input_prepadded``: ``x`` already carries ``spec.padding`` as a zero border (in NCHW, or NCHW[b]c with
    ``input_block = b``); otherwise ``x`` is plain NCHW and is padded into a workspace first.
    ``output_blocked``: write NCHW[V]c (``[N, Cout/V, Ho, Wo, V]``) instead of NCHW. ``output_pad``: zero border
    (top, left, bottom, right) written around the output so the next conv can read it pre-padded.
    ``input_border``: the pre-padded input's zero border when it is wider than this conv's padding (one tensor
    read by several convs, padded for the widest); the kernel reads it with its own padding.
    ``residual``: ``"nchw"`` (``[N, Cout, Ho, Wo]``) or ``"blocked"`` (NCHW[V]c with a ``residual_pad`` border): a
    tensor added before the activation (a ResNet shortcut), passed between ``block_order`` and the output.
    ``out_block``: channels per block of a blocked output and residual (NCHW[b]c; 0: V). It must divide V: a
    group of V = 32 channels is then written as two NCHW16c blocks, so convs of different V chain in one layout.
    ``one_activation_buffer``: input, residual and output in one ``io`` argument (the profiler's cold timing).
    """
    if not isinstance(weight, BlockSparseWeight):
        raise TypeError(f"weight must be a BlockSparseWeight, got {type(weight).__name__}")
    info = resolve_target(target, weight.vector_width)
    max_run = max_run_length(spec)
    if schedule is None:
        schedule = default_sparse_conv_schedule(info.family, weight.vector_width, spec.out_height, spec.out_width,
                                                max_run, pointwise=spec.kernel == (1, 1), density=weight.density)
    if schedule.vector_width != weight.vector_width:
        raise ValueError(f"schedule vector width {schedule.vector_width} != weight's {weight.vector_width}")
    if input_block != 1 and not input_prepadded:
        raise ValueError("a channel-blocked input must come pre-padded")
    border = spec.padding if input_border is None else normalize_padding(input_border)
    if any(b < p for b, p in zip(border, spec.padding)):
        raise ValueError(f"input border {border} is narrower than the conv's padding {spec.padding}")
    if border != spec.padding and not input_prepadded:
        raise ValueError("an input border needs a pre-padded input")
    if residual is not None and residual not in ("nchw", "blocked"):
        raise ValueError(f"residual must be None, 'nchw' or 'blocked', got {residual!r}")
    if out_block and (out_block < 1 or weight.vector_width % out_block):
        raise ValueError(f"out_block {out_block} must divide the weight's vector width {weight.vector_width}")
    # offsets index the bordered buffer; the shift starts each receptive field where this conv's padding does
    buffer_spec = replace(spec, padding=tuple(border))
    packed = pack_sparse_conv2d(weight, buffer_spec, bias, input_block, max_run)
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
        out_blocked=output_blocked,
        out_pad=tuple(int(p) for p in output_pad),
        nnz=len(packed.values),
        nruns=len(packed.offsets),
        max_run=max_run,
        residual=residual,
        residual_pad=tuple(int(p) for p in residual_pad),
        vector_width=weight.vector_width,
        out_block=int(out_block),
    )
    func = sparse_conv2d_template(geom, schedule, has_bias=bias is not None, activation=activation, name=name,
                                  one_activation_buffer=one_activation_buffer)
    return SparseConv2dKernel(func, packed, geom, schedule)


class CompiledSparseConv2d:
    """One conv layer compiled for a target: NCHW in, NCHW out (plus a kernel-only variant for timing)."""

    def __init__(self, weight: np.ndarray, spec: Conv2dSpec, bias, activation, info: TargetInfo,
                 schedule: SparseConvSchedule | None):
        import tvm

        self.spec, self.info, self.activation = spec, info, activation
        self.sparse_weight = widest_block_format(weight, info.group_widths())
        self.kernel = sparse_conv2d_kernel(self.sparse_weight, spec, bias=bias, activation=activation,
                                           target=info.target, schedule=schedule)
        self.executable = tvm.compile(self.kernel.func, target=info.target)
        self._bias = bias
        self._schedule = schedule
        self._kernel_only = None

    @property
    def density(self) -> float:
        return self.sparse_weight.density

    def export_library(self, path: str, **kwargs):
        self.executable.export_library(path, **kwargs)

    def _device_args(self, kernel: SparseConv2dKernel, x: np.ndarray, device):
        import tvm

        arrays = [x] + kernel.packed.arrays() + [np.zeros(kernel.output_shape, np.float32)]
        return [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays]

    def _check_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype != np.float32:
            raise TypeError(f"input must be float32, got {x.dtype}")
        if x.shape != self.spec.input_shape:
            raise ValueError(f"input shape {x.shape} does not match the conv's {self.spec.input_shape}")
        return x

    def run(self, x: np.ndarray) -> np.ndarray:
        import tvm

        args = self._device_args(self.kernel, self._check_input(x), tvm.cpu())
        self.executable.mod["alcs_sparse_conv2d"](*args)
        return args[-1].numpy()

    def time_callable(self, x: np.ndarray):
        """A zero-argument function running one NCHW -> NCHW inference on pre-bound device tensors."""
        import tvm

        args = self._device_args(self.kernel, self._check_input(x), tvm.cpu())
        func = self.executable.mod["alcs_sparse_conv2d"]
        return lambda: func(*args)

    def kernel_time_callable(self, x: np.ndarray):
        """Like :meth:`time_callable`, but only the kernel as it runs inside a compiled model: input already
        zero-padded (written so by the previous layer), output channel-blocked NCHW[V]c."""
        import tvm

        if self._kernel_only is None:
            kernel = sparse_conv2d_kernel(self.sparse_weight, self.spec, bias=self._bias,
                                          activation=self.activation, target=self.info.target,
                                          schedule=self._schedule, input_prepadded=True, output_blocked=True)
            self._kernel_only = (kernel, tvm.compile(kernel.func, target=self.info.target))
        kernel, executable = self._kernel_only
        pt, pl, pb, pr = self.spec.padding
        padded = np.pad(self._check_input(x), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        args = self._device_args(kernel, padded, tvm.cpu())
        func = executable.mod["alcs_sparse_conv2d"]
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
