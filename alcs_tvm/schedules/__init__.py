"""Hand-written schedules per target family.

The sparse convolution's inner loop runs over a data-dependent range (the kept positions of one output-channel
block), which block-level ``s_tir.Schedule`` primitives (vectorize/parallel/cache_write) cannot transform. So the
sparse kernel is written directly as a loop-level TIR template (:mod:`.sparse_conv2d_cpu`) whose knobs - vector
width, register tile, loop order - are chosen per target here (:mod:`.x86`, :mod:`.arm64`). Data-parallel stages
around it that do have block structure (layout transforms, padding) are scheduled with ``s_tir.Schedule``.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import arm64, x86

__all__ = ["SparseConvSchedule", "default_sparse_conv_schedule", "register_budget", "registers_per_group",
           "choose_tile", "prefetches_next_block", "loads_bias_per_accumulator",
           "splits_tasks_per_tile"]


@dataclass(frozen=True)
class SparseConvSchedule:
    """Knobs of the sparse conv template.

    ``tile_rows x tile_cols`` output pixels of one V-wide output block are accumulated in vector registers while
    the kept positions of the block stream by; so a kept weight vector is loaded once per tile and used for
    ``tile_rows * tile_cols`` FMAs. ``max_accumulators`` bounds that product by the register file (a V-wide
    accumulator each, plus the weight vector and a few temporaries).

    Block-outer task order keeps one block's weights hot while its row tiles stream the input; row-outer keeps
    one row tile's input hot while the blocks stream by, which wins when blocks keep few positions (high
    sparsity, few input channels) and the input rows, not the weights, are what misses the cache.
    """

    vector_width: int
    tile_rows: int
    tile_cols: int
    row_outer: bool = False  # task order (n, row tile, block) instead of (n, block, row tile)

    def __post_init__(self):
        for name in ("vector_width", "tile_rows", "tile_cols"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def accumulators(self) -> int:
        return self.tile_rows * self.tile_cols

    def describe(self) -> str:
        """``"2x14"`` or ``"4x7 row-outer"``."""
        return f"{self.tile_rows}x{self.tile_cols}" + (" row-outer" if self.row_outer else "")


def choose_tile(out_height: int, out_width: int, max_accumulators: int, max_cols: int) -> tuple:
    """Pick ``(tile_rows, tile_cols)``: columns first (contiguous input along a row), preferring a width that
    divides the output width (no remainder tile), then as many rows as the register budget allows."""
    max_cols = max(1, min(max_cols, max_accumulators))
    if out_width <= max_cols:
        cols = out_width
    else:
        divisors = [c for c in range(max_cols, max(3, max_cols // 2) - 1, -1) if out_width % c == 0]
        cols = divisors[0] if divisors else max_cols
    rows = max(1, min(out_height, max_accumulators // cols))
    while rows > 1 and out_height % rows and out_height % rows < rows // 2:
        rows -= 1  # avoid a remainder tile that wastes most of the register tile
    return rows, cols


_NATIVE_LANES = {"x86-avx512": 16, "x86-avx2": 8, "arm64": 4}


def registers_per_group(family: str, vector_width: int) -> int:
    """Vector registers one accumulator of a ``vector_width``-wide group takes (2 for V=32 on AVX-512)."""
    return max(1, vector_width // _NATIVE_LANES.get(family, vector_width))


def register_budget(family: str, vector_width: int, max_run: int = 1) -> tuple:
    """``(max_accumulators, max_cols)`` of the register tile, in group-wide accumulators: the target's register
    file less the weight vectors and broadcast input a run of ``max_run`` taps keeps live."""
    module = x86 if family.startswith("x86") else arm64
    max_accumulators, max_cols = module.register_budget(family, vector_width)
    registers = registers_per_group(family, vector_width)
    return max(1, (max_accumulators - 2 * (max_run - 1)) // registers), max(1, max_cols // registers)


#: below this block density an x86 1x1 conv gets half the register tile (see default_sparse_conv_schedule)
POINTWISE_SMALL_TILE_DENSITY = 0.35


def default_sparse_conv_schedule(family: str, vector_width: int, out_height: int, out_width: int,
                                 max_run: int = 1, *, pointwise: bool = False,
                                 density: float = 1.0) -> SparseConvSchedule:
    """The hand-picked default knobs for a target family (``x86-avx512``, ``x86-avx2``, ``arm64``, ``generic``).
    Runs of ``max_run`` taps keep that many weight vectors (and a broadcast input) live next to the accumulators.

    ``pointwise`` (a 1x1 conv) on x86: row-outer task order, tiles of at most half the usual columns, and half the
    register tile when the block density is under :data:`POINTWISE_SMALL_TILE_DENSITY`, chosen from ``alcs tune``
    measurements of MobileNetV2's 1x1 layers (docs/benchmarks.md): a 1x1 block keeps few positions, so keeping a
    row tile's input hot across all blocks beats keeping one block's weights hot, and a smaller tile writes its
    outputs sooner. 3x3 convs keep the register-file default; arm64 keeps it too until measured on hardware."""
    max_accumulators, max_cols = register_budget(family, vector_width, max_run)
    if pointwise and family.startswith("x86") and registers_per_group(family, vector_width) > 1:
        # one row of max_cols pixels in block order: on MobileNetV2's 1x1 layers at V=32 faster than the
        # one-register rule below and close to the best of the tuner's tiles at every density
        # (tools/bench_schedules.py, docs/benchmarks.md)
        return SparseConvSchedule(vector_width, 1, min(out_width, max_cols), False)
    row_outer = pointwise and family.startswith("x86")
    if row_outer:  # taller tiles (4x7 rather than 2x14) for 1x1 convs
        max_cols //= 2
        if density < POINTWISE_SMALL_TILE_DENSITY:
            max_accumulators //= 2
    rows, cols = choose_tile(out_height, out_width, max(1, max_accumulators), max(1, max_cols))
    return SparseConvSchedule(vector_width, rows, cols, row_outer)


def prefetches_next_block(family: str) -> bool:
    """Whether the sparse kernel prefetches the next output block's weights during a block's second row tile
    (:func:`~.sparse_conv2d_cpu.sparse_conv2d_template`): on x86, where it was measured to pay inside models
    (docs/benchmarks.md). The arm64 loop stays as its ``llvm-mca`` estimate was made until measured on a phone."""
    return family.startswith("x86")


def loads_bias_per_accumulator(family: str, out_width: int, schedule: SparseConvSchedule, activation,
                               tile_tasks: bool = False) -> bool:
    """Whether the sparse kernel's accumulators each load their own copy of the bias
    (:func:`.arm64.loads_bias_per_accumulator`): on arm64, chosen by the ``llvm-mca`` estimate (docs/arm64.md).
    x86 keeps one bias per block: the variant was estimated on the arm64 models only."""
    if family != "arm64" or schedule.vector_width % 4:
        return False
    return arm64.loads_bias_per_accumulator(out_width, min(schedule.tile_cols, out_width), activation, tile_tasks)


def splits_tasks_per_tile(family: str, pointwise: bool, out_height: int, out_width: int,
                          schedule: SparseConvSchedule, activation) -> bool:
    """Whether each register tile of the sparse kernel is its own parallel task (:func:`.arm64.splits_tasks_per_tile`,
    arm64 only, chosen by the ``llvm-mca`` estimate; x86 keeps its measured row-tile tasks)."""
    if family != "arm64" or schedule.row_outer:
        return False
    return arm64.splits_tasks_per_tile(pointwise, out_height, out_width, min(schedule.tile_rows, out_height),
                                       min(schedule.tile_cols, out_width), activation)

