"""What real CNNs have beyond a groups=1 conv + ReLU runs our kernels: grouped convs as block-diagonal SIMD-block
sparse convs, transposed convs as sub-pixel convs, and SiLU, HardSwish, HardSigmoid, Sigmoid and PReLU fused into
the conv's epilogue. Each graph is built with onnx.helper, compiled and compared with ONNX Runtime (on this host,
and once on the emulated ARM64 device)."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import helper, numpy_helper
from tvm import relax

from alcs_tvm import compiler, public_models
from helpers import OnnxGraph, host_vector_width, requires_avx512

RTOL = 1e-4
V = host_vector_width()  # the block of the channel-blocked layouts


def _run(model, x):
    executable, report = compiler.compile(model, "x86")
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    (expected,) = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=RTOL * float(np.abs(expected).max()))
    return report


@pytest.mark.parametrize("groups, channels, sparsity", [(2, 64, 0.0), (4, 96, 0.0), (8, 64, 0.0), (3, 48, 0.0),
                                                       (4, 96, 0.6), (3, 48, 0.6)])
def test_grouped_convs_run_the_kernel_block_diagonal_and_match_onnx_runtime(groups, channels, sparsity):
    """ShuffleNet's and ResNeXt's grouped convs: 1x1 and 3x3, stride 1 and 2, channels per group that are and are
    not a multiple of the SIMD width, between groups=1 convs and after the graph input; dense, and with the SIMD
    blocks of each group's weight pruned (24 channels per group: blocks that straddle two groups)."""
    g = OnnxGraph(np.random.default_rng(groups))
    y = g.conv("x", "stem", channels, 8)
    y = g.conv(y, "g1x1", channels, channels, kernel=1, groups=groups)
    y = g.conv(y, "g3x3", channels, channels, kernel=3, groups=groups, act=None)
    y = g.conv(y, "g3x3s2", channels * 2, channels, kernel=3, stride=2, groups=groups)
    y = g.conv(y, "head", 16, channels * 2, kernel=1)
    x = np.random.default_rng(0).standard_normal((1, 8, 20, 20)).astype(np.float32)
    model = g.model(y, [1, 8, 20, 20], [1, 16, 10, 10])
    if sparsity:
        model = public_models.prune_simd_blocks(model, 16, sparsity, seed=groups)
    report = _run(model, x)
    grouped = [layer for layer in report.layers if layer.op == "grouped_conv2d"]
    assert [layer.name for layer in grouped] == ["g1x1", "g3x3", "g3x3s2"]
    for layer in grouped:
        assert layer.decision == "sparse" and layer.symbol.startswith("alcs_spconv_"), layer
        # the blocks outside each group are skipped: about 1/groups of them are kept, and of those the unpruned
        assert layer.density <= (1 - sparsity) / groups + layer.vector_width / channels + 1e-6, layer
        if sparsity:
            assert layer.density >= (1 - sparsity) / groups - 0.05, layer
        assert f"grouped ({groups})" in layer.reason


@requires_avx512
@pytest.mark.parametrize("sparsity", [0.0, 0.6])
def test_a_conv_with_a_partial_wide_block_matches_onnx_runtime(sparsity):
    """A 1000-class conv classifier (SqueezeNet's) runs 32-wide blocks, the last one partial, dense and pruned in
    32-wide groups, its output read by a global average pool (AVX-512 hosts: the only target with 32-wide
    groups)."""
    from alcs_tvm.sparse_format import random_block_sparse

    g = OnnxGraph(np.random.default_rng(5))
    y = g.conv("x", "stem", 64, 8)
    y = g.conv(y, "classifier", 1000, 64, kernel=1)
    weight = g.inits[-2]
    pruned = random_block_sparse(numpy_helper.to_array(weight), 32, sparsity, np.random.default_rng(6))
    weight.CopyFrom(numpy_helper.from_array(pruned, weight.name))
    g.nodes.append(helper.make_node("GlobalAveragePool", [y], ["pooled"]))
    x = np.random.default_rng(0).standard_normal((1, 8, 13, 13)).astype(np.float32)
    report = _run(g.model("pooled", [1, 8, 13, 13], [1, 1000, 1, 1]), x)
    row = {layer.name: layer for layer in report.layers}["classifier"]
    assert row.vector_width == 32 and row.density == pytest.approx(1 - sparsity, abs=0.02), report.table()


