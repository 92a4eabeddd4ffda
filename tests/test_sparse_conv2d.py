"""The sparse conv2d operator against torch.nn.functional.conv2d on the same masked weight and input (x86).

Every case compiles real code; the cases built for an explicit x86 SIMD width run only on a host that has it (an
AVX-512 host runs both widths).
"""
import functools

import numpy as np
import pytest
import helpers
from helpers import skip_unless_host_runs, stable_seed, torch_conv

from alcs_tvm.kernels import build_sparse_conv2d, sparse_conv2d_kernel
from alcs_tvm.layer import Conv2dSpec, KernelLayout
from alcs_tvm.schedules import SparseConvSchedule
from alcs_tvm.sparse_format import BlockSparseWeight, random_block_sparse

RTOL = 1e-5
V = helpers.host_vector_width()  # what the default target ("x86") builds for


def make_case(seed, cin, cout, hw, kernel, sparsity, vector_width, batch=1, bias=False):
    rng = np.random.default_rng(seed)
    h, w = (hw, hw) if isinstance(hw, int) else hw
    weight = rng.standard_normal((cout, cin, kernel, kernel)).astype(np.float32)
    weight = random_block_sparse(weight, vector_width, sparsity, rng)
    x = rng.standard_normal((batch, cin, h, w)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32) if bias else None
    return x, weight, b


assert_close = functools.partial(helpers.assert_close, rtol=RTOL, scale_floor=1.0)  # atol RTOL*max(1, |ref|)


# (cin, cout, hw, kernel, stride, padding, dilation): the layer shapes of the matrix
GEOMETRIES = {
    "1x1": (24, 48, 12, 1, 1, 0, 1),
    "1x1-s2": (16, 32, 13, 1, 2, 0, 1),
    "3x3-p1": (16, 32, 14, 3, 1, 1, 1),
    "3x3-s2-p1": (16, 32, 15, 3, 2, 1, 1),
    "3x3-p0": (8, 16, 9, 3, 1, 0, 1),
    "3x3-asym": (8, 16, 10, 3, 1, (0, 1, 2, 1), 1),
    "3x3-dil2": (8, 32, 12, 3, 1, 2, 2),
    "5x5-p2": (8, 16, 11, 5, 1, 2, 1),
    "7x7-s2-stem": (3, 32, 32, 7, 2, 3, 1),
    "cout-not-multiple": (8, 37, 10, 3, 1, 1, 1),
    "wide-remainders": (8, 16, (5, 31), 3, 1, 1, 1),
}


@pytest.mark.parametrize("vector_width, target", [
    pytest.param(16, "x86-avx512", marks=skip_unless_host_runs("x86-avx512")),
    pytest.param(8, "x86-avx2", marks=skip_unless_host_runs("x86-avx2"))])
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_geometries_and_sparsities(name, sparsity, vector_width, target):
    cin, cout, hw, kernel, stride, padding, dilation = GEOMETRIES[name]
    x, weight, _ = make_case(stable_seed(name, sparsity), cin, cout, hw, kernel, sparsity, vector_width)
    op = build_sparse_conv2d(weight, input_shape=x.shape, stride=stride, padding=padding, dilation=dilation,
                             target=target)
    assert op.info.vector_width == vector_width
    assert_close(op.run(x), torch_conv(x, weight, None, stride, padding, dilation, None))


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch", [1, 4])
def test_bias_activation_batch(activation, bias, batch):
    x, weight, b = make_case(7, 16, 40, 9, 3, 0.5, 16, batch=batch, bias=bias)
    x *= 3  # push some outputs above 6 so relu6 clips
    op = build_sparse_conv2d(weight, input_shape=x.shape, stride=1, padding=1, bias=b, activation=activation)
    assert_close(op.run(x), torch_conv(x, weight, b, 1, 1, 1, activation))


@pytest.mark.parametrize("activation", [None, "relu6"])
def test_fully_pruned_layer_outputs_bias_and_activation(activation):
    x, weight, b = make_case(3, 8, 20, 6, 3, 1.0, 16, bias=True)
    assert not weight.any()
    op = build_sparse_conv2d(weight, input_shape=x.shape, padding=1, bias=b, activation=activation)
    assert op.sparse_weight.nnz_blocks == 0
    expected = np.broadcast_to(b[None, :, None, None], (1, 20, 6, 6))
    if activation == "relu6":
        expected = np.clip(expected, 0, 6)
    assert_close(op.run(x), expected)


