"""Winograd F(2x2, 3x3) and F(4x4, 3x3): the transform matrices, every 3x3 stride-1 conv shape of ResNet-18 against
PyTorch (on this host and on the emulated ARM64 device), edge tiles and epilogues through the pass against ONNX
Runtime, and the per-layer choice in the compile report."""
import json
from fractions import Fraction

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from alcs_tvm import compiler
from alcs_tvm.layer import Conv2dSpec
from alcs_tvm.schedules.winograd_cpu import winograd_matrices
from alcs_tvm.target import resolve_target
from alcs_tvm.winograd import build_winograd_conv2d, choose_algorithm, winograd_applies
from helpers import host_vector_width

#: the issue's bound for F(2x2) and F(4x4): max |error| relative to max |reference|
REL_ERR = 1e-4
#: ResNet-18's 3x3 stride-1 convs (input channels = output channels, size)
RESNET18_3X3 = [(64, 56), (128, 28), (256, 14), (512, 7)]


@pytest.mark.parametrize("m", [2, 4, 6])
def test_transform_matrices_compute_the_correlation_exactly(m):
    """In exact arithmetic, ``AT ((G g) * (BT d))`` is the correlation of d with g, for every basis g and d."""
    at, g, bt = winograd_matrices(m)
    alpha = m + 2
    for k in range(3):
        for j in range(alpha):
            gk = [Fraction(int(i == k)) for i in range(3)]
            dj = [Fraction(int(i == j)) for i in range(alpha)]
            u = [sum(g[r][c] * gk[c] for c in range(3)) for r in range(alpha)]
            v = [sum(bt[r][c] * dj[c] for c in range(alpha)) for r in range(alpha)]
            y = [sum(at[i][r] * u[r] * v[r] for r in range(alpha)) for i in range(m)]
            assert y == [Fraction(int(j == i + k)) for i in range(m)], (m, k, j)


def _conv_reference(x, w, b):
    return torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                      torch.from_numpy(b).double(), padding=1).numpy()


def _relative_error(out, reference):
    return float(np.abs(out - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("channels, size", RESNET18_3X3)
def test_every_resnet18_3x3_conv_matches_pytorch(channels, size, tile):
    rng = np.random.default_rng(channels + tile)
    x = rng.standard_normal((1, channels, size, size)).astype(np.float32)
    w = (rng.standard_normal((channels, channels, 3, 3)) * np.sqrt(2 / (9 * channels))).astype(np.float32)
    b = rng.uniform(-0.1, 0.1, channels).astype(np.float32)
    out = build_winograd_conv2d(w, input_shape=x.shape, bias=b, tile=tile).run(x)
    assert _relative_error(out, _conv_reference(x, w, b)) <= REL_ERR


@pytest.mark.parametrize("cin, cout, size, padding, tile", [
    (48, 48, 13, 1, 4),  # edge tiles on both sides, V = 16 (48 channels are not two groups of 32)
    (16, 32, 9, 1, 2),  # odd size with F(2x2)
    (8, 32, 10, 0, 4),  # no padding (a "valid" conv), input blocked by 8
    (12, 16, 11, (1, 0, 1, 2), 4),  # asymmetric padding, input blocked by 4
])
def test_edge_tiles_and_paddings_match_pytorch(cin, cout, size, padding, tile):
    rng = np.random.default_rng(size)
    x = rng.standard_normal((1, cin, size, size)).astype(np.float32)
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    conv = build_winograd_conv2d(w, input_shape=x.shape, padding=padding, bias=b, tile=tile)
    pads = padding if isinstance(padding, tuple) else (padding,) * 4
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    reference = torch.nn.functional.conv2d(torch.from_numpy(xp).double(), torch.from_numpy(w).double(),
                                           torch.from_numpy(b).double()).numpy()
    out = conv.run(x)
    assert out.shape == reference.shape
    assert _relative_error(out, reference) <= REL_ERR


def test_the_choice_follows_size_and_density():
    """Large feature maps go Winograd, 7x7 maps (weights dominate) and sparse layers stay direct, and what cannot run
    as Winograd says why."""
    info = resolve_target("x86")
    big = Conv2dSpec.create((1, 64, 56, 56), (64, 64, 3, 3), 1, 1)
    small = Conv2dSpec.create((1, 512, 7, 7), (512, 512, 3, 3), 1, 1)
    assert choose_algorithm(big, 1.0, info)[0] == 4
    assert choose_algorithm(big, 0.2, info)[0] is None
    assert choose_algorithm(small, 1.0, info)[0] is None
    assert "3x3 stride-1" in winograd_applies(Conv2dSpec.create((1, 64, 56, 56), (64, 64, 3, 3), 2, 1), 16)
    assert "not whole blocks" in winograd_applies(Conv2dSpec.create((1, 64, 56, 56), (40, 64, 3, 3), 1, 1), 16)


def _block_model(rng, act):
    """stem -> 3x3 conv (act) -> 3x3 conv + shortcut add -> act, channel counts that make both GEMM widths."""
    nodes, inits = [], []

    def conv(src, name, cout, cin, pads=(1, 1, 1, 1)):
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}_w"),
                      numpy_helper.from_array(rng.uniform(-0.1, 0.1, cout).astype(np.float32), f"{name}_b")])
        nodes.append(helper.make_node("Conv", [src, f"{name}_w", f"{name}_b"], [f"{name}_y"], name=name,
                                      kernel_shape=[3, 3], pads=list(pads)))
        return f"{name}_y"

    def activation(src, name):
        if act == "PRelu":
            slope = rng.uniform(0.05, 0.5, (64, 1, 1)).astype(np.float32)
            inits.append(numpy_helper.from_array(slope, f"{name}_slope"))
            nodes.append(helper.make_node("PRelu", [src, f"{name}_slope"], [f"{name}_a"]))
        elif act == "Silu":
            nodes.extend([helper.make_node("Sigmoid", [src], [f"{name}_s"]),
                          helper.make_node("Mul", [src, f"{name}_s"], [f"{name}_a"])])
        else:
            nodes.append(helper.make_node(act, [src], [f"{name}_a"]))
        return f"{name}_a"

    stem = activation(conv("x", "stem", 64, 16), "stem")
    y = activation(conv(stem, "c1", 64, 64), "c1")
    y = conv(y, "c2", 64, 64)
    nodes.append(helper.make_node("Add", [y, stem], ["sum"]))
    out = activation("sum", "c2")
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 30, 30])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 64, 30, 30])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("act", ["Relu", "PRelu", "Silu"])
def test_a_residual_block_runs_winograd_with_its_epilogue_and_matches_onnx_runtime(act):
    """The pass rewrites every conv of a ResNet-style block to Winograd (the input NCHW from the graph, then the
    chain's blocked layouts, the shortcut fused into the second conv's output transform) and the report says so."""
    model = _block_model(np.random.default_rng(3), act)
    x = np.random.default_rng(4).standard_normal((1, 16, 30, 30)).astype(np.float32)
    executable, report = compiler.compile(model, "x86")
    rows = {row.name: row for row in report.layers}
    assert all(row.algorithm == "winograd4" for row in rows.values()), report.table()
    assert "Winograd F(4x4, 3x3)" in rows["c2"].implementation and rows["c2"].kernel.residual == "blocked"
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    (expected,) = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(out, expected, rtol=REL_ERR, atol=REL_ERR * float(np.abs(expected).max()))
    _, direct = compiler.compile(model, "x86", winograd="off")
    assert all(row.algorithm == "direct" for row in direct.layers)