@pytest.mark.parametrize("sparsity", [0.0, 0.6])
def test_a_channel_shuffle_is_folded_into_the_conv_it_reaches(sparsity):
    """ShuffleNet's unit: grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1 (+ shortcut). The shuffle moves past
    the depthwise conv and into the grouped conv's weight, which becomes a groups=1 block-diagonal weight with
    permuted input channels: no transpose runs, and the output is ONNX Runtime's, dense and with the grouped
    convs' SIMD blocks pruned. A shuffle that reaches an add stays a transpose."""
    from alcs_tvm import frontend
    from alcs_tvm.sparse_format import random_block_sparse

    c, groups, size = 64, 4, 12
    g = OnnxGraph(np.random.default_rng(7))
    stem = g.conv("x", "stem", c, 8)
    y = g.conv(stem, "g1", c, c, kernel=1, groups=groups)
    y = _shuffle(g, y, "shuffle", c, groups, size)
    y = g.conv(y, "dw", c, c, kernel=3, groups=c, act=None)
    y = g.conv(y, "g2", c, c, kernel=1, groups=groups, act=None)
    unfolded = _shuffle(g, stem, "kept", c, groups, size)  # reaches the add, not a conv
    g.nodes += [helper.make_node("Add", [y, unfolded], ["sum"], name="add"),
                helper.make_node("Relu", ["sum"], ["out"], name="relu")]
    rng = np.random.default_rng(8)
    for init in g.inits:
        if init.name in ("g1_w", "g2_w"):
            init.CopyFrom(numpy_helper.from_array(random_block_sparse(numpy_helper.to_array(init), 16, sparsity, rng),
                                                  init.name))
    model = g.model("out", [1, 8, size, size], [1, c, size, size])
    script = frontend.import_onnx(model)["main"].script()
    assert script.count("R.permute_dims") == 1  # the shuffle before the add only
    x = np.random.default_rng(0).standard_normal((1, 8, size, size)).astype(np.float32)
    report = _run(model, x)
    rows = {layer.name: layer for layer in report.layers}
    assert rows["g1"].op == "grouped_conv2d" and rows["g2"].op == "conv2d", report.table()
    assert rows["g2"].decision == "sparse" and rows["g2"].density <= (1 - sparsity) / groups + 0.05, report.table()


def test_grouped_convs_are_not_latency_table_layers():
    """The pruner and latency tables measure groups=1 convs: a grouped conv is part of the rest of the model."""
    g = OnnxGraph(np.random.default_rng(5))
    y = g.conv("x", "stem", 32, 3)
    y = g.conv(y, "grouped", 32, 32, groups=4)
    model = g.model(y, [1, 3, 16, 16], [1, 32, 16, 16])
    assert [layer.name for layer in compiler.model_layers(model, "x86")] == ["stem"]
    onnx.checker.check_model(model)


# (kernel, stride, pads [top, left, bottom, right], output_padding): U-Net's 2/2, DCGAN's and CenterNet's 4/2/1,
# a 3/2/1 with output padding (odd output sizes), stride 1, stride 3, and asymmetric pads
CONV_TRANSPOSES = [(2, 2, (0, 0, 0, 0), 0), (4, 2, (1, 1, 1, 1), 0), (3, 2, (1, 1, 1, 1), 1), (3, 1, (1, 1, 1, 1), 0),
                   (5, 3, (2, 2, 2, 2), 2), (3, 2, (0, 1, 1, 0), 0)]


