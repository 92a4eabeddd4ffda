"""ONNX import + prepare_for_sparse: numerics against ONNX Runtime, the canonical conv pattern, error messages."""
import functools

import helpers
import numpy as np
import onnx
import pytest
import torch
import tvm
from helpers import run_onnxruntime, run_vm
from onnx import TensorProto, helper
from torch import nn
from tvm import relax

from alcs_tvm import frontend, zoo

LLVM = {"kind": "llvm"}


# ---------------------------------------------------------------------------------------------- helpers


def _export(tmp_path, name, model, shape, **kw):
    return zoo.export_onnx(model, tmp_path / f"{name}.onnx", shape, **kw)


def _run_tvm(mod, x):
    return run_vm(tvm.compile(mod, target=tvm.target.Target(LLVM)), x)


_assert_close = functools.partial(helpers.assert_close, rtol=1e-4)  # atol: 1e-4 * max |ref|


def _const(expr):
    return isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor)


def _bindings(mod):
    """(ordered [(var, value)], {var: [consumer values]}) of main's bindings."""
    func = mod["main"]
    binds = [(b.var, b.value) for block in func.body.blocks for b in block.bindings]
    consumers = {}
    for var, value in binds:
        args = value.args if isinstance(value, relax.Call) else getattr(value, "fields", [])
        for a in args:
            if isinstance(a, relax.Var):
                consumers.setdefault(a, []).append(value)
    return binds, consumers


def _op(value):
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else None


def _check_conv_pattern(mod, activations):
    """Every conv2d: constant OIHW weight, only consumer R.add(conv, const [1,Cout,1,1]); returns the ops that
    consume each bias add (to check activations)."""
    assert [gv.name_hint for gv in mod.functions] == ["main"]  # nothing legalised, no leftover PrimFuncs
    binds, consumers = _bindings(mod)
    ops = [_op(v) for _, v in binds]
    assert "relax.call_tir" not in ops and "relax.nn.batch_norm" not in ops
    after_bias = []
    nconv = 0
    for var, value in binds:
        if _op(value) != "relax.nn.conv2d":
            continue
        nconv += 1
        weight = value.args[1]
        assert _const(weight), f"conv {var} has a non-constant weight"
        assert value.attrs.data_layout == "NCHW" and value.attrs.kernel_layout == "OIHW"
        cout = weight.value.numpy().shape[0]
        (add,) = consumers[var]
        assert _op(add) == "relax.add" and add.args[0].same_as(var) and _const(add.args[1])
        assert add.args[1].value.numpy().shape == (1, cout, 1, 1)
        add_var = next(v for v, val in binds if val.same_as(add))
        after_bias.append(sorted(_op(c) for c in consumers.get(add_var, [])))
    for v in after_bias:
        for op in v:
            if op not in ("relax.add", *activations) and op is not None:
                raise AssertionError(f"unexpected consumer {op} of a conv bias add")
    for _, value in binds:
        if _op(value) == "relax.clip":
            lo, hi = (float(a.value) for a in value.args[1:])
            assert (lo, hi) == (0.0, 6.0)
    return nconv, after_bias


# ---------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name,prune", [("resnet_tiny", None), ("resnet_tiny", 8), ("mobilenet_v2_tiny", None),
                                        ("small_cnn", 16)])
def test_tiny_models_match_onnxruntime(tmp_path, name, prune):
    model = zoo.get_model(name)
    if prune:
        zoo.simd_prune_(model, prune, 0.5, rng=0)
    shape = (1, 1, 8, 8) if name == "small_cnn" else zoo.DEFAULT_INPUT_SHAPES[name]
    path = _export(tmp_path, name, model, shape)
    mod = frontend.prepare_for_sparse(frontend.import_onnx(path))
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    _assert_close(_run_tvm(mod, x), run_onnxruntime(path, x))


