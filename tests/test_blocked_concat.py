"""Channel concats of rewritten convs stay channel-blocked (alcs_tvm/passes/layout_chain.py): SqueezeNet's fire
modules (with a max pool after the concat), an Inception-like block (four branches, a pool branch, readers that
need different borders), and the concats that must stay NCHW (a reader that is not a conv, an input that is not a
conv's output or is read elsewhere). Each graph is built with onnx.helper, compiled dense and with 70 % of its
SIMD blocks zeroed, and compared with ONNX Runtime; the report's rows say how each conv and concat ran."""
import numpy as np
import onnxruntime as ort
import pytest
import tvm
from helpers import OnnxGraph, host_vector_width
from onnx import helper, numpy_helper
from tvm import relax

from alcs_tvm import compiler, public_models
from alcs_tvm.target import resolve_target

RTOL = 1e-4
SPARSITIES = (0, 70)
V = host_vector_width()  # the block of the channel-blocked layouts
BLOCKED = f"NCHW{V}c"


def _run(model, x, sparsity):
    """Compile ``model`` (with ``sparsity`` percent of the SIMD blocks of its convs zeroed), check its output against
    ONNX Runtime's, and return the report's rows by name."""
    info = resolve_target("x86")
    if sparsity:
        model = public_models.prune_simd_blocks(model, info, sparsity / 100, seed=sparsity)
    executable, report = compiler.compile(model, info)
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    (expected,) = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=RTOL * float(np.abs(expected).max()))
    rows = {row.name: row for row in report.layers}
    for row in report.layers:
        if row.op == "conv2d":  # every conv ran our kernel, sparse where pruned
            assert row.symbol is not None and row.symbol.startswith("alcs_"), report.table()
            assert row.decision == ("sparse" if sparsity else "dense"), report.table()
    return rows, report


def _fire(g, src, name, cin, squeeze, expand):
    s = g.conv(src, f"{name}_squeeze", squeeze, cin, kernel=1)
    e1 = g.conv(s, f"{name}_e1", expand, squeeze, kernel=1)
    e3 = g.conv(s, f"{name}_e3", expand, squeeze, kernel=3)
    g.nodes.append(helper.make_node("Concat", [e1, e3], [f"{name}_cat"], name=f"{name}_cat", axis=1))
    return f"{name}_cat"