@pytest.mark.parametrize("kernel, stride, pads, output_padding", CONV_TRANSPOSES)
def test_conv_transposes_run_the_kernel_as_sub_pixel_convs_and_match_onnx_runtime(kernel, stride, pads,
                                                                                  output_padding):
    rng = np.random.default_rng(kernel * 10 + stride)
    g = OnnxGraph(rng)
    y = g.conv("x", "stem", 32, 8)
    w = (rng.standard_normal((32, 24, kernel, kernel)) * np.sqrt(2 / (32 * kernel ** 2))).astype(np.float32)
    g.inits += [numpy_helper.from_array(w, "up_w"),
                numpy_helper.from_array(rng.uniform(-0.1, 0.1, 24).astype(np.float32), "up_b")]
    g.nodes += [helper.make_node("ConvTranspose", [y, "up_w", "up_b"], ["up_y"], name="up", kernel_shape=[kernel] * 2,
                                 strides=[stride] * 2, pads=list(pads), output_padding=[output_padding] * 2),
                helper.make_node("Relu", ["up_y"], ["up_a"], name="up_relu")]
    y = g.conv("up_a", "head", 16, 24, kernel=1, act=None)
    size = lambda n, lo, hi: (n - 1) * stride - lo - hi + kernel + output_padding  # noqa: E731
    out = [1, 16, size(9, pads[0], pads[2]), size(9, pads[1], pads[3])]
    x = np.random.default_rng(1).standard_normal((1, 8, 9, 9)).astype(np.float32)
    report = _run(g.model(y, [1, 8, 9, 9], out), x)
    (up,) = [layer for layer in report.layers if layer.name == "up"]
    assert up.op == "conv2d_transpose" and up.symbol and up.symbol.startswith("alcs_spconv_"), up
    assert up.spec.out_channels == stride * stride * 24 and "sub-pixel" in up.reason
    assert "bias" in up.implementation  # the bias after it moved onto the conv
    if kernel % stride:  # taps a phase lacks are whole zero blocks, skipped
        assert up.decision == "sparse" and up.density < 1


def test_conv_transposes_the_kernel_cannot_take_stay_relax_ops_and_are_reported():
    """Dilated and grouped transposed convs stay TVM's, with a report row."""
    rng = np.random.default_rng(3)
    g = OnnxGraph(rng)
    y = g.conv("x", "stem", 16, 8)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    g.inits.append(numpy_helper.from_array(w, "up_w"))
    g.nodes.append(helper.make_node("ConvTranspose", [y, "up_w"], ["up_y"], name="up", kernel_shape=[3, 3],
                                    strides=[2, 2], dilations=[2, 2]))
    x = np.random.default_rng(1).standard_normal((1, 8, 6, 6)).astype(np.float32)
    report = _run(g.model("up_y", [1, 8, 6, 6], [1, 8, 15, 15]), x)
    (up,) = [layer for layer in report.layers if layer.name == "up"]
    assert up.op == "conv2d_transpose" and up.decision == "dense" and up.symbol is None
    assert [layer.name for layer in compiler.model_layers(g.model("up_y", [1, 8, 6, 6], [1, 8, 15, 15]))] == ["stem"]


def _activation_nodes(kind, src, name):
    """The ONNX nodes exporters write for each activation; returns (nodes, output name)."""
    if kind == "silu":  # torch's nn.SiLU at opset 17
        return [helper.make_node("Sigmoid", [src], [f"{name}_s"], name=f"{name}_sig"),
                helper.make_node("Mul", [src, f"{name}_s"], [f"{name}_a"], name=f"{name}_mul")], f"{name}_a"
    if kind == "hardswish":
        return [helper.make_node("HardSwish", [src], [f"{name}_a"], name=f"{name}_hs")], f"{name}_a"
    if kind == "hardswish_relu6":  # x * relu6(x + 3) / 6, as TensorFlow's MobileNetV3 converts
        return [helper.make_node("Add", [src, "three"], [f"{name}_p3"]),
                helper.make_node("Clip", [f"{name}_p3", "zero", "six"], [f"{name}_c"]),
                helper.make_node("Div", [f"{name}_c", "six"], [f"{name}_d"]),
                helper.make_node("Mul", [src, f"{name}_d"], [f"{name}_a"])], f"{name}_a"
    if kind == "hardsigmoid":  # torch's nn.Hardsigmoid
        return [helper.make_node("HardSigmoid", [src], [f"{name}_a"], name=f"{name}_hsig", alpha=1 / 6)], \
            f"{name}_a"
    return [helper.make_node("Sigmoid", [src], [f"{name}_a"], name=f"{name}_sig")], f"{name}_a"


