"""The SIMD-block sparse format: exact round trips, the keep rule, padding of the last block, bad input."""
import numpy as np
import pytest

from alcs_tvm.sparse_format import BlockSparseWeight, block_mask, num_blocks, random_block_sparse


@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (35, 8, 1, 1), (5, 3, 7, 7), (64, 10)])
@pytest.mark.parametrize("vector_width", [4, 8, 16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_round_trip_is_exact(shape, vector_width, sparsity):
    rng = np.random.default_rng(0)
    weight = random_block_sparse(rng.standard_normal(shape).astype(np.float32), vector_width, sparsity, rng)
    sparse = BlockSparseWeight.from_dense(weight, vector_width)
    dense = sparse.to_dense()
    assert np.array_equal(dense, weight.reshape(dense.shape))
    assert sparse.num_blocks == num_blocks(shape[0], vector_width)
    assert sparse.values.shape == (sparse.nnz_blocks, vector_width)
    assert sparse.indptr[0] == 0 and sparse.indptr[-1] == sparse.nnz_blocks
    assert np.all(np.diff(sparse.indptr) >= 0)
    assert sparse.density == pytest.approx(1.0 - sparsity, abs=1.0 / (sparse.num_blocks * sparse.positions_per_block))


def test_block_kept_iff_any_lane_nonzero():
    weight = np.zeros((8, 2, 1, 1), np.float32)
    weight[5, 1, 0, 0] = 3.0  # one lane of block 1 at position 1
    sparse = BlockSparseWeight.from_dense(weight, 4)
    assert sparse.nnz_blocks == 1
    assert list(sparse.indptr) == [0, 0, 1]
    assert list(sparse.indices) == [1]
    assert list(sparse.values[0]) == [0.0, 3.0, 0.0, 0.0]
    assert block_mask(weight, 4).tolist() == [[False, False], [False, True]]


def test_unstructured_sparsity_converts_exactly_with_less_benefit():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.5] = 0  # element-wise 50%: almost every 4-block keeps a lane
    sparse = BlockSparseWeight.from_dense(weight, 4)
    assert np.array_equal(sparse.to_dense(), weight)
    assert sparse.density > 0.9


def test_position_coords_follow_oihw():
    weight = np.zeros((4, 3, 2, 5), np.float32)
    weight[0, 2, 1, 4] = 1.0
    sparse = BlockSparseWeight.from_dense(weight, 4)
    cin, kh, kw = sparse.position_coords()
    assert (cin[0], kh[0], kw[0]) == (2, 1, 4)


@pytest.mark.parametrize("bad, error", [
    (np.zeros((2, 3, 4), np.float32), ValueError),
    (np.zeros((4, 4, 3, 3), np.float64), TypeError),
    (np.zeros((0, 4, 3, 3), np.float32), ValueError),
])
def test_bad_weights_are_named(bad, error):
    with pytest.raises(error, match="weight"):
        BlockSparseWeight.from_dense(bad, 4)


def test_bad_vector_width():
    with pytest.raises(ValueError, match="vector width"):
        BlockSparseWeight.from_dense(np.ones((4, 4, 1, 1), np.float32), 0)


def test_group_widths_per_target_and_layer():
    """AVX-512 and NEON groups are two registers (32 / 8 channels) where a layer's output channels make two or more;
    an explicit width is every layer's; AVX2 uses its register width."""
    from alcs_tvm.sparse_format import layer_group_width
    from alcs_tvm.target import resolve_target

    avx512 = resolve_target("x86-avx512")
    assert (avx512.vector_width, avx512.group_widths()) == (16, (32, 16))
    assert [avx512.group_width(c) for c in (64, 96, 48, 32, 24, 16)] == [32, 32, 16, 16, 16, 16]
    assert resolve_target("x86-avx512", 16).group_widths() == (16,)
    assert resolve_target("x86-avx512", 32).group_width(48) == 32  # explicit: one width, padded blocks
    assert resolve_target("x86-avx2").group_width(64) == 8
    arm64 = resolve_target("arm64")  # two q registers per group where Cout allows (docs/arm64.md)
    assert (arm64.vector_width, arm64.group_widths()) == (4, (8, 4))
    assert [arm64.group_width(c) for c in (64, 24, 16, 12, 8)] == [8, 8, 8, 4, 4]
    assert resolve_target("arm64", 4).group_widths() == (4,)
    assert layer_group_width(avx512, 64) == 32 and layer_group_width(8, 64) == 8


def test_widest_block_format_keeps_the_pruning_structure():
    """A weight pruned in 32-channel groups converts to 32-wide blocks; one pruned in 16-channel groups keeps
    16-wide blocks (in 32-wide ones it would lose most of its sparsity); a dense one takes the widest."""
    from alcs_tvm.sparse_format import widest_block_format

    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 16, 3, 3)).astype(np.float32)
    assert widest_block_format(w, (32, 16)).vector_width == 32
    pruned32 = random_block_sparse(w, 32, 0.8, rng)
    pruned16 = random_block_sparse(w, 16, 0.8, rng)
    assert widest_block_format(pruned32, (32, 16)).vector_width == 32
    narrow = widest_block_format(pruned16, (32, 16))
    assert narrow.vector_width == 16 and narrow.density == pytest.approx(0.2, abs=0.03)
    assert widest_block_format(w[:48], (32, 16)).vector_width == 16  # 48 channels: no whole 32-groups
    assert widest_block_format(w[:32], (32, 16)).vector_width == 16  # one group only


def test_a_partial_last_block_takes_the_wide_width_when_the_narrow_one_is_partial_too():
    """1000 output channels leave a partial 16-wide block anyway: 32-wide blocks (the last one partial) feed each
    broadcast input to twice the lanes. Not where they compute many more lanes (72 channels), where the narrow
    width divides the channels, with fewer than two wide groups, or for a weight pruned in 16-wide groups."""
    from alcs_tvm.sparse_format import widest_block_format

    rng = np.random.default_rng(4)
    w = rng.standard_normal((1000, 8, 1, 1)).astype(np.float32)
    wide = widest_block_format(w, (32, 16))
    assert (wide.vector_width, wide.num_blocks) == (32, 32)
    np.testing.assert_array_equal(wide.to_dense(), w)
    assert widest_block_format(w[:120], (32, 16)).vector_width == 32  # 128 lanes either way
    assert widest_block_format(w[:72], (32, 16)).vector_width == 16  # 96 lanes against 80
    assert widest_block_format(w[:40], (32, 16)).vector_width == 16  # one whole 32-group and a partial one
    assert widest_block_format(w[:48], (32, 16)).vector_width == 16  # whole 16-groups: no wasted lanes
    assert widest_block_format(random_block_sparse(w, 16, 0.8, rng), (32, 16)).vector_width == 16