@pytest.mark.parametrize("tile", [(1, 1), (1, 5), (3, 4), (2, 14)])
@pytest.mark.parametrize("row_outer", [False, True])
def test_schedule_knobs_do_not_change_results(tile, row_outer):
    x, weight, b = make_case(11, 16, 32, (11, 13), 3, 0.7, V, batch=2, bias=True)
    schedule = SparseConvSchedule(V, tile[0], tile[1], row_outer=row_outer)
    op = build_sparse_conv2d(weight, input_shape=x.shape, padding=1, bias=b, activation="relu", schedule=schedule)
    assert_close(op.run(x), torch_conv(x, weight, b, 1, 1, 1, "relu"))


def call_kernel(kernel, arrays):
    """Compile a kernel's PrimFunc for the generic LLVM host target, call it on ``arrays``; return them after the
    call (outputs are written in place)."""
    import tvm

    executable = tvm.compile(kernel.func, target={"kind": "llvm"})
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu()) for a in arrays]
    executable.mod[kernel.func.attrs["global_symbol"]](*args)
    return [a.numpy() for a in args]


def run_kernel(kernel, x, extra=()):
    """The kernel's output for input ``x`` (and ``extra`` arrays after the weight's, e.g. a shortcut), its output
    buffer filled with NaN first so that every element it leaves unwritten shows."""
    arrays = [x] + kernel.packed.arrays() + list(extra) + [np.full(kernel.output_shape, np.nan, np.float32)]
    return call_kernel(kernel, arrays)[-1]


@pytest.mark.parametrize("input_block", [1, 4])
@pytest.mark.parametrize("output_pad", [(0, 0, 0, 0), (1, 1, 1, 1), (0, 2, 1, 0)])
def test_model_layouts_prepadded_blocked_in_and_out(input_block, output_pad):
    """The layouts a compiled model chains: padded (optionally NCHW[b]c) input, NCHW[V]c output with a zero
    border for the next layer."""
    x, weight, b = make_case(5, 16, 36, 10, 3, 0.5, 8, bias=True)
    spec = Conv2dSpec.create(x.shape, weight.shape, 2, 1, 1)
    layout = KernelLayout(bias=b is not None, activation="relu", input_prepadded=True, input_block=input_block,
                          output_blocked=True, output_pad=output_pad)
    kernel = sparse_conv2d_kernel(BlockSparseWeight.from_dense(weight, 8), spec, layout, bias=b,
                                  target={"kind": "llvm"})
    out = run_kernel(kernel, helpers.blocked(x, input_block, (1, 1, 1, 1)))
    top, left, bottom, right = output_pad
    ref = torch_conv(x, weight, b, 2, 1, 1, "relu")
    n, cout, ho, wo = ref.shape
    assert out.shape == (n, 5, ho + top + bottom, wo + left + right, 8)  # 36 channels -> 5 blocks of 8
    interior = out[:, :, top:top + ho, left:left + wo, :]
    unblocked = interior.transpose(0, 1, 4, 2, 3).reshape(n, 40, ho, wo)
    assert_close(unblocked[:, :cout], ref)
    border = np.ones(out.shape, bool)
    border[:, :, top:top + ho, left:left + wo, :] = False
    assert np.all(out[border] == 0)


@pytest.mark.parametrize("kernel_size, stride, pad, border", [(1, 2, 0, (1, 1, 1, 1)), (3, 1, 1, (2, 1, 1, 2)),
                                                              (3, 2, 1, (1, 1, 1, 1))])
def test_input_border_wider_than_padding(kernel_size, stride, pad, border):
    """One tensor read by several convs carries the widest padding; each conv reads it with its own (ResNet's
    1x1 stride-2 shortcut conv reads the 3x3 conv's border-1 input)."""
    x, weight, b = make_case(7, 16, 32, 9, kernel_size, 0.5, 8, bias=True)
    spec = Conv2dSpec.create(x.shape, weight.shape, stride, pad, 1)
    layout = KernelLayout(bias=b is not None, input_prepadded=True, input_block=8, input_border=border)
    kernel = sparse_conv2d_kernel(BlockSparseWeight.from_dense(weight, 8), spec, layout, bias=b,
                                  target={"kind": "llvm"})
    assert_close(run_kernel(kernel, helpers.blocked(x, 8, border)), torch_conv(x, weight, b, stride, pad, 1, None))