@pytest.mark.parametrize("activation", ["silu", "hardswish", "hardswish_relu6", "hardsigmoid", "sigmoid"])
def test_activations_fuse_into_the_kernels_and_match_onnx_runtime(activation):
    """YOLO's Conv-BN-SiLU, MobileNetV3's HardSwish blocks (1x1 expand -> depthwise -> 1x1 project, blocked in
    between) and squeeze-excitation gates: the activation runs in the conv's (and the depthwise's) epilogue, not
    as separate kernels. Inputs span [-12, 12], where the exponential's range reduction matters."""
    rng = np.random.default_rng(7)
    g = OnnxGraph(rng)
    g.inits += [numpy_helper.from_array(np.array(v, np.float32), name)
                for name, v in (("zero", 0), ("three", 3), ("six", 6))]
    y = g.conv("x", "stem", 32, 8, act=None)
    nodes, y = _activation_nodes(activation, y, "stem")
    g.nodes += nodes
    y = g.conv(y, "expand", 64, 32, kernel=1, act=None)
    nodes, y = _activation_nodes(activation, y, "expand")
    g.nodes += nodes
    y = g.conv(y, "dw", 64, 64, kernel=3, groups=64, act=None)
    nodes, y = _activation_nodes(activation, y, "dw")
    g.nodes += nodes
    y = g.conv(y, "project", 32, 64, kernel=1, act=None)
    x = (np.random.default_rng(1).standard_normal((1, 8, 12, 12)) * 4).astype(np.float32)
    report = _run(g.model(y, [1, 8, 12, 12], [1, 32, 12, 12]), x)
    rows = {layer.name: layer for layer in report.layers}
    fused = activation.split("_")[0]  # either form of HardSwish is the kernel's hardswish
    for name in ("stem", "expand"):
        assert f"+{fused}" in rows[name].implementation, rows[name]
        assert rows[name].symbol.endswith(f"_{fused}"), rows[name]
    # the expand conv and the depthwise conv run as one kernel: both activations in its epilogues
    assert rows["dw"].symbol and rows["dw"].symbol == rows["expand"].symbol and \
        rows["dw"].symbol.startswith("alcs_expand_dwconv_") and rows["dw"].symbol.endswith(f"_{fused}_{fused}"), \
        rows["dw"]


def test_an_activation_whose_input_is_read_elsewhere_is_not_fused():
    """y * sigmoid(y) where y is also a graph output: the conv must still produce y itself."""
    g = OnnxGraph(np.random.default_rng(2))
    y = g.conv("x", "stem", 16, 8, act=None)
    nodes, out = _activation_nodes("silu", y, "stem")
    g.nodes += nodes + [helper.make_node("Add", [out, y], ["sum"], name="sum")]
    x = np.random.default_rng(1).standard_normal((1, 8, 10, 10)).astype(np.float32)
    report = _run(g.model("sum", [1, 8, 10, 10], [1, 16, 10, 10]), x)
    assert "silu" not in report.layers[0].implementation


def test_prelu_fuses_into_the_kernel_with_its_slopes_and_matches_onnx_runtime():
    """MTCNN's and face-recognition nets' Conv -> PRelu (per-channel slopes, and one shared slope) and Conv ->
    LeakyRelu; a depthwise conv keeps its PRelu as a separate op."""
    rng = np.random.default_rng(11)
    g = OnnxGraph(rng)
    y = g.conv("x", "c1", 20, 3, act=None)
    g.inits.append(numpy_helper.from_array(rng.uniform(0.05, 0.5, (20, 1, 1)).astype(np.float32), "s1"))
    g.nodes.append(helper.make_node("PRelu", [y, "s1"], ["p1"], name="c1_prelu"))
    y = g.conv("p1", "c2", 32, 20, kernel=1, act=None)
    g.inits.append(numpy_helper.from_array(np.array([0.2], np.float32), "s2"))
    g.nodes.append(helper.make_node("PRelu", [y, "s2"], ["p2"], name="c2_prelu"))
    y = g.conv("p2", "leaky", 32, 32, kernel=3, act=None)
    g.nodes.append(helper.make_node("LeakyRelu", [y], ["p_leaky"], name="leaky_act", alpha=0.1))
    y = g.conv("p_leaky", "dw", 32, 32, groups=32, act=None)
    g.inits.append(numpy_helper.from_array(rng.uniform(0.05, 0.5, (32, 1, 1)).astype(np.float32), "s3"))
    g.nodes.append(helper.make_node("PRelu", [y, "s3"], ["p3"], name="dw_prelu"))
    x = (np.random.default_rng(1).standard_normal((1, 3, 14, 14)) * 3).astype(np.float32)
    report = _run(g.model("p3", [1, 3, 14, 14], [1, 32, 14, 14]), x)
    rows = {layer.name: layer for layer in report.layers}
    for name in ("c1", "c2", "leaky"):  # LeakyReLU (YOLOv3/v4, GANs) is a PReLU with one slope
        assert "_prelu" in rows[name].symbol and "+prelu" in rows[name].implementation, rows[name]
    assert "prelu" not in (rows["dw"].symbol or "")


