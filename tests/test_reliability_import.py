"""Import reliability: ONNX graphs as exporters write them (asymmetric pads, ConvTranspose's output_shape, outputs
without a shape, dead and non-2-D convs, shape computations and inference no-ops) import, compile and match ONNX
Runtime or torch. Each graph is built here with onnx.helper."""
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from alcs_tvm import compiler, frontend, public_models
from alcs_tvm.sparse_format import random_block_sparse

RTOL = 1e-4


# ---------------------------------------------------------------------------------------------- helpers


def _model(nodes, inputs, outputs, initializers, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _input(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run_vm(executable, *xs):
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](*(tvm.runtime.tensor(x) for x in xs))
    return [out.numpy()] if isinstance(out, tvm.runtime.Tensor) else [o.numpy() for o in out]


def _run_ort(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _cli(*args):
    """``alcs ARGS`` in a child process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "alcs_tvm.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)


def _assert_close(actual, expected):
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * float(np.abs(expected).max()))


# --------------------------------------------------------------------- convs with zero padding on one side

# (name, kernel, stride, pads [top, left, bottom, right]): tf2onnx's SAME stride 2, Inception's 7x1 and 1x7, and
# torch's padding=(k, 0)
ONE_SIDED_PADS = [("same_s2", (3, 3), 2, (0, 0, 1, 1)), ("inception_7x1", (7, 1), 1, (3, 0, 3, 0)),
                  ("inception_1x7", (1, 7), 1, (0, 3, 0, 3)), ("torch_k_0", (3, 3), 1, (1, 0, 1, 0))]


def _one_sided_pad_model(rng):
    """Each ONE_SIDED_PADS conv reads the graph input (the kernel pads it itself); after the last one a chain
    (conv [0,0,1,1] stride 2 -> depthwise [0,0,1,1] stride 2 -> conv [1,0,1,0]) reads its neighbours' padded
    blocked layouts. Returns the model and the torch reference as a function of the input."""
    inits, nodes, outputs, branches = [], [], [], []

    def conv(src, name, cout, cin, kernel, stride, pads, groups=1):
        w = rng.standard_normal((cout, cin // groups) + kernel).astype(np.float32)
        if groups == 1:
            w = random_block_sparse(w, 16, 0.6, rng)
        b = rng.standard_normal(cout).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")])
        nodes.append(helper.make_node("Conv", [src, f"{name}_w", f"{name}_b"], [f"{name}_c"], name=name,
                                      kernel_shape=list(kernel), strides=[stride, stride], pads=list(pads),
                                      group=groups))
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"], name=f"{name}_relu"))

        def reference(t):
            top, left, bottom, right = pads
            t = torch.nn.functional.pad(t, (left, right, top, bottom))
            return torch.relu(torch.nn.functional.conv2d(t, torch.from_numpy(w), torch.from_numpy(b), stride,
                                                         groups=groups))
        return f"{name}_r", reference

    for name, kernel, stride, pads in ONE_SIDED_PADS:
        out, ref = conv("x", name, 32, 16, kernel, stride, pads)
        outputs.append(out)
        branches.append(ref)
    chain = [conv(outputs[-1], "chain_s2", 32, 32, (3, 3), 2, (0, 0, 1, 1))]
    chain.append(conv(chain[-1][0], "chain_dw", 32, 32, (3, 3), 2, (0, 0, 1, 1), groups=32))
    chain.append(conv(chain[-1][0], "chain_last", 32, 32, (3, 3), 1, (1, 0, 1, 0)))
    outputs.append(chain[-1][0])

    def reference(x):
        t = torch.from_numpy(x)
        results = [ref(t) for ref in branches]
        c = results[-1]
        for _, ref in chain:
            c = ref(c)
        return [r.numpy() for r in results + [c]]

    model = _model(nodes, [_input("x", [1, 16, 17, 17])],
                   [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", "c", "h", "w"]) for o in outputs],
                   inits)
    return model, reference


@pytest.fixture(scope="module")
def one_sided_pad_model():
    return _one_sided_pad_model(np.random.default_rng(0))


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_convs_with_zero_padding_on_one_side_match_torch(one_sided_pad_model, sparse):
    """Pads such as [0, 0, 1, 1] left the kernel's internal pad loop with a zero-extent vectorised loop, which
    TVM cannot build ('Failed to vectorize loop with extent 0'), sparse or dense."""
    model, reference = one_sided_pad_model
    executable, report = compiler.compile(model, "x86", sparse=sparse)
    rewritten = [layer.name for layer in report.layers if layer.implementation.startswith("alcs")]
    assert len(rewritten) == len(ONE_SIDED_PADS) + 3
    x = np.random.default_rng(1).standard_normal((1, 16, 17, 17)).astype(np.float32)
    for actual, expected in zip(_run_vm(executable, x), reference(x), strict=True):
        _assert_close(actual, expected)


def test_convs_with_zero_padding_on_one_side_build_for_arm64(one_sided_pad_model, tmp_path):
    from alcs_tvm.toolchain import ensure_cross_toolchain

    cross = ensure_cross_toolchain(verbose=False)
    model, _ = one_sided_pad_model
    executable, report = compiler.compile(model, "arm64")
    assert len(report.sparse_layers) == len(ONE_SIDED_PADS) + 2
    library = compiler.export(executable, str(tmp_path / "pads_arm64.so"), "arm64", cross)
    assert (tmp_path / "pads_arm64.so").stat().st_size > 0 and library.endswith(".so")


# ------------------------------------------------------------------------------ inputs/outputs without a shape


def _conv_relu_model(input_shape, output_shape, rng):
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(nodes, [_input("x", input_shape)], [_input("y", output_shape)], [numpy_helper.from_array(w, "w")])


def test_output_with_a_type_but_no_shape_is_accepted_as_onnx_runtime_accepts_it():
    model = _conv_relu_model([1, 3, 8, 8], None, np.random.default_rng(2))
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (expected,) = _run_ort(model, {"x": x})  # ONNX Runtime runs it
    loaded = frontend.load_onnx(model)
    assert [d.dim_value for d in loaded.graph.output[0].type.tensor_type.shape.dim] == [1, 8, 8, 8]
    executable, _ = compiler.compile(model, "x86")
    _assert_close(_run_vm(executable, x)[0], expected)


@pytest.mark.slow
def test_input_with_a_type_but_no_shape_needs_only_its_shape(tmp_path):
    model = _conv_relu_model(None, None, np.random.default_rng(2))
    frontend.load_onnx(model)
    with pytest.raises(ValueError, match="input 'x' has unknown rank; give its shape"):
        frontend.import_onnx(model)
    path = tmp_path / "no_shapes.onnx"
    onnx.save(model, str(path))
    run = _cli("compile", str(path), "--input-shapes", "x:1x3x8x8", "-o", str(tmp_path / "m.so"))
    assert run.returncode == 0, run.stderr
    run = _cli("compile", str(path), "-o", str(tmp_path / "m.so"))
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "alcs compile: error: input 'x' has unknown rank; give its shape, e.g. 'x:1x3x224x224'"]


# ------------------------------------------------------------------------------ ConvTranspose's output_shape


def _conv_transpose_model(**attrs):
    """ONNX's test_convtranspose_output_shape: X (1, 1, 3, 3), W (1, 2, 3, 3), strides [3, 2]."""
    w = np.arange(18, dtype=np.float32).reshape(1, 2, 3, 3) / 10
    node = helper.make_node("ConvTranspose", ["X", "W"], ["Y"], name="deconv", strides=[3, 2], **attrs)
    return _model([node], [_input("X", [1, 1, 3, 3])], [_input("Y", None)], [numpy_helper.from_array(w, "W")])


@pytest.mark.parametrize("attrs", [dict(output_shape=[10, 8]),  # larger than the full 9x7: output padding
                                   dict(output_shape=[8, 6]),  # odd crop, NOTSET: the odd pixel at the start
                                   dict(output_shape=[8, 6], auto_pad="SAME_UPPER"),  # ... at the end
                                   dict(output_shape=[7, 5], output_padding=[1, 1])],
                         ids=["10x8", "8x6", "8x6-same-upper", "7x5-output-padding"])
def test_conv_transpose_output_shape_gives_the_shape_and_values_onnx_runtime_gives(attrs):
    model = _conv_transpose_model(**attrs)
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    (expected,) = _run_ort(model, {"X": x})
    assert expected.shape[2:] == tuple(attrs["output_shape"])
    executable, _ = compiler.compile(model, "x86")
    _assert_close(_run_vm(executable, x)[0], expected)


def test_conv_transpose_output_shape_it_cannot_produce_is_one_clear_line(tmp_path):
    path = tmp_path / "deconv.onnx"
    onnx.save(_conv_transpose_model(output_shape=[13, 8]), str(path))
    run = _cli("compile", str(path), "-o", str(tmp_path / "m.so"))
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "alcs compile: error: ConvTranspose node 'deconv': output_shape [13, 8] is larger than it can produce "
        "from input [3, 3] (at most 11 along spatial axis 0)"]


# -------------------------------------------------------------------------------- layer names in the report


def _mixed_conv_model(rng, *, named=True):
    """Graph order: a dead Conv, a 1-D Conv, a ConvTranspose, a 3-D Conv, then the one live 2-D conv (with a
    BatchNormalization after it), pruned to half its SIMD blocks. Every branch reads the input ``x`` [1, 16, 8, 8].
    """
    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, ins, out, name, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=name if named else "", **attrs))
        return out

    inits, nodes = [], []
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    node("Conv", ["x", init("dead_w", r(16, 16, 3, 3))], "dead", "dead_conv", pads=[1, 1, 1, 1])
    flat = node("Reshape", ["x", init("s1", np.array([1, 16, 64], np.int64))], "x1", "to_1d")
    c1 = node("Conv", [flat, init("w1", r(16, 16, 3))], "c1", "conv_1d", pads=[1, 1])
    b1 = node("Reshape", [c1, init("s2", np.array([1, 16, 8, 8], np.int64))], "b1", "from_1d")
    bt = node("ConvTranspose", ["x", init("wt", r(16, 16, 3, 3))], "bt", "deconv", pads=[1, 1, 1, 1])
    x3 = node("Reshape", ["x", init("s3", np.array([1, 16, 4, 4, 4], np.int64))], "x3", "to_3d")
    c3 = node("Conv", [x3, init("w3", r(16, 16, 3, 3, 3))], "c3", "conv_3d", pads=[1] * 6)
    b3 = node("Reshape", [c3, "s2"], "b3", "from_3d")
    s = node("Sum", ["x", b1, bt, b3], "s", "sum")
    w = random_block_sparse(r(32, 16, 3, 3), 16, 0.5, rng)
    c = node("Conv", [s, init("w", w), init("b", r(32))], "c", "live_conv", pads=[1, 1, 1, 1])
    bn = node("BatchNormalization", [c, init("g", r(32) + 2), init("beta", r(32)), init("m", r(32)),
                                     init("v", np.abs(r(32)) + 0.5)], "bn", "bn")
    node("Relu", [bn], "y", "relu")
    return _model(nodes, [_input("x", [1, 16, 8, 8])], [_input("y", [1, 32, 8, 8])], inits)


