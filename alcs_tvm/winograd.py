"""Winograd F(m x m, 3 x 3) dense convolution: the weight transform and the three kernels of one conv.

A dense 3x3 stride-1 conv takes ``(m + 2)^2 / (9 m^2)`` of the direct kernel's multiplications (a quarter for
m = 4), in three steps (:mod:`alcs_tvm.schedules.winograd_cpu`): the input transform, a batched GEMM over the
``(m + 2)^2`` points, the output transform with the conv's epilogue. The GEMM is the sparse kernel itself, as a 1x1
conv with the transformed weight block-diagonal over the points (:func:`winograd_weight`), so it keeps the
kernel's register tiling, task order and schedules per target.

A pruned weight transforms to a dense one (each point mixes all nine taps), so this is the dense algorithm: it
wins over the direct sparse kernel only at low sparsity. Which conv runs which is the pass's decision.

The input comes channel-blocked and zero-bordered (NCHW[b]c, as the layout chain writes it); the output goes
out in any layout the direct kernel writes (:class:`~alcs_tvm.layer.KernelLayout`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tvm

from .kernels import SparseConv2dKernel, epilogue_slope, pack_epilogue, sparse_conv2d_kernel
from .layer import Conv2dSpec, KernelLayout, normalize_padding
from .schedules import SparseConvSchedule
from .schedules.winograd_cpu import WINOGRAD_POINTS, WinogradGeometry, winograd_input_template, winograd_matrices, \
    winograd_output_template
from .sparse_format import BlockSparseWeight
from .target import TargetInfo, resolve_target

__all__ = ["WINOGRAD_TILES", "AlgorithmCosts", "ALGORITHM_COSTS", "estimated_ms", "choose_algorithm", "winograd_layout",
           "winograd_weight", "winograd_applies", "winograd_input_block", "WinogradConv2d", "winograd_conv2d",
           "winograd_gemm_width", "CompiledWinogradConv2d", "build_winograd_conv2d", "winograd_symbol"]

#: output tile sizes m the compiler chooses from; F(6x6, 3x3) builds too (tools/bench_winograd.py measures its
#: error) but loses accuracy the issue's 1e-4 does not allow (docs/winograd.md)
WINOGRAD_TILES = (2, 4)


def winograd_applies(spec: Conv2dSpec, vector_width: int) -> str | None:
    """Why ``spec`` cannot run as Winograd, or None when it can: 3x3, stride 1, no dilation, whole V-wide output
    blocks and input channels that block by 4 or more."""
    if spec.kernel != (3, 3) or spec.stride != (1, 1) or spec.dilation != (1, 1):
        return "Winograd is for 3x3 stride-1 undilated convs"
    if spec.out_channels % vector_width:
        return f"output channels {spec.out_channels} are not whole blocks of {vector_width}"
    if spec.in_channels % 4:
        return f"input channels {spec.in_channels} do not block by 4"
    return None


@dataclass(frozen=True)
class AlgorithmCosts:
    """What the direct and Winograd kernels reach on a target, to choose between them without timing: the direct
    kernel's and the Winograd GEMM's FLOP rates, the bandwidth of memory (weights, and the transforms' bytes beyond
    the cache), the rate the transforms move their bytes at while those fit in ``cache_mbytes`` (one core's L2).
    One thread; the choice only uses their ratios (docs/winograd.md)."""

    direct_gflops: float
    gemm_gflops: float
    memory_gbytes: float
    transform_gbytes: float
    cache_mbytes: float


#: measured with tools/bench_winograd.py on the x86 host (AVX-512, 2 MB L2); arm64 keeps the same ratios until
#: measured on a phone
ALGORITHM_COSTS = {"x86-avx512": AlgorithmCosts(165, 140, 10.5, 27, 2.0)}
_DEFAULT_COSTS = ALGORITHM_COSTS["x86-avx512"]


def estimated_ms(spec: Conv2dSpec, density: float, family: str, tile: int | None) -> float:
    """Estimated time of ``spec`` at block ``density`` by the direct kernel (``tile`` None) or Winograd F(tile):
    the larger of its FLOPs and its weight traffic, plus Winograd's transforms."""
    costs = ALGORITHM_COSTS.get(family, _DEFAULT_COSTS)
    weight_bytes = 4 * spec.out_channels * spec.in_channels * 9
    if tile is None:
        return max(spec.dense_flops * density / costs.direct_gflops, weight_bytes * density / costs.memory_gbytes) \
            / 1e6
    alpha = tile + 2
    tiles = spec.batch * -(-spec.out_height // tile) * -(-spec.out_width // tile)
    flops = 2 * alpha * alpha * spec.in_channels * spec.out_channels * tiles
    gemm = max(flops / costs.gemm_gflops, weight_bytes * alpha * alpha / 9 / costs.memory_gbytes)
    # the input, the transformed input and products, the output: each written by one kernel and read by the next
    moved = 4 * (spec.batch * spec.in_channels * spec.padded_height * spec.padded_width +
                 alpha * alpha * tiles * (spec.in_channels + spec.out_channels) +
                 spec.batch * spec.out_channels * spec.out_height * spec.out_width)
    cached = min(moved, costs.cache_mbytes * 2 ** 20)
    return (gemm + cached / costs.transform_gbytes + (moved - cached) / costs.memory_gbytes) / 1e6


def choose_algorithm(spec: Conv2dSpec, density: float, info: TargetInfo) -> tuple:
    """``(tile or None, reason)``: Winograd F(tile x tile, 3x3) when it applies and is estimated faster than the
    direct kernel at this density, else None (direct)."""
    why = winograd_applies(spec, info.vector_width)
    if why:
        return None, why
    direct = estimated_ms(spec, density, info.family, None)
    tile = min(WINOGRAD_TILES, key=lambda t: estimated_ms(spec, density, info.family, t))
    winograd = estimated_ms(spec, density, info.family, tile)
    if winograd < direct:
        return tile, f"Winograd F({tile}x{tile}) est. {winograd:.3f} ms < direct {direct:.3f} ms at density " \
                     f"{density:.2f}"
    return None, f"direct est. {direct:.3f} ms <= Winograd F({tile}x{tile}) {winograd:.3f} ms at density " \
                 f"{density:.2f}"


def winograd_input_block(spec: Conv2dSpec, layout: KernelLayout, vector_width: int) -> int:
    """Lanes of the transformed input: the input layout's block when it comes blocked, else the widest of V, 8, 4
    dividing the input channels (the pass blocks an NCHW input to it)."""
    if layout.input_block > 1:
        return layout.input_block
    return next(b for b in (vector_width, 8, 4) if spec.in_channels % b == 0)


def winograd_layout(spec: Conv2dSpec, layout: KernelLayout, group_width: int, vector_width: int) -> KernelLayout:
    """How the Winograd kernels are called for a conv the pass calls as ``layout``: an NCHW input comes blocked
    and padded (the pass converts it first, to :func:`winograd_input_block` lanes), and a blocked output or
    shortcut keeps the blocks of the layer's ``group_width`` (the GEMM may run wider)."""
    if layout.input_block == 1:
        layout = replace(layout, input_prepadded=True,
                         input_block=winograd_input_block(spec, layout, vector_width))
    return replace(layout, out_block=layout.out_block or group_width)


def winograd_weight(weight: np.ndarray, tile: int, vector_width: int) -> BlockSparseWeight:
    """``U[xi] = G g G^T`` of every (out, in) filter, as the block-diagonal 1x1 weight ``[alpha^2 Cout, alpha^2 Cin]``
    the GEMM runs: output block ``xi * Cout/V + k`` keeps input channels ``xi * Cin ..`` only (computed in float64,
    stored float32)."""
    cout, cin, kh, kw = weight.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"Winograd weights are 3x3, got {kh}x{kw}")
    if cout % vector_width:
        raise ValueError(f"output channels {cout} are not a multiple of V={vector_width}")
    _, g, _ = winograd_matrices(tile)
    g = np.array(g, np.float64)
    alpha = tile + 2
    u = np.einsum("ak,oikl,bl->aboi", g, weight.astype(np.float64), g).reshape(alpha * alpha, cout, cin)
    blocks = cout // vector_width
    # values[point, block, cin, lane]: block k of point xi holds U[xi, k*V + lane, cin]
    values = u.reshape(alpha * alpha, blocks, vector_width, cin).transpose(0, 1, 3, 2)
    nb = alpha * alpha * blocks
    indptr = (np.arange(nb + 1) * cin).astype(np.int32)
    indices = (np.arange(alpha * alpha)[:, None, None] * cin + np.arange(cin)[None, None, :])
    indices = np.broadcast_to(indices, (alpha * alpha, blocks, cin)).reshape(-1).astype(np.int32)
    return BlockSparseWeight((alpha * alpha * cout, alpha * alpha * cin, 1, 1), vector_width, indptr, indices,
                             np.ascontiguousarray(values.reshape(-1, vector_width), np.float32))


def winograd_symbol(spec: Conv2dSpec, tile: int, layout: KernelLayout, stage: str) -> str:
    """``alcs_winograd4_input_c64``, ``alcs_winograd4_output_relu_res``: readable in a profile."""
    if stage == "input":
        return f"alcs_winograd{tile}_input_c{spec.in_channels}"
    epilogue = "".join(part for part, on in ((f"_{layout.activation}", layout.activation),
                                             ("_res", layout.residual)) if on)
    return f"alcs_winograd{tile}_output{epilogue}"


@dataclass(frozen=True, eq=False)
class WinogradConv2d:
    """The three PrimFuncs of one Winograd conv and their constants, in call order:
    ``input_func(x) -> v``, ``gemm.func(v, *gemm.packed.arrays()) -> mv``, ``output_func(mv, bias, [res]) -> y``."""

    geometry: WinogradGeometry
    input_func: object
    gemm: SparseConv2dKernel
    output_func: object
    bias: np.ndarray  # the bias (zeros without one), PReLU's slopes after it

    @property
    def transformed_input_shape(self) -> tuple:
        return self.geometry.transformed_input_shape

    @property
    def gemm_output_shape(self) -> tuple:
        return self.geometry.gemm_output_shape

    @property
    def output_shape(self) -> tuple:
        return self.geometry.output_shape


def winograd_gemm_width(info: TargetInfo, out_channels: int) -> int:
    """Output channels per GEMM block: the target's wide group where the channels allow it (on AVX-512 two
    registers per weight vector, so each broadcast input feeds two FMAs), else its SIMD width."""
    wide = info.group_width(out_channels)
    return wide if out_channels % wide == 0 else info.vector_width


def winograd_conv2d(weight: np.ndarray, spec: Conv2dSpec, layout: KernelLayout, *, tile: int = 4, bias=None,
                    slope=None, target="x86", schedule: SparseConvSchedule | None = None,
                    gemm_width: int | None = None) -> WinogradConv2d:
    """The Winograd kernels of a dense OIHW float32 ``weight`` at ``spec``, called as ``layout`` says (its input
    blocked and pre-padded: see :func:`winograd_input_block`). ``schedule``: the GEMM's register tile."""
    info = resolve_target(target)
    v = gemm_width or winograd_gemm_width(info, spec.out_channels)
    why = winograd_applies(spec, v)
    if why:
        raise ValueError(why)
    if tile not in WINOGRAD_POINTS:
        raise ValueError(f"Winograd tile must be one of {sorted(WINOGRAD_POINTS)}, got {tile}")
    if not layout.input_prepadded or layout.input_block < 2:
        raise ValueError("the Winograd input transform reads a pre-padded channel-blocked input")
    if layout.bias != (bias is not None):
        raise ValueError("a bias array must be given exactly when layout.bias is set")
    b = layout.input_block
    if spec.in_channels % b:
        raise ValueError(f"input channels {spec.in_channels} are not a multiple of the input block {b}")
    border = spec.padding if layout.input_border is None else normalize_padding(layout.input_border)
    if any(bd < p for bd, p in zip(border, spec.padding)):
        raise ValueError(f"input border {border} is narrower than the conv's padding {spec.padding}")
    geom = WinogradGeometry(
        batch=spec.batch, in_blocks=spec.in_channels // b, input_block=b,
        buffer_height=spec.height + border[0] + border[2], buffer_width=spec.width + border[1] + border[3],
        origin=(border[0] - spec.padding[0], border[1] - spec.padding[1]),
        out_channels=spec.out_channels, vector_width=v, out_height=spec.out_height, out_width=spec.out_width,
        tile=tile, out_blocked=layout.output_blocked, out_block=layout.out_block, out_pad=layout.output_pad,
        residual=layout.residual, residual_pad=layout.residual_pad)
    alpha = geom.alpha
    gemm_spec = Conv2dSpec.create((spec.batch, alpha * alpha * spec.in_channels, geom.tiles_high, geom.tiles_wide),
                                  (alpha * alpha * spec.out_channels, alpha * alpha * spec.in_channels, 1, 1))
    gemm_layout = KernelLayout(input_prepadded=True, input_block=b, output_blocked=True)
    gemm = sparse_conv2d_kernel(winograd_weight(weight, tile, v), gemm_spec, gemm_layout, target=info,
                                schedule=schedule, name=f"alcs_winograd{tile}_gemm")
    # the output blocks are whole (winograd_applies), so the bias needs no padding
    packed_bias = pack_epilogue(bias, epilogue_slope(layout.activation, slope, spec.out_channels),
                                spec.out_channels, spec.out_channels)
    return WinogradConv2d(
        geom,
        winograd_input_template(geom, name=winograd_symbol(spec, tile, layout, "input")),
        gemm,
        winograd_output_template(geom, has_bias=layout.bias, activation=layout.activation,
                                 name=winograd_symbol(spec, tile, layout, "output")),
        packed_bias)


class CompiledWinogradConv2d:
    """One conv compiled as Winograd for a target: NCHW in, NCHW out (tests, benchmarks), or timed as it runs in
    a model (:meth:`kernel_time_callable`: pre-padded NCHW[b]c in, NCHW[V]c out)."""

    def __init__(self, weight: np.ndarray, spec: Conv2dSpec, bias, activation, info: TargetInfo, tile: int,
                 schedule: SparseConvSchedule | None = None):
        self.spec, self.info, self.tile = spec, info, tile
        self.block = winograd_input_block(spec, KernelLayout(), info.vector_width)
        self._weight, self._bias, self._schedule = weight, bias, schedule
        self._layout = KernelLayout(bias=bias is not None, activation=activation, input_prepadded=True,
                                    input_block=self.block)
        self.nchw = self._compile(self._layout)
        self._blocked = None

    @property
    def blocked(self):
        """``(WinogradConv2d, executable)`` writing NCHW[V]c, as in a model; compiled on first use."""
        if self._blocked is None:
            self._blocked = self._compile(replace(self._layout, output_blocked=True))
        return self._blocked

    def _compile(self, layout):
        conv = winograd_conv2d(self._weight, self.spec, layout, tile=self.tile, bias=self._bias, target=self.info,
                               schedule=self._schedule)
        funcs = (conv.input_func, conv.gemm.func, conv.output_func)
        mod = tvm.IRModule({f.attrs["global_symbol"]: f for f in funcs})
        return conv, tvm.compile(mod, target=self.info.target)

    def _blocked_input(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype != np.float32 or x.shape != self.spec.input_shape:
            raise ValueError(f"input must be float32 {self.spec.input_shape}, got {x.dtype} {x.shape}")
        pt, pl, pb, pr = self.spec.padding
        n, c, h, w = x.shape
        padded = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        b = self.block
        return np.ascontiguousarray(padded.reshape(n, c // b, b, h + pt + pb, w + pl + pr).transpose(0, 1, 3, 4, 2))

    def _callable(self, compiled, x):
        conv, executable = compiled
        dev = tvm.cpu()
        arrays = [self._blocked_input(x), np.zeros(conv.transformed_input_shape, np.float32)] + \
            conv.gemm.packed.arrays() + [np.zeros(conv.gemm_output_shape, np.float32), conv.bias,
                                         np.zeros(conv.output_shape, np.float32)]
        t = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
        stage_in, gemm, stage_out = (executable.mod[f.attrs["global_symbol"]]
                                     for f in (conv.input_func, conv.gemm.func, conv.output_func))

        def call():
            stage_in(t[0], t[1])
            gemm(t[1], *t[2:8], t[8])
            stage_out(t[8], t[9], t[10])
        return call, t[10]

    def run(self, x) -> np.ndarray:
        call, out = self._callable(self.nchw, x)
        call()
        return out.numpy()

    def time_callable(self, x):
        return self._callable(self.nchw, x)[0]

    def kernel_time_callable(self, x):
        return self._callable(self.blocked, x)[0]


def build_winograd_conv2d(weight, *, input_shape, padding=1, bias=None, activation=None, target="x86", tile=4,
                          schedule: SparseConvSchedule | None = None) -> CompiledWinogradConv2d:
    """Compile one 3x3 stride-1 conv as Winograd F(tile x tile, 3x3) from a dense OIHW float32 weight."""
    weight = np.asarray(weight, np.float32)
    spec = Conv2dSpec.create(input_shape, weight.shape, 1, padding, 1)
    return CompiledWinogradConv2d(weight, spec, bias, activation, resolve_target(target), tile, schedule)