@pytest.mark.device
def test_every_resnet18_3x3_conv_on_the_emulated_arm64_device(rpc_devices, cross_cxx, tmp_path):
    """ResNet-18's 3x3 stride-1 convs as Winograd F(2x2) and F(4x4) for arm64 (NEON, V=4), compiled through the
    CLI and run on the emulated device, against PyTorch."""
    from helpers import run_cli

    from alcs_tvm.run import run_model

    rng = np.random.default_rng(7)
    nodes, inits, shapes, weights = [], [], {}, {}
    for i, (channels, size) in enumerate(RESNET18_3X3):
        w = (rng.standard_normal((channels, channels, 3, 3)) * np.sqrt(2 / (9 * channels))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [f"x{i}", f"w{i}"], [f"y{i}"], name=f"conv{i}", kernel_shape=[3, 3],
                                      pads=[1, 1, 1, 1]))
        shapes[i], weights[i] = (1, channels, size, size), w
    graph = helper.make_graph(
        nodes, "resnet18_3x3",
        [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, list(s)) for i, s in shapes.items()],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, list(s)) for i, s in shapes.items()], inits)
    path = tmp_path / "resnet18_3x3.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    inputs = {f"x{i}": rng.standard_normal(s).astype(np.float32) for i, s in shapes.items()}
    for tile in (2, 4):
        library = tmp_path / f"resnet18_3x3_f{tile}_arm64.so"
        result = run_cli("compile", path, "--target", "arm64", "--winograd", str(tile), "-o", library, timeout=900)
        assert result.returncode == 0, result.stderr
        rows = json.loads((tmp_path / f"{library.name}.report.json").read_text())["layers"]
        assert [row["algorithm"] for row in rows] == [f"winograd{tile}"] * len(shapes)
        outputs, _ = run_model(library, inputs, tracker=rpc_devices.tracker, key=rpc_devices.arm64_key,
                               timeout=300)
        for i, out in enumerate(outputs):
            reference = torch.nn.functional.conv2d(torch.from_numpy(inputs[f"x{i}"]).double(),
                                                   torch.from_numpy(weights[i]).double(), padding=1).numpy()
            assert _relative_error(out, reference) <= REL_ERR, (tile, shapes[i])


def test_a_winograd_conv_in_narrow_groups_feeds_a_blocked_depthwise_conv():
    """A conv pruned in 16-wide groups (on AVX-512 its GEMM runs 32 wide) writes the blocks of the host's V channels
    that the depthwise kernel after it reads (found by tools/fuzz_compile.py --winograd 4, seed 48)."""
    rng = np.random.default_rng(48)
    w = (rng.standard_normal((64, 16, 3, 3)) * 0.2).astype(np.float32)
    for block in range(4):  # 80 % of each 16-wide block's positions pruned, other ones in each block
        w.reshape(4, 16, -1)[block][:, rng.random(16 * 9) < 0.8] = 0
    dw = rng.standard_normal((64, 1, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[2, 0, 0, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "dw"], ["d"], name="dw", kernel_shape=[1, 1], strides=[2, 2],
                              group=64),
             helper.make_node("HardSigmoid", ["d"], ["y"], alpha=1 / 6)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 12, 14])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 6, 7])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(dw, "dw")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 16, 12, 14)).astype(np.float32)
    executable, report = compiler.compile(model, "x86", winograd=4)
    rows = {row.name: row for row in report.layers}
    assert rows["conv"].algorithm == "winograd4", report.table()
    assert rows["conv"].vector_width == host_vector_width(), report.table()
    assert rows["dw"].implementation.startswith("alcs depthwise"), report.table()
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    (expected,) = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(out, expected, rtol=REL_ERR, atol=REL_ERR * float(np.abs(expected).max()))