@pytest.mark.parametrize("residual, blocked_out", [("nchw", False), ("blocked", True), ("nchw", True),
                                                   ("blocked", False)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_residual_added_before_activation(residual, blocked_out, activation):
    """conv + bias + shortcut -> activation in one kernel (a ResNet basic block's second conv and its add)."""
    x, weight, b = make_case(8, 16, 36, 10, 3, 0.6, 8, bias=True)  # 36 channels: a partial last block
    spec = Conv2dSpec.create(x.shape, weight.shape, 1, 1, 1)
    shortcut = np.random.default_rng(9).standard_normal((1, 36, 10, 10)).astype(np.float32)
    res_pad = (1, 1, 1, 1) if residual == "blocked" else (0, 0, 0, 0)
    layout = KernelLayout(bias=b is not None, activation=activation, output_blocked=blocked_out, residual=residual,
                          residual_pad=res_pad)
    kernel = sparse_conv2d_kernel(BlockSparseWeight.from_dense(weight, 8), spec, layout, bias=b,
                                  target={"kind": "llvm"})
    res = helpers.blocked(shortcut, 8, res_pad) if residual == "blocked" else shortcut
    assert kernel.residual_shape == res.shape
    out = run_kernel(kernel, x, [res])
    if blocked_out:
        out = out.transpose(0, 1, 4, 2, 3).reshape(1, 40, 10, 10)[:, :36]
    ref = torch_conv(x, weight, b, 1, 1, 1, None) + shortcut
    assert_close(out, np.maximum(ref, 0) if activation == "relu" else ref)


@pytest.mark.parametrize("residual", [None, "nchw"])
@pytest.mark.parametrize("prepadded", [False, True])
def test_one_activation_buffer_variant_computes_the_same(residual, prepadded):
    """The profiler's cold-timing twin: input, shortcut and output side by side in one ``io`` argument."""
    x, weight, b = make_case(11, 16, 36, 10, 3, 0.6, 8, bias=True)
    spec = Conv2dSpec.create(x.shape, weight.shape, 1, 1, 1)
    shortcut = np.random.default_rng(12).standard_normal((1, 36, 10, 10)).astype(np.float32)
    layout = KernelLayout(bias=b is not None, activation="relu", residual=residual, input_prepadded=prepadded)
    kernel = sparse_conv2d_kernel(BlockSparseWeight.from_dense(weight, 8), spec, layout, bias=b,
                                  target={"kind": "llvm"}, one_activation_buffer=True)
    at = kernel.activation_offsets
    assert all(at[k] % 64 == 0 for k in at) and at["y"] >= at["x"] + x.size
    xin = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))) if prepadded else x
    io = np.full(at["size"], np.nan, np.float32)
    io[at["x"]:at["x"] + xin.size] = xin.ravel()
    if residual:
        io[at["residual"]:at["residual"] + shortcut.size] = shortcut.ravel()
    arrays = [io] + kernel.packed.arrays()
    assert len(kernel.func.params) == len(arrays)
    io = call_kernel(kernel, arrays)[0]
    out = io[at["y"]:at["y"] + 36 * 100].reshape(1, 36, 10, 10)
    ref = torch_conv(x, weight, b, 1, 1, 1, None) + (shortcut if residual else 0)
    assert_close(out, np.maximum(ref, 0))
    np.testing.assert_array_equal(io[at["x"]:at["x"] + xin.size], xin.ravel())  # input untouched


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weight=np.zeros((8, 4, 3), np.float32), input_shape=(1, 4, 8, 8)), ValueError, "4-D"),
    (dict(weight=np.zeros((8, 4, 3, 3), np.float64), input_shape=(1, 4, 8, 8)), TypeError, "float32"),
    (dict(weight=np.zeros((8, 2, 3, 3), np.float32), input_shape=(1, 4, 8, 8)), ValueError, "groups=2"),
    (dict(weight=np.zeros((8, 3, 3, 3), np.float32), input_shape=(1, 4, 8, 8)), ValueError, "do not match"),
    (dict(weight=np.zeros((8, 4, 3, 3), np.float32), input_shape=(1, 4, 8)), ValueError, "4-D NCHW"),
    (dict(weight=np.zeros((8, 4, 9, 9), np.float32), input_shape=(1, 4, 4, 4)), ValueError, "empty"),
    (dict(weight=np.zeros((8, 4, 3, 3), np.float32), input_shape=(1, 4, 8, 8), activation="gelu"), ValueError,
     "activation"),
    (dict(weight=np.zeros((8, 4, 3, 3), np.float32), input_shape=(1, 4, 8, 8), bias=np.zeros(7, np.float32)),
     ValueError, "bias shape"),
    (dict(weight=np.zeros((8, 4, 3, 3), np.float32), input_shape=(1, 4, 8, 8), target="riscv"), ValueError,
     "unknown target"),
])
def test_bad_input_gets_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_sparse_conv2d(**kwargs)


def test_wrong_input_at_run_time():
    x, weight, _ = make_case(0, 8, 16, 6, 3, 0.5, 16)
    op = build_sparse_conv2d(weight, input_shape=x.shape, padding=1)
    with pytest.raises(ValueError, match="input shape"):
        op.run(np.zeros((1, 8, 7, 7), np.float32))
    with pytest.raises(TypeError, match="float32"):
        op.run(x.astype(np.float64))


