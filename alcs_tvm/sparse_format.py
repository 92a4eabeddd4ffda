"""The SIMD-block sparse weight format, defined once for the whole project.

A conv weight ``W[Cout, Cin, Kh, Kw]`` is cut into blocks of ``V`` consecutive output channels (``V`` is the
target's SIMD width in fp32 lanes). For every block, a *position* ``(cin, kh, kw)`` is kept iff any of the
block's ``V`` weights there is non-zero; a kept position stores its ``V``-wide weight vector. Positions are kept
CSR-style: ``indptr[b]:indptr[b + 1]`` indexes ``indices`` (the flat position ``(cin * Kh + kh) * Kw + kw``) and
``values`` (``[nnz, V]``) of block ``b``.

A model pruned with SIMD structure converts losslessly and with full benefit; an unstructured one converts
exactly, with less benefit (a block position is kept as soon as one of its ``V`` weights is non-zero).
``Cout`` need not be a multiple of ``V``: the last block is zero-padded and its extra outputs are dropped.

Linear layers use the same format with ``Cin = in_features`` and ``Kh = Kw = 1``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BlockSparseWeight", "block_diagonal", "block_mask", "num_blocks", "random_block_sparse",
           "widest_block_format", "fits_wide_groups", "layer_group_width", "WIDE_BLOCK_DENSITY_SLACK"]

#: A wider block is used only if the weight is (almost) as sparse in it as in the narrowest: a model pruned in
#: narrow groups keeps its sparsity in narrow blocks.
WIDE_BLOCK_DENSITY_SLACK = 0.01

#: A wide width with a partial last block computes at most this many times the lanes of the narrow width's blocks:
#: its gain from each broadcast feeding twice the lanes is lost where it computes many more lanes than needed
#: (docs/benchmarks.md, "Partial wide blocks").
PARTIAL_WIDE_LANES = 1.0625


def num_blocks(out_channels: int, vector_width: int) -> int:
    """Output-channel blocks needed for ``out_channels`` at ``vector_width`` lanes (last one padded)."""
    return -(-out_channels // vector_width)


def layer_group_width(width, out_channels: int) -> int:
    """``width``: a group width (int), or an object whose ``group_width(out_channels)`` gives a layer's (a
    :class:`~alcs_tvm.target.TargetInfo`: the target's wide groups where the layer's channels allow them)."""
    return width.group_width(out_channels) if hasattr(width, "group_width") else int(width)


def _check_weight(weight) -> np.ndarray:
    if not isinstance(weight, np.ndarray):
        weight = np.asarray(weight)
    if weight.ndim == 2:  # Linear [out_features, in_features]
        weight = weight[:, :, None, None]
    if weight.ndim != 4:
        raise ValueError(
            f"a conv weight must be 4-D [Cout, Cin, Kh, Kw] (or 2-D for a linear layer), got shape {weight.shape}")
    if weight.dtype != np.float32:
        raise TypeError(f"only float32 weights are supported, got {weight.dtype}")
    if min(weight.shape) == 0:
        raise ValueError(f"weight has an empty dimension: shape {weight.shape}")
    return weight


def _check_vector_width(vector_width: int) -> int:
    if not isinstance(vector_width, (int, np.integer)) or vector_width < 1:
        raise ValueError(f"vector width must be a positive integer, got {vector_width!r}")
    return int(vector_width)


def block_mask(weight, vector_width: int) -> np.ndarray:
    """Boolean ``[nblocks, Cin*Kh*Kw]``: which (block, position) pairs hold any non-zero weight."""
    weight = _check_weight(weight)
    vector_width = _check_vector_width(vector_width)
    blocks = _blocked(weight, vector_width)
    return np.any(blocks != 0, axis=2)


def _blocked(weight: np.ndarray, vector_width: int) -> np.ndarray:
    """``[nblocks, positions, V]`` view of the weight, output channels zero-padded to a multiple of V."""
    cout = weight.shape[0]
    nb = num_blocks(cout, vector_width)
    flat = weight.reshape(cout, -1)
    if nb * vector_width != cout:
        flat = np.concatenate([flat, np.zeros((nb * vector_width - cout, flat.shape[1]), np.float32)])
    return flat.reshape(nb, vector_width, -1).transpose(0, 2, 1)


@dataclass(frozen=True, eq=False)
class BlockSparseWeight:
    """SIMD-block sparse conv (or linear) weight. Build with :meth:`from_dense`."""

    shape: tuple  # dense (Cout, Cin, Kh, Kw)
    vector_width: int
    indptr: np.ndarray  # int32 [nblocks + 1]
    indices: np.ndarray  # int32 [nnz]: flat (cin, kh, kw) position
    values: np.ndarray  # float32 [nnz, V]

    @classmethod
    def from_dense(cls, weight, vector_width: int, keep_all: bool = False) -> "BlockSparseWeight":
        """Convert a dense weight; ``keep_all`` keeps every block, zero or not (the dense kernel)."""
        weight = _check_weight(weight)
        vector_width = _check_vector_width(vector_width)
        blocks = _blocked(weight, vector_width)
        kept = np.ones(blocks.shape[:2], bool) if keep_all else np.any(blocks != 0, axis=2)
        indptr = np.zeros(kept.shape[0] + 1, np.int32)
        np.cumsum(kept.sum(axis=1), out=indptr[1:])
        block_ids, positions = np.nonzero(kept)  # row-major: grouped by block, positions ascending
        values = np.ascontiguousarray(blocks[block_ids, positions], dtype=np.float32)
        return cls(tuple(int(d) for d in weight.shape), vector_width, indptr,
                   positions.astype(np.int32), values.reshape(-1, vector_width))

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def in_channels(self) -> int:
        return self.shape[1]

    @property
    def kernel_size(self) -> tuple:
        return self.shape[2], self.shape[3]

    @property
    def num_blocks(self) -> int:
        return len(self.indptr) - 1

    @property
    def positions_per_block(self) -> int:
        return self.shape[1] * self.shape[2] * self.shape[3]

    @property
    def nnz_blocks(self) -> int:
        """Number of kept V-wide weight vectors."""
        return int(self.indptr[-1])

    @property
    def density(self) -> float:
        """Fraction of (block, position) vectors kept: the fraction of dense FMAs the sparse kernel does."""
        return self.nnz_blocks / (self.num_blocks * self.positions_per_block)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def block_nnz(self) -> np.ndarray:
        return np.diff(self.indptr)

    def position_coords(self) -> tuple:
        """``(cin, kh, kw)`` int arrays of every kept entry, in storage order."""
        kh, kw = self.kernel_size
        return self.indices // (kh * kw), (self.indices // kw) % kh, self.indices % kw

    def to_dense(self) -> np.ndarray:
        cout, cin, kh, kw = self.shape
        v = self.vector_width
        blocks = np.zeros((self.num_blocks, self.positions_per_block, v), np.float32)
        block_ids = np.repeat(np.arange(self.num_blocks), self.block_nnz())
        blocks[block_ids, self.indices] = self.values
        dense = blocks.transpose(0, 2, 1).reshape(self.num_blocks * v, cin, kh, kw)
        return np.ascontiguousarray(dense[:cout])

    def __repr__(self) -> str:
        return (f"BlockSparseWeight(shape={self.shape}, V={self.vector_width}, "
                f"nnz_blocks={self.nnz_blocks}, density={self.density:.3f})")


def fits_wide_groups(out_channels: int, width: int) -> bool:
    """``out_channels`` split into two or more whole groups of ``width``: no lanes wasted, and the kernel keeps its
    parallelism over output blocks and the pruner its choice across output channels."""
    return int(out_channels) % width == 0 and int(out_channels) >= 2 * width


def widest_block_format(weight, widths, slack: float = WIDE_BLOCK_DENSITY_SLACK) -> BlockSparseWeight:
    """``weight`` in the widest of ``widths`` (widest first, the last one the fallback) that divides its output
    channels into two groups or more (the rule of :meth:`alcs_tvm.target.TargetInfo.group_width`), or that still
    makes two groups or more where even the narrowest leaves its last block partial and computes at most
    :data:`PARTIAL_WIDE_LANES` more lanes than it (a 1000-class conv classifier: each broadcast input feeds twice
    the lanes), and keeps its block density within ``slack`` of the density in the narrowest width."""
    widths = [int(w) for w in widths]
    narrow = BlockSparseWeight.from_dense(weight, widths[-1])
    channels, narrow_lanes = narrow.out_channels, narrow.num_blocks * narrow.vector_width

    def partial_but_cheap(width):
        return narrow_lanes > channels and channels >= 2 * width and \
            num_blocks(channels, width) * width <= PARTIAL_WIDE_LANES * narrow_lanes
    for width in widths[:-1]:
        if fits_wide_groups(channels, width) or partial_but_cheap(width):
            wide = BlockSparseWeight.from_dense(weight, width)
            if wide.density <= narrow.density + slack:
                return wide
    return narrow


def random_block_sparse(weight, vector_width: int, sparsity: float, rng=None) -> np.ndarray:
    """``weight`` with a uniformly random ``sparsity`` fraction of its (block, position) V-vectors zeroed.

    Used to make benchmark and latency-table layers at a chosen SIMD-block sparsity."""
    weight = _check_weight(weight)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    rng = np.random.default_rng(rng)
    nb = num_blocks(weight.shape[0], vector_width)
    positions = weight.shape[1] * weight.shape[2] * weight.shape[3]
    total = nb * positions
    drop = rng.permutation(total)[: int(round(sparsity * total))]
    keep = np.ones(total, bool)
    keep[drop] = False
    channel_keep = np.repeat(keep.reshape(nb, 1, positions), vector_width, axis=1)
    channel_keep = channel_keep.reshape(nb * vector_width, positions)[: weight.shape[0]]
    return (weight.reshape(weight.shape[0], -1) * channel_keep).reshape(weight.shape).astype(np.float32)


def block_diagonal(weight: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv's weight ``[Cout, Cin/groups, Kh, Kw]`` as the weight ``[Cout, Cin, Kh, Kw]`` of the conv over
    all input channels that computes the same: output channel ``o`` reads only its group's input channels, so the
    zeros outside the groups are whole SIMD blocks wherever a block's channels lie in one group."""
    cout, cin_per_group = weight.shape[:2]
    full = np.zeros((cout, cin_per_group * groups) + tuple(weight.shape[2:]), np.float32)
    per_group = cout // groups
    for g in range(groups):
        rows = slice(g * per_group, (g + 1) * per_group)
        full[rows, g * cin_per_group:(g + 1) * cin_per_group] = weight[rows]
    return full