def _max_pool(g, src, name, kernel, stride, pads):
    g.nodes.append(helper.make_node("MaxPool", [src], [name], name=name, kernel_shape=[kernel, kernel],
                                    strides=[stride, stride], pads=pads))
    return name


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_fire_modules_join_blocked_and_the_max_pool_after_the_concat_runs_blocked(sparsity):
    """SqueezeNet: squeeze 1x1 -> expand 1x1 and expand 3x3 -> concat -> (max pool ->) the next squeeze conv."""
    g = OnnxGraph(np.random.default_rng(1))
    y = g.conv("x", "stem", 32, 3, stride=2)
    y = _fire(g, y, "fire2", 32, 16, 32)
    y = _fire(g, y, "fire3", 64, 16, 32)
    y = _max_pool(g, y, "pool3", 3, 2, [0, 0, 0, 0])
    y = _fire(g, y, "fire4", 64, 16, 48)
    y = g.conv(y, "classifier", 32, 96, kernel=1)
    x = np.random.default_rng(0).standard_normal((1, 3, 30, 30)).astype(np.float32)
    rows, report = _run(g.model(y, [1, 3, 30, 30], [1, 32, 7, 7]), x, sparsity)
    for fire in ("fire2", "fire3", "fire4"):
        cat = rows[f"{fire}_cat"]
        assert cat.op == "concat" and cat.decision == "blocked", report.table()
        assert f"joins the {BLOCKED} outputs of {fire}_e1, {fire}_e3" in cat.implementation
        for branch in ("e1", "e3"):
            row = rows[f"{fire}_{branch}"]
            assert row.kernel.output_blocked and f"writes {BLOCKED} for {fire}_cat" in row.implementation
            assert row.kernel.output_pad == (0, 0, 0, 0)  # 1x1 and pool readers need no border
        # the squeeze conv writes the 3x3's border, which the 1x1 skips
        assert rows[f"{fire}_e1"].kernel.input_border == (1, 1, 1, 1) and rows[f"{fire}_e3"].kernel.input_prepadded
    assert "for the max pool before fire4_squeeze" in rows["fire3_cat"].implementation
    assert rows["fire3_squeeze"].kernel.input_block == V and rows["fire4_squeeze"].kernel.input_block == V
    assert rows["classifier"].kernel.input_block == V
    assert not any("relax" in row.implementation for row in report.layers), report.table()


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_an_inception_block_joins_four_branches_with_the_border_its_readers_need(sparsity):
    """Four branches (1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max pool -> 1x1) joined, the join read by two 3x3 convs
    with different paddings (one-sided: the border is their widest, asymmetric), a max pool (which skips that
    border) and a 1x1 conv; those four join again into the graph's output, which stays NCHW."""
    g = OnnxGraph(np.random.default_rng(2))
    stem = g.conv("x", "stem", 32, 8)
    b1 = g.conv(stem, "b1", 16, 32, kernel=1)
    b2 = g.conv(g.conv(stem, "b2_reduce", 16, 32, kernel=1), "b2", 32, 16, kernel=3)
    b3 = g.conv(g.conv(stem, "b3_reduce", 16, 32, kernel=1), "b3", 16, 16, kernel=5)
    b4 = g.conv(_max_pool(g, stem, "b4_pool", 3, 1, [1, 1, 1, 1]), "b4", 16, 32, kernel=1)
    g.nodes.append(helper.make_node("Concat", [b1, b2, b3, b4], ["mixed"], name="mixed", axis=1))
    low = g.conv("mixed", "low", 16, 80, pads=(0, 1, 2, 1))  # 3x3 with one-sided padding: same size
    high = g.conv("mixed", "high", 16, 80, pads=(1, 1, 1, 1))
    pooled = g.conv(_max_pool(g, "mixed", "mixed_pool", 3, 1, [1, 1, 1, 1]), "pooled", 16, 80, kernel=1)
    narrow = g.conv("mixed", "narrow", 16, 80, kernel=1, act=None)
    g.nodes.append(helper.make_node("Concat", [low, high, pooled, narrow], ["out"], name="out_cat", axis=1))
    x = np.random.default_rng(0).standard_normal((1, 8, 13, 13)).astype(np.float32)
    rows, report = _run(g.model("out", [1, 8, 13, 13], [1, 64, 13, 13]), x, sparsity)
    mixed = rows["mixed"]
    assert mixed.decision == "blocked", report.table()
    assert mixed.implementation == f"joins the {BLOCKED} outputs of b1, b2, b3, b4 with a (1, 1, 2, 1) (top, left, " \
                                   "bottom, right) zero border for low, high, narrow, the max pool before pooled"
    for branch in ("b1", "b2", "b3", "b4"):
        assert rows[branch].kernel.output_blocked and rows[branch].kernel.output_pad == (1, 1, 2, 1)
    assert rows["low"].kernel.input_border == (1, 1, 2, 1) and rows["high"].kernel.input_border == (1, 1, 2, 1)
    assert rows["narrow"].kernel.input_border == (1, 1, 2, 1) and rows["pooled"].kernel.input_block == V
    assert f"writes {BLOCKED} for b1, b2_reduce, b3_reduce, the max pool before b4" in rows["stem"].implementation
    out = rows["out_cat"]
    assert out.decision == "nchw" and out.implementation == "relax concat (NCHW)"
    assert out.reason == "a reader is not a rewritten conv or a blocked max pool or concat"
    assert not rows["low"].kernel.output_blocked


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_spatial_pyramid_pooling_joins_a_conv_and_the_pools_that_also_read_it(sparsity):
    """YOLO's SPPF: a conv, three chained 5x5/1 max pools, the four joined and read by a 3x3 conv. The conv's and
    the first two pools' outputs are read by the next pool too; all five tensors carry the 3x3's border, which the
    pools skip."""
    g = OnnxGraph(np.random.default_rng(4))
    y = g.conv("x", "cv1", 16, 8, kernel=1)
    pools = [y]
    for i in range(3):
        pools.append(_max_pool(g, pools[-1], f"pool{i}", 5, 1, [2, 2, 2, 2]))
    g.nodes.append(helper.make_node("Concat", pools, ["spp"], name="spp", axis=1))
    y = g.conv("spp", "cv2", 32, 64, kernel=3, act=None)
    x = np.random.default_rng(0).standard_normal((1, 8, 10, 10)).astype(np.float32)
    rows, report = _run(g.model(y, [1, 8, 10, 10], [1, 32, 10, 10]), x, sparsity)
    assert rows["spp"].implementation == f"joins the {BLOCKED} outputs of cv1, max pool pool0, max pool pool1, max " \
                                         "pool pool2 with a 1-pixel zero border for cv2", report.table()
    assert rows["cv1"].implementation.endswith(f"; writes {BLOCKED} for max pool pool0, spp")
    assert rows["cv1"].kernel.output_pad == (1, 1, 1, 1) and rows["cv2"].kernel.input_prepadded


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_concats_read_by_other_ops_or_of_other_inputs_stay_nchw(sparsity):
    """DenseNet's concat -> BatchNorm -> ReLU -> conv; a concat with the graph input among its inputs; one whose
    input conv is also read by an elementwise op; one whose input has channels that are not a multiple of V: each
    stays a Relax concat in NCHW, its row saying why, and the convs around it write and read NCHW."""
    rng = np.random.default_rng(3)
    g = OnnxGraph(rng)
    a = g.conv("x", "a", 16, 16)
    b = g.conv("x", "b", 16, 16)
    g.nodes.append(helper.make_node("Concat", [a, b], ["dense_cat"], name="dense_cat", axis=1))
    scale, shift = rng.uniform(0.5, 1.5, 32), rng.uniform(-0.1, 0.1, 32)
    g.inits += [numpy_helper.from_array(v.astype(np.float32), n) for v, n in
                ((scale, "bn_scale"), (shift, "bn_bias"), (shift * 0.1, "bn_mean"), (scale, "bn_var"))]
    g.nodes += [helper.make_node("BatchNormalization", ["dense_cat", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                                 ["bn"], name="bn"),
                helper.make_node("Relu", ["bn"], ["bn_relu"])]
    c = g.conv("bn_relu", "c", 16, 32, kernel=1)
    g.nodes.append(helper.make_node("Concat", [c, "x"], ["input_cat"], name="input_cat", axis=1))
    d = g.conv("input_cat", "d", 16, 32, kernel=1)
    e = g.conv(d, "e", 16, 16, kernel=1)
    g.nodes += [helper.make_node("Concat", [d, e], ["shared_cat"], name="shared_cat", axis=1),
                helper.make_node("Mul", [d, d], ["squared"])]
    mixed = g.conv("shared_cat", "mixed", 16, 32, kernel=1, act=None)
    g.nodes.append(helper.make_node("Add", [mixed, "squared"], ["mixed_sum"]))
    f = g.conv("mixed_sum", "f", V // 2, 16, kernel=1)  # channels not a multiple of V
    h = g.conv("mixed_sum", "h", 16, 16, kernel=1)
    g.nodes.append(helper.make_node("Concat", [f, h], ["narrow_cat"], name="narrow_cat", axis=1))
    y = g.conv("narrow_cat", "y", 16, 16 + V // 2, kernel=1)
    x = np.random.default_rng(0).standard_normal((1, 16, 9, 9)).astype(np.float32)
    rows, report = _run(g.model(y, [1, 16, 9, 9], [1, 16, 9, 9]), x, sparsity)
    why = {"dense_cat": "a reader is not a rewritten conv or a blocked max pool or concat",
           "input_cat": f"an input is not written channel-blocked (a rewritten conv with channels a multiple of {V}, "
                        "or a blocked pool or concat)",
           "shared_cat": "an input has readers that read NCHW",
           "narrow_cat": f"an input is not written channel-blocked (a rewritten conv with channels a multiple of {V}, "
                         "or a blocked pool or concat)"}
    for name, reason in why.items():
        row = rows[name]
        assert (row.op, row.decision, row.implementation, row.reason) == \
            ("concat", "nchw", "relax concat (NCHW)", reason), report.table()
    for name in ("a", "b", "c", "d", "e", "f", "h"):
        assert not rows[name].kernel.output_blocked, report.table()
    assert all(row.op == "conv2d" for row in report.sparse_layers + report.dense_layers)  # concats are neither


def _same_size_pads(rng, kernel):
    """Random (top, left, bottom, right) padding that keeps a stride-1 ``kernel`` x ``kernel`` output the input's
    size, often one-sided."""
    top, left = rng.integers(0, kernel, 2)
    return int(top), int(left), int(kernel - 1 - top), int(kernel - 1 - left)


@pytest.mark.parametrize("seed", range(4))
def test_random_concat_graphs_match_onnx_runtime(seed):
    """Random two-level concat graphs: 2-4 branches (a conv of kernel 1, 3 or 5 with one-sided padding, two convs,
    or a max pool and a 1x1 conv; 16 or 32 channels, now and then 8), joined, read by 1-3 such convs and pools
    whose outputs are joined again and read by a last conv; dense and at 70 %."""
    rng = np.random.default_rng(seed)
    g = OnnxGraph(rng)
    counter = iter(range(1000))

    def conv(src, cin, cout=None):
        kernel = int(rng.choice([1, 3, 5]))
        cout = cout or int(rng.choice([16, 32, 16, 32, 8]))
        return g.conv(src, f"c{next(counter)}", cout, cin, kernel=kernel, pads=_same_size_pads(rng, kernel)), cout

    def pool(src):
        kernel = int(rng.choice([2, 3]))
        return _max_pool(g, src, f"p{next(counter)}", kernel, 1, list(_same_size_pads(rng, kernel)))

    def branch(src, cin):
        kind = rng.integers(0, 3)
        if kind == 0:
            return conv(src, cin)
        if kind == 1:
            y, c = conv(src, cin)
            return conv(y, c)
        return conv(pool(src), cin)

    def join(src, cin, count):
        outs = [branch(src, cin) for _ in range(count)]
        name = f"cat{next(counter)}"
        g.nodes.append(helper.make_node("Concat", [o for o, _ in outs], [name], name=name, axis=1))
        return name, sum(c for _, c in outs)

    y, c = g.conv("x", "stem", 32, 8), 32
    y, c = join(y, c, int(rng.integers(2, 5)))
    y, c = join(y, c, int(rng.integers(1, 4)))
    y, _ = conv(y, c, 16)
    x = rng.standard_normal((1, 8, 11, 11)).astype(np.float32)
    for sparsity in SPARSITIES:
        rows, report = _run(g.model(y, [1, 8, 11, 11], [1, 16, 11, 11]), x, sparsity)
        assert any(row.decision == "blocked" for row in report.layers) or \
            any(row.op == "concat" and "channels a multiple" in row.reason for row in report.layers), report.table()