def test_uneven_blocks_are_balanced_across_threads_and_stay_correct():
    """A pruned layer whose blocks keep very different numbers of positions (as importance-based pruning
    produces): the visit order halves the work evenly, and results do not depend on the order."""
    from alcs_tvm.kernels import balanced_block_order

    rng = np.random.default_rng(4)
    weight = rng.standard_normal((8 * V, 32, 3, 3)).astype(np.float32)
    for block in range(8):  # block b keeps a fraction (b + 1) / 8 of its positions
        keep = rng.random(32 * 9) < (block + 1) / 8
        weight[block * V:(block + 1) * V] *= keep.reshape(1, 32, 3, 3)
    x = rng.standard_normal((1, 32, 12, 12)).astype(np.float32)
    op = build_sparse_conv2d(weight, input_shape=x.shape, padding=1)
    nnz = op.sparse_weight.block_nnz()
    order = balanced_block_order(nnz)
    assert sorted(order) == list(range(8))
    first, second = nnz[order[:4]].sum(), nnz[order[4:]].sum()
    assert abs(int(first) - int(second)) <= nnz.max() - nnz.min()
    assert abs(int(first) - int(second)) < abs(int(nnz[:4].sum()) - int(nnz[4:].sum()))
    assert_close(op.run(x), torch_conv(x, weight, None, 1, 1, 1, None))


@pytest.mark.parametrize("residual", [None, "blocked"])
def test_wide_group_writes_narrower_blocks(residual):
    """V=32 groups (two AVX-512 registers) stored as NCHW16c blocks, with a blocked shortcut read the same way:
    what lets convs of different group widths chain in one layout."""
    x, weight, b = make_case(13, 16, 64, 9, 3, 0.7, 32, bias=True)
    spec = Conv2dSpec.create(x.shape, weight.shape, 1, 1, 1)
    shortcut = np.random.default_rng(14).standard_normal((1, 64, 9, 9)).astype(np.float32)
    layout = KernelLayout(bias=b is not None, activation="relu", output_blocked=True, output_pad=(1, 1, 1, 1),
                          residual=residual, out_block=16)
    # the schedule is AVX-512's (V=32); call_kernel compiles it for the generic LLVM target, so it runs anywhere
    kernel = sparse_conv2d_kernel(BlockSparseWeight.from_dense(weight, 32), spec, layout, bias=b,
                                  target="x86-avx512")
    assert kernel.output_shape == (1, 4, 11, 11, 16)
    out = run_kernel(kernel, x, [helpers.blocked(shortcut, 16, (0, 0, 0, 0))] if residual else [])
    assert np.all(out[:, :, 0] == 0) and np.all(out[:, :, :, -1] == 0)  # the zero border
    out = out[:, :, 1:-1, 1:-1].transpose(0, 1, 4, 2, 3).reshape(1, 64, 9, 9)
    ref = torch_conv(x, weight, b, 1, 1, 1, None) + (shortcut if residual else 0)
    assert_close(out, np.maximum(ref, 0))
    with pytest.raises(ValueError, match="must divide"):
        sparse_conv2d_kernel(BlockSparseWeight.from_dense(weight, 32), spec,
                             KernelLayout(output_blocked=True, out_block=12), target="x86-avx512")


@pytest.mark.parametrize("cout, width, residual", [(72, 16, None), (88, 32, "blocked"), (120, 32, None)])
def test_a_partial_group_writes_only_the_blocks_its_channels_fill(cout, width, residual):
    """MobileNetV3's 1x1 convs into 72, 88 and 120 channels (groups of 16 or 32, the last one partial) write the
    NCHW8c layout of the depthwise conv after them: 9, 11 and 15 blocks of 8, no block for the empty lanes of the
    last group, and a blocked shortcut read in those blocks."""
    x, weight, b = make_case(cout, 24, cout, 7, 1, 0.5, width, bias=True)
    spec = Conv2dSpec.create(x.shape, weight.shape, 1, 0, 1)
    shortcut = np.random.default_rng(15).standard_normal((1, cout, 7, 7)).astype(np.float32)
    layout = KernelLayout(bias=True, activation="relu", output_blocked=True, output_pad=(1, 0, 1, 2),
                          residual=residual, out_block=8)
    kernel = sparse_conv2d_kernel(BlockSparseWeight.from_dense(weight, width), spec, layout, bias=b,
                                  target="x86-avx512")
    assert kernel.output_shape == (1, cout // 8, 9, 9, 8)
    out = run_kernel(kernel, x, [helpers.blocked(shortcut, 8)] if residual else [])
    assert np.all(out[:, :, [0, -1]] == 0) and np.all(out[:, :, :, -2:] == 0)  # the zero border
    out = out[:, :, 1:-1, :-2].transpose(0, 1, 4, 2, 3).reshape(1, cout, 7, 7)
    ref = torch_conv(x, weight, b, 1, 0, 1, None) + (shortcut if residual else 0)
    assert_close(out, np.maximum(ref, 0))