def test_unfolded_batchnorm_is_folded_into_conv(tmp_path):
    """An ONNX file that still has BatchNormalization nodes (exported without constant folding), including a conv
    with its own bias and a BN not preceded by a conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
                          nn.BatchNorm2d(16)).eval()
    with torch.no_grad():
        for bn in (model[1], model[4], model[6]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    path = tmp_path / "bn.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(path), input_names=["input"], opset_version=17,
                      do_constant_folding=False, dynamo=False)
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node) == 3
    mod = frontend.prepare_for_sparse(frontend.import_onnx(path))
    nconv, after = _check_conv_pattern(mod, ("relax.nn.relu", "relax.clip", "relax.subtract"))
    assert nconv == 2 and after[0] == ["relax.nn.relu"] and after[1] == ["relax.clip"]
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    _assert_close(_run_tvm(mod, x), run_onnxruntime(path, x))


def test_user_shape_for_dynamic_batch(tmp_path):
    model = zoo.small_cnn()
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(model, (torch.randn(1, 1, 8, 8),), str(path), input_names=["input"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    with pytest.raises(ValueError, match=r"input 'input' has dynamic dim 0 \(batch\)") as err:
        frontend.import_onnx(path)
    assert "\n" not in str(err.value)
    mod = frontend.prepare_for_sparse(frontend.import_onnx(path, "input:3x1x8x8"))
    x = np.random.default_rng(3).standard_normal((3, 1, 8, 8)).astype(np.float32)
    _assert_close(_run_tvm(mod, x), run_onnxruntime(path, x))


# ---------------------------------------------------------------------------------------------- pattern


def test_resnet18_conv_pattern(tmp_path):
    path = _export(tmp_path, "resnet18", zoo.resnet18(), (1, 3, 224, 224))
    mod = frontend.prepare_for_sparse(frontend.import_onnx(path))
    nconv, after = _check_conv_pattern(mod, ("relax.nn.relu",))
    assert nconv == 20
    # Stem + first conv of each of the 8 blocks -> relu; second convs (8) and downsamples (3) -> residual add.
    assert sum(a == ["relax.nn.relu"] for a in after) == 9 and sum(a == ["relax.add"] for a in after) == 11
    assert mod["main"].params[0].ty.shape[1] == 3 and len(mod["main"].params) == 1


@pytest.mark.parametrize("name,shape,nconv,nclip,groups", [
    ("mobilenet_v2_tiny", (1, 3, 32, 32), 16, 11, 16),
    ("mobilenet_v2", (1, 3, 224, 224), 52, 35, 960),
])
def test_mobilenet_v2_conv_pattern(tmp_path, name, shape, nconv, nclip, groups):
    path = _export(tmp_path, name, zoo.get_model(name), shape)
    mod = frontend.prepare_for_sparse(frontend.import_onnx(path))
    # Linear bottlenecks: a project conv's bias add feeds the next block's conv (or the residual add) directly.
    found, after = _check_conv_pattern(mod, ("relax.clip", "relax.nn.conv2d"))
    assert found == nconv and sum(a == ["relax.clip"] for a in after) == nclip
    script = mod["main"].script(show_meta=False)
    assert "R.clip(" in script and f"groups={groups}," in script


def test_prepare_binds_params(tmp_path):
    """A module whose weights are function parameters (keep_params_in_input=True) gets them bound as constants."""
    from tvm.relax.frontend.onnx import from_onnx

    path = _export(tmp_path, "s", zoo.small_cnn(), (1, 1, 8, 8))
    mod = from_onnx(onnx.load(path), keep_params_in_input=True)
    assert len(mod["main"].params) > 1
    x = np.random.default_rng(4).standard_normal((1, 1, 8, 8)).astype(np.float32)
    ref = run_onnxruntime(path, x)
    # From the "params" attribute ...
    prepared = frontend.prepare_for_sparse(mod)
    assert _check_conv_pattern(prepared, ("relax.nn.relu",))[0] == 3 and len(prepared["main"].params) == 1
    _assert_close(_run_tvm(prepared, x), ref)
    # ... or given explicitly, by name.
    detached, params = relax.frontend.detach_params(mod)
    names = [p.name for p in detached["main"].params[1:]]
    prepared = frontend.prepare_for_sparse(detached, dict(zip(names, params["main"])))
    assert _check_conv_pattern(prepared, ("relax.nn.relu",))[0] == 3 and len(prepared["main"].params) == 1


# ---------------------------------------------------------------------------------------------- errors


def _tiny_graph(nodes, inits=(), opset=17, in_shape=(1, 3, 8, 8), out_shape=(1, 3, 8, 8), in_name="input"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _one_line_error(fn, *args, match, **kw):
    with pytest.raises(ValueError, match=match) as err:
        fn(*args, **kw)
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def test_not_onnx_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not an onnx model\n")
    _one_line_error(frontend.import_onnx, path, match="not a valid ONNX model")
    _one_line_error(frontend.load_onnx, tmp_path / "missing.onnx", match="does not exist")
    (tmp_path / "empty.onnx").write_bytes(b"")
    _one_line_error(frontend.load_onnx, tmp_path / "empty.onnx", match="is empty")


def test_truncated_onnx_file(tmp_path):
    path = _export(tmp_path, "s", zoo.small_cnn(), (1, 1, 8, 8))
    data = open(path, "rb").read()
    for cut in (len(data) // 2, len(data) - 3):
        bad = tmp_path / f"cut{cut}.onnx"
        bad.write_bytes(data[:cut])
        _one_line_error(frontend.import_onnx, bad, match="not a valid ONNX model")


def test_unsupported_ops_listed_before_import():
    model = _tiny_graph([helper.make_node("Relu", ["input"], ["a"], name="r0"),
                         helper.make_node("FancyActivation", ["a"], ["b"], name="fancy0", domain="my.ops"),
                         helper.make_node("Celu", ["b"], ["y"], name="celu0")],
                        opset=17)
    model.opset_import.append(helper.make_opsetid("my.ops", 1))
    msg = _one_line_error(frontend.import_onnx, model, match="not supported by TVM's ONNX frontend")
    assert "Celu (node 'celu0')" in msg and "my.ops.FancyActivation (node 'fancy0')" in msg and "Relu" not in msg
    assert set(frontend.unsupported_ops(model)) == {"Celu", "my.ops.FancyActivation"}


def test_conversion_failure_names_op_and_node():
    model = _tiny_graph([helper.make_node("Reshape", ["input", "s"], ["y"], name="bad_reshape")],
                        [helper.make_tensor("s", TensorProto.INT64, [2], [5, 5])], out_shape=(5, 5))
    _one_line_error(frontend.import_onnx, model, match=r"could not convert ONNX op Reshape \(node 'bad_reshape'")


@pytest.mark.parametrize("text", ["", "input", "input=1x3", "input:1x3x", "input:axb", ":1x2", "input:1x0",
                                  "input:1x3,input:1x3"])
def test_bad_input_shape_text(text):
    _one_line_error(frontend.parse_input_shapes, text, match="input shape|input-shape|given twice|non-positive")


def test_parse_input_shapes():
    assert frontend.parse_input_shapes("input:1x3x224x224, other.name:1X10") == {
        "input": (1, 3, 224, 224), "other.name": (1, 10)}


def test_unknown_input_name_and_rank_mismatch():
    model = _tiny_graph([helper.make_node("Relu", ["input"], ["y"], name="r0")])
    _one_line_error(frontend.import_onnx, model, "image:1x3x8x8", match="unknown input name.*'image'.*'input'")
    _one_line_error(frontend.import_onnx, model, {"input": (1, 3, 8)}, match="has rank 4")
    mod = frontend.import_onnx(model, {"input": (2, 3, 8, 8)})
    assert [int(d) for d in mod["main"].params[0].ty.shape] == [2, 3, 8, 8]


@pytest.mark.parametrize("beta", [0.75, 0.5, 1.25, 2.0, 0.6])
def test_lrn_power_becomes_square_roots_and_matches_onnx_runtime(beta):
    """AlexNet's, ZFNet's and GoogLeNet's LocalResponseNormalization divides by a power with beta = 0.75: as a
    power it is a scalar libm call per element; quarter exponents become square roots and products."""
    from alcs_tvm import compiler

    node = helper.make_node("LRN", ["x"], ["y"], size=5, alpha=1e-4, beta=beta, bias=1.0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 9, 9])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = (np.random.default_rng(0).standard_normal((1, 16, 9, 9)) * 30).astype(np.float32)
    executable, report = compiler.compile(model, "x86")
    script = report.relax_module["main"].script()
    assert ("R.power" in script) == (beta == 0.6), script
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    expected = run_onnxruntime(model.SerializeToString(), x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


@pytest.mark.parametrize("addends", [1, 2, 3])
def test_a_sum_is_a_chain_of_adds_and_a_residual_sum_fuses_into_the_conv(addends):
    """Caffe2-era graphs (the light zoo's ResNet-50) add a residual with ``Sum``: as Adds the shortcut fuses into
    the conv's epilogue (TVM imports a Sum as stack + sum, an elementwise kernel of its own)."""
    from onnx import numpy_helper

    from alcs_tvm import compiler

    rng = np.random.default_rng(addends)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 16, 1, 1)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("Sum", ["c", "x", "x"][:addends], ["s"], name="sum"),
             helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    executable, report = compiler.compile(model, "x86")
    script = report.relax_module["main"].script()
    assert "R.sum" not in script and "stack" not in script, script
    if addends == 2:
        assert report.layers[0].kernel.residual is not None, report.table()
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    expected = run_onnxruntime(model.SerializeToString(), x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