@pytest.mark.device
def test_every_kind_on_the_emulated_arm64_device(rpc_devices, cross_cxx, tmp_path):
    """The same kernels built for arm64 (NEON) and run on the emulated device: a grouped conv, a transposed conv
    (with a PReLU after it), fused SiLU, HardSwish, PReLU and Sigmoid, a blocked max pool, and a blocked depthwise
    conv with its squeeze-excitation, against ONNX Runtime on the same input."""
    from helpers import run_cli

    from alcs_tvm.run import run_model

    rng = np.random.default_rng(21)
    g = OnnxGraph(rng)
    y = g.conv("x", "stem", 16, 3, act=None)
    nodes, y = _activation_nodes("silu", y, "stem")
    g.nodes += nodes
    y = g.conv(y, "grouped", 32, 16, groups=4, act=None)
    nodes, y = _activation_nodes("hardswish", y, "grouped")
    g.nodes += nodes
    w = (rng.standard_normal((32, 16, 4, 4)) * 0.1).astype(np.float32)
    g.inits.append(numpy_helper.from_array(w, "up_w"))
    g.nodes.append(helper.make_node("ConvTranspose", [y, "up_w"], ["up_y"], name="up", kernel_shape=[4, 4],
                                    strides=[2, 2], pads=[1, 1, 1, 1]))
    g.inits.append(numpy_helper.from_array(rng.uniform(0.05, 0.5, (16, 1, 1)).astype(np.float32), "slope"))
    g.nodes.append(helper.make_node("PRelu", ["up_y", "slope"], ["up_p"], name="up_prelu"))
    y = g.conv("up_p", "mix", 16, 16, act=None)
    g.inits.append(numpy_helper.from_array(rng.uniform(0.05, 0.5, (16, 1, 1)).astype(np.float32), "mix_slope"))
    g.nodes.append(helper.make_node("PRelu", [y, "mix_slope"], ["mix_p"], name="mix_prelu"))
    g.nodes.append(helper.make_node("MaxPool", ["mix_p"], ["pooled"], name="pool", kernel_shape=[3, 3],
                                    strides=[2, 2], pads=[1, 1, 1, 1]))
    y = g.conv("pooled", "gate", 16, 16, kernel=1, act=None)
    nodes, y = _activation_nodes("sigmoid", y, "gate")
    g.nodes += nodes
    # MobileNetV3's block: expand -> depthwise -> squeeze-excitation -> project, blocked throughout
    y = g.conv(y, "expand", 24, 16, kernel=1, act="HardSwish")
    y = g.conv(y, "dw_se", 24, 24, kernel=3, groups=24, act="HardSwish")
    g.nodes.append(helper.make_node("GlobalAveragePool", [y], ["se_pool"]))
    gate = g.conv("se_pool", "se_reduce", 8, 24, kernel=1)
    gate = g.conv(gate, "se_expand", 24, 8, kernel=1, act="HardSigmoid")
    g.nodes.append(helper.make_node("Mul", [y, gate], ["se_out"]))
    y = g.conv("se_out", "project", 16, 24, kernel=1, act=None)
    model = g.model(y, [1, 3, 8, 8], [1, 16, 8, 8])
    path = tmp_path / "kinds.onnx"
    onnx.save(model, path)
    library = tmp_path / "kinds_arm64.so"
    result = run_cli("compile", path, "--target", "arm64", "-o", library, timeout=900)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads((tmp_path / "kinds_arm64.so.report.json").read_text())["layers"]}
    assert rows["stem"]["symbol"].endswith("_silu") and rows["grouped"]["symbol"].endswith("_hardswish")
    # a transposed conv's activation follows its depth-to-space: it fuses into that copy, not into the kernel
    assert rows["up"]["symbol"].startswith("alcs_spconv_") and rows["gate"]["symbol"].endswith("_sigmoid")
    assert rows["mix"]["symbol"].endswith("_prelu") and "for the max pool" in rows["mix"]["implementation"]
    assert rows["dw_se"]["implementation"] == "alcs expand + depthwise NCHW4c kernel (fused with expand, its " \
        "squeeze-excitation NCHW4c, before project)", rows["dw_se"]
    assert rows["dw_se"]["symbol"].startswith("alcs_expand_dwconv_k3x3s1_v8_hardswish_hardswish"), rows["dw_se"]
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32) * 3
    outputs, _ = run_model(library, {"x": x}, tracker=rpc_devices.tracker, key=rpc_devices.arm64_key, timeout=120)
    (expected,) = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(outputs[0], expected, rtol=RTOL, atol=RTOL * float(np.abs(expected).max()))