def test_report_names_each_layer_after_the_node_it_came_from():
    """A dead Conv and 1-D / 3-D Convs before the live 2-D conv used to shift the names: the live conv was
    reported (and its tuning records, latency-table entries and pruning keyed) as 'dead_conv'. Every conv has a
    row now, the ones the kernel does not compute saying why."""
    model = _mixed_conv_model(np.random.default_rng(4))
    x = np.random.default_rng(5).standard_normal((1, 16, 8, 8)).astype(np.float32)
    (expected,) = _run_ort(model, {"x": x})
    executable, report = compiler.compile(model, "x86")
    _assert_close(_run_vm(executable, x)[0], expected)
    rows = {layer.name: layer for layer in report.layers}
    assert sorted(rows) == ["conv_1d", "conv_3d", "deconv", "live_conv"]
    assert (rows["live_conv"].op, rows["live_conv"].decision) == ("conv2d", "sparse")
    assert rows["live_conv"].density == pytest.approx(0.5, abs=0.01)
    assert [(rows[n].op, rows[n].decision, rows[n].reason.split(":")[0]) for n in ("conv_1d", "conv_3d")] \
        == [("conv1d", "dense", "1-D conv"), ("conv3d", "dense", "3-D conv")]
    # the transposed conv runs the kernel as a sub-pixel conv (tests/test_conv_kinds.py)
    assert rows["deconv"].op == "conv2d_transpose" and rows["deconv"].reason.startswith("as a sub-pixel conv")
    assert rows["deconv"].symbol.startswith("alcs_spconv_")
    assert "conv_1d" in report.table() and "1-D conv" in report.table()
    assert [layer.name for layer in compiler.model_layers(model, "x86")] == ["live_conv"]