def _shuffle(g, src, name, channels, groups, hw):
    """ShuffleNet's channel shuffle: Reshape -> Transpose -> Reshape (no conv reads it as its producer)."""
    g.inits += [numpy_helper.from_array(np.array([1, groups, channels // groups, hw, hw], np.int64), f"{name}_s1"),
                numpy_helper.from_array(np.array([1, channels, hw, hw], np.int64), f"{name}_s2")]
    g.nodes += [helper.make_node("Reshape", [src, f"{name}_s1"], [f"{name}_r"]),
                helper.make_node("Transpose", [f"{name}_r"], [f"{name}_t"], perm=[0, 2, 1, 3, 4]),
                helper.make_node("Reshape", [f"{name}_t", f"{name}_s2"], [f"{name}_y"])]
    return f"{name}_y"


def test_depthwise_convs_without_two_rewritten_neighbours_run_the_blocked_kernel():
    """MobileNetV3's squeeze-excitation reads the depthwise output (so no conv is its only consumer: its mean and
    scale run blocked too) and a channel shuffle that another op reads too feeds it (so no conv is its producer; a
    shuffle read by the depthwise conv alone is folded away): the blocked depthwise kernel runs with its
    input or output converted; a wide one with no rewritten neighbour keeps the NCHW schedule."""
    rng = np.random.default_rng(17)
    g = OnnxGraph(rng)
    y = g.conv("x", "expand", 32, 8, kernel=1, act=None)
    y = g.conv(y, "dw_se", 32, 32, groups=32, act=None)  # -> hardswish -> SE: the output is read NCHW
    nodes, y = _activation_nodes("hardswish", y, "dw_se")
    g.nodes += nodes
    g.nodes.append(helper.make_node("GlobalAveragePool", [y], ["se_pool"]))
    gate = g.conv("se_pool", "se_reduce", 8, 32, kernel=1)
    gate = g.conv(gate, "se_expand", 32, 8, kernel=1, act=None)
    nodes, gate = _activation_nodes("hardsigmoid", gate, "se_expand")
    g.nodes += nodes + [helper.make_node("Mul", [y, gate], ["se_out"])]
    y = g.conv("se_out", "project", 32, 32, kernel=1, act=None)
    y = _shuffle(g, y, "shuffle1", 32, 4, 10)
    y = g.conv(y, "dw_shuffled", 32, 32, groups=32, act=None)  # shuffle -> depthwise -> conv
    y = g.conv(y, "pw", 32, 32, kernel=1, act=None)
    y = _shuffle(g, y, "shuffle2", 32, 4, 10)
    y = g.conv(y, "dw_alone", 32, 32, groups=32, act=None)  # shuffle -> depthwise -> Mul: no neighbour
    g.nodes.append(helper.make_node("Mul", [y, "shuffle2_y"], ["product"]))
    g.nodes.append(helper.make_node("Add", ["product", "shuffle1_y"], ["sum"]))  # read twice: shuffle1 stays
    x = np.random.default_rng(1).standard_normal((1, 8, 10, 10)).astype(np.float32)
    report = _run(g.model("sum", [1, 8, 10, 10], [1, 32, 10, 10]), x)
    rows = {layer.name: layer for layer in report.layers}
    assert f"(fused with expand, its squeeze-excitation NCHW{V}c, before project)" in rows["dw_se"].implementation
    assert rows["project"].kernel.input_block == V
    assert rows["dw_se"].symbol.endswith("_hardswish")
    assert "from NCHW, before pw" in rows["dw_shuffled"].implementation
    assert "from NCHW, back to NCHW" in rows["dw_alone"].implementation
    assert rows["dw_se"].symbol.startswith("alcs_expand_dwconv_"), rows["dw_se"]
    for name in ("dw_shuffled", "dw_alone"):
        assert rows[name].symbol.startswith("alcs_dwconv_"), rows[name]

    wide = OnnxGraph(np.random.default_rng(3))
    y = _shuffle(wide, "x", "shuffle", 16, 2, 40)
    y = wide.conv(y, "dw_wide", 16, 16, groups=16, act=None)
    wide.nodes.append(helper.make_node("Mul", [y, "x"], ["sum"]))
    x = np.random.default_rng(1).standard_normal((1, 16, 40, 40)).astype(np.float32)
    report = _run(wide.model("sum", [1, 16, 40, 40], [1, 16, 40, 40]), x)
    (row,) = [layer for layer in report.layers if layer.name == "dw_wide"]
    assert row.symbol is None and row.decision == "dense"


@pytest.mark.parametrize("sparsity", [0.0, 0.6])
@pytest.mark.parametrize("channels, groups, stride, block", [(72, 1, 2, 8), (88, 1, 1, 8), (120, 1, 1, 8),
                                                              (136, 4, 1, 8), (100, 1, 1, 4), (102, 1, 1, None)])
def test_depthwise_convs_over_channels_off_the_simd_width_run_in_narrower_blocks(channels, groups, stride, block,
                                                                                 sparsity):
    """MobileNetV3's 72-, 88- and 120-channel depthwise convs and ShuffleNet's 136-channel ones (after a grouped
    1x1 conv) are no multiple of V = 16: they run the blocked kernel in NCHW8c (100 channels in NCHW4c), their 1x1
    neighbours (groups of 16 or 32 with a partial last one, dense and pruned) writing and reading that layout, and
    so does a squeeze-excitation after one (its mean, and its scale for a 1x1 conv; the 3x3 conv after the 88-channel
    one pads, so that depthwise output converts back to NCHW). 102 channels keep the NCHW schedule."""
    from alcs_tvm.sparse_format import random_block_sparse

    g = OnnxGraph(np.random.default_rng(channels + stride))
    y = g.conv("x", "stem", 16, 8)
    y = g.conv(y, "expand", channels, 16, kernel=1, groups=groups, act="HardSwish")
    y = g.conv(y, "dw", channels, channels, kernel=3, stride=stride, groups=channels)
    y = g.conv(y, "project", 24, channels, kernel=1, act=None)
    y = g.conv(y, "expand2", channels, 24, kernel=1)
    y = g.conv(y, "dw_se", channels, channels, kernel=5, groups=channels, act="HardSwish")
    g.nodes.append(helper.make_node("GlobalAveragePool", [y], ["se_pool"]))
    gate = g.conv("se_pool", "se_reduce", 24, channels, kernel=1)
    gate = g.conv(gate, "se_expand", channels, 24, kernel=1, act="HardSigmoid")
    g.nodes.append(helper.make_node("Mul", [y, gate], ["se_out"]))
    project_kernel = 3 if channels == 88 else 1
    y = g.conv("se_out", "project2", 24, channels, kernel=project_kernel, act=None)
    rng = np.random.default_rng(8)
    for init in g.inits:
        if init.name in ("expand_w", "project_w", "expand2_w", "project2_w"):
            init.CopyFrom(numpy_helper.from_array(random_block_sparse(numpy_helper.to_array(init), 16, sparsity, rng),
                                                  init.name))
    size = 12 // stride
    x = np.random.default_rng(1).standard_normal((1, 8, 12, 12)).astype(np.float32)
    report = _run(g.model(y, [1, 8, 12, 12], [1, 24, size, size]), x)
    rows = {layer.name: layer for layer in report.layers}
    if block is None:
        assert rows["dw"].symbol is None and rows["dw"].implementation == "relax dense schedule", rows["dw"]
        assert rows["project"].kernel.input_block == 1
        return
    # the expand conv (a partial last group of 16 or 32, or grouped) and the depthwise conv run as one kernel
    assert rows["dw"].implementation == \
        f"alcs expand + depthwise NCHW{block}c kernel (fused with expand, before project)", rows["dw"]
    assert rows["dw"].symbol.startswith(f"alcs_expand_dwconv_k3x3s{stride}") and \
        rows["dw"].symbol == rows["expand"].symbol, rows["dw"]
    assert f"; fused with dw: one kernel writing its NCHW{block}c output" in rows["expand"].implementation, \
        rows["expand"]
    assert rows["expand"].kernel.out_block == block and rows["expand"].kernel.output_blocked
    assert rows["project"].kernel.input_block == block and rows["project"].kernel.input_prepadded
    through = "back to NCHW" if project_kernel == 3 else f"its squeeze-excitation NCHW{block}c, before project2"
    assert rows["dw_se"].implementation == f"alcs expand + depthwise NCHW{block}c kernel (fused with expand2, " \
                                           f"{through})"
    assert rows["project2"].kernel.input_block == (1 if project_kernel == 3 else block)
    if sparsity:
        assert rows["project"].decision == "sparse" and rows["expand2"].decision == "sparse", report.table()


@pytest.mark.parametrize("kernel, stride, pads", [(3, 2, [1, 1, 1, 1]), (2, 2, [0, 0, 0, 0]), (3, 1, [1, 0, 2, 1])])
def test_max_pools_between_rewritten_convs_run_blocked_and_match_onnx_runtime(kernel, stride, pads):
    """ResNet's stem -> max pool -> block: the conv before writes NCHW[V]c, the pool reads and writes it (padding as
    -inf: the conv before has no ReLU, so its outputs are negative at the border too), the conv after and the
    shortcut add read it blocked."""
    g = OnnxGraph(np.random.default_rng(kernel + stride))
    y = g.conv("x", "stem", 32, 3, act=None)
    g.nodes.append(helper.make_node("MaxPool", [y], ["pooled"], name="pool", kernel_shape=[kernel, kernel],
                                    strides=[stride, stride], pads=pads))
    a = g.conv("pooled", "a", 32, 32)
    b = g.conv(a, "b", 32, 32, act=None)
    g.nodes.append(helper.make_node("Add", [b, "pooled"], ["sum"]))
    size = (15 + pads[0] + pads[2] - kernel) // stride + 1, (15 + pads[1] + pads[3] - kernel) // stride + 1
    model = g.model("sum", [1, 3, 15, 15], [1, 32, *size])
    x = np.random.default_rng(0).standard_normal((1, 3, 15, 15)).astype(np.float32)
    report = _run(model, x)
    rows = {row.name: row for row in report.layers}
    assert "for the max pool before a, b" in rows["stem"].implementation, report.table()
    assert rows["b"].kernel.residual == "blocked" and rows["a"].kernel.input_block == V


def test_a_max_pool_read_by_other_ops_stays_a_relax_op():
    g = OnnxGraph(np.random.default_rng(5))
    y = g.conv("x", "stem", 32, 3)
    g.nodes.append(helper.make_node("MaxPool", [y], ["pooled"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    a = g.conv("pooled", "a", 32, 32)
    g.nodes.append(helper.make_node("Concat", [a, "pooled"], ["cat"], axis=1))
    model = g.model("cat", [1, 3, 12, 12], [1, 64, 6, 6])
    report = _run(model, np.random.default_rng(1).standard_normal((1, 3, 12, 12)).astype(np.float32))
    assert "max pool" not in {row.name: row for row in report.layers}["stem"].implementation