@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
def test_pruning_an_onnx_file_by_layer_name_prunes_the_layer_the_report_names(named):
    """profiler.random_pruned_onnx (the calibration's pruning) and the report name layers alike, unnamed nodes
    included: pruning the report's live conv by its name shows in the report's row of that name."""
    from alcs_tvm.profiler import random_pruned_onnx

    model = _mixed_conv_model(np.random.default_rng(4), named=named)
    (live,) = compiler.model_layers(model, "x86")
    assert live.name == ("live_conv" if named else "Conv_3")  # the 4th Conv (the ConvTranspose is not one)
    assert live.density == pytest.approx(0.5, abs=0.01)
    pruned = random_pruned_onnx(model, 16, {live.name: 0.9}, np.random.default_rng(6))
    (layer,) = compiler.model_layers(pruned, "x86")
    assert layer.name == live.name and layer.density <= 0.1 + 0.01  # 90% of its blocks pruned now
    assert compiler.conv_node_names(model)[-1] == live.name


# ------------------------------------------------------ shape computations, constant subgraphs, inference no-ops


def _paddle_reshape_model(rng):
    """Paddle2ONNX's flatten: ``Shape -> Cast(int32) -> Slice -> Cast(int64) -> Concat -> Reshape``, after a conv
    pruned to half its SIMD blocks."""
    w = random_block_sparse(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), 16, 0.5, rng)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0], np.int32), "start"),
             numpy_helper.from_array(np.array([2], np.int32), "end"),
             numpy_helper.from_array(np.array([0], np.int32), "axes"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["c"], ["s"], name="shape"),
             helper.make_node("Cast", ["s"], ["s32"], name="to_int32", to=TensorProto.INT32),
             helper.make_node("Slice", ["s32", "start", "end", "axes"], ["nc"], name="slice"),
             helper.make_node("Cast", ["nc"], ["nc64"], name="to_int64", to=TensorProto.INT64),
             helper.make_node("Concat", ["nc64", "minus_one"], ["new_shape"], name="concat", axis=0),
             helper.make_node("Reshape", ["c", "new_shape"], ["y"], name="reshape")]
    return _model(nodes, [_input("x", ["N", 16, 8, 8])], [_input("y", ["N", 32, 64])], inits, opset=13)


def test_paddle2onnx_shape_computation_folds_and_matches_onnx_runtime():
    """TVM's importer cannot convert this Reshape ('Reshape requires the input new shape to be Shape. However,
    the given one is relax.TensorType') although every shape is static once the input's is given."""
    model = _paddle_reshape_model(np.random.default_rng(7))
    x = np.random.default_rng(8).standard_normal((2, 16, 8, 8)).astype(np.float32)
    (expected,) = _run_ort(model, {"x": x})
    executable, report = compiler.compile(model, "x86", input_shapes={"x": (2, 16, 8, 8)})
    _assert_close(_run_vm(executable, x)[0], expected)
    assert [(layer.name, layer.decision) for layer in report.layers] == [("conv_a", "sparse")]


def _gemm_dropout_model(rng):
    """A classifier head: Gemm -> Relu -> Dropout -> Identity -> Gemm."""
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], name="fc1", transB=1),
             helper.make_node("Relu", ["g1"], ["r1"], name="relu1"),
             helper.make_node("Dropout", ["r1"], ["d1"], name="drop1"),
             helper.make_node("Identity", ["d1"], ["i1"], name="ident"),
             helper.make_node("Gemm", ["i1", "w2", "b2"], ["y"], name="fc2", transB=1)]
    return _model(nodes, [_input("x", [1, 32])], [_input("y", [1, 10])], inits, opset=13)


def _primfuncs(lowered) -> dict:
    return {gv.name_hint: func for gv, func in lowered.functions.items() if isinstance(func, tvm.tirx.PrimFunc)}


def test_inference_dropout_after_an_fc_is_dropped_so_the_fc_gets_the_dense_schedule():
    """The Dropout fused into the FC's function (two outputs, its mask included) and left it to the fallback
    schedule: scalar, no vector loop."""
    model = _gemm_dropout_model(np.random.default_rng(9))
    mod = frontend.prepare_for_sparse(frontend.import_onnx(model))
    assert "dropout" not in mod["main"].script()
    executable, _, lowered = compiler.compile_module(mod, "x86")
    matmuls = {name: func for name, func in _primfuncs(lowered).items() if "matmul" in name}
    assert len(matmuls) == 2 and not any("dropout" in name for name in _primfuncs(lowered))
    assert all("T.vectorized" in func.script() for func in matmuls.values())
    x = np.random.default_rng(10).standard_normal((1, 32)).astype(np.float32)
    (expected,) = _run_ort(model, {"x": x})
    _assert_close(_run_vm(executable, x)[0], expected)


def test_folding_keeps_the_graph_order_of_convs_and_their_names():
    """ONNX Runtime saves the folded graph in an order of its own (SqueezeNet's fire modules come out with
    their expand convs swapped); the import puts nodes back in the model's order, so the report's rows are too."""
    model = _light_model("squeezenet")
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    mod = frontend.import_onnx(model)
    conv2d = tvm.ir.Op.get("relax.nn.conv2d")
    calls = [b.value for block in mod["main"].body.blocks for b in block.bindings]
    assert [frontend.layer_node_name(call) for call in calls if getattr(call, "op", None) == conv2d] == convs


# -------------------------------------------------------------------------------------- the light zoo models


def _light_model(name):
    return onnx.load(os.path.join(public_models.light_zoo_dir(), f"light_{name}.onnx"))


@pytest.mark.slow
def test_light_alexnet_imports_folded_and_matches_onnx_runtime():
    """Weights from ConstantOfShape, initializers listed as inputs (IR version 3), a Dropout after FC6 and FC7:
    every weight is a constant after the import, the Dropouts are gone and the FCs are scheduled; the output of
    the same graph with random weights equals ONNX Runtime's."""
    model = _light_model("bvlc_alexnet")
    mod = frontend.import_onnx(model)
    assert "full" not in mod["main"].script() and "dropout" not in mod["main"].script()
    randomised = public_models.light_zoo_model("bvlc_alexnet", seed=11)  # random weights: wiring shows
    x = np.random.default_rng(12).standard_normal((1, 3, 224, 224)).astype(np.float32)
    (expected,) = _run_ort(randomised, {"data_0": x})
    executable, _, lowered = compiler.compile_module(frontend.prepare_for_sparse(frontend.import_onnx(randomised)),
                                                     "x86")
    assert not any("dropout" in name for name in _primfuncs(lowered))
    _assert_close(_run_vm(executable, x)[0], expected)
