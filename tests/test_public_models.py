"""The public ONNX models the real-network benchmark runs: random weights that keep activations in range, and
SIMD-block pruning of an ONNX file."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from alcs_tvm import public_models
from alcs_tvm.sparse_format import BlockSparseWeight


def _run(model):
    (name, shape), = public_models.input_shapes(model).items()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "shufflenet"])
def test_light_zoo_with_random_weights_keeps_its_activations_in_range(name):
    """Deep nets with BatchNorm: uncalibrated statistics overflowed ResNet-50 and DenseNet-121 to NaN and ShuffleNet
    to 1e26; calibrated, the logits are finite, of order one, and differ between classes."""
    model = public_models.light_zoo_model(name)
    assert not any(node.op_type in ("ConstantOfShape", "Softmax") for node in model.graph.node)
    (logits,) = _run(model)
    assert np.isfinite(logits).all()
    assert 0.1 < float(logits.std()) < 100, float(logits.std())


def test_prune_simd_blocks_zeroes_simd_blocks_of_every_conv_but_depthwise_ones():
    """ShuffleNet's groups=1 stem and grouped 1x1 convs lose 70 % of their blocks (a grouped conv's within its
    [Cout, Cin/groups] weight); its depthwise convs keep every weight."""
    model = public_models.light_zoo_model("shufflenet")
    pruned = public_models.prune_simd_blocks(model, 16, 0.7, seed=1)
    weights = {init.name: numpy_helper.to_array(init) for init in pruned.graph.initializer}
    seen = {"dense": 0, "grouped": 0, "depthwise": 0}
    for node in pruned.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = weights[node.input[1]]
        density = BlockSparseWeight.from_dense(weight, 16).density
        kind = "dense" if group == 1 else "depthwise" if weight.shape[1] == 1 else "grouped"
        if kind == "depthwise":
            assert density > 0.9, (node.name, density)
        else:
            assert abs(density - 0.3) < 0.05, (node.name, kind, density)
        seen[kind] += 1
    assert all(seen.values()), seen
    assert np.isfinite(_run(pruned)[0]).all()


def test_unknown_public_model_is_one_clear_line():
    with pytest.raises(ValueError, match="unknown public model 'light_nope'; choose from light_bvlc_alexnet"):
        public_models.public_model("light_nope")


def test_network_resolves_files_public_and_zoo_names(tmp_path):
    """The tools' --models names: a zoo network is exported at the input shape asked for (seeded weights: the same
    name gives the same model twice), a public name and an ONNX path load as they are, anything else is one line."""
    import onnx

    tiny = public_models.network("small_cnn", input_shape=(1, 1, 20, 20))
    assert public_models.input_shapes(tiny) == {"input": (1, 1, 20, 20)}
    again = public_models.network("small_cnn", input_shape=(1, 1, 20, 20))
    assert [numpy_helper.to_array(i).tolist() for i in tiny.graph.initializer] == \
        [numpy_helper.to_array(i).tolist() for i in again.graph.initializer]
    squeezenet = public_models.network("light_squeezenet")
    assert public_models.input_shapes(squeezenet) == {"data_0": (1, 3, 224, 224)}
    onnx.save(tiny, str(tmp_path / "mine.onnx"))
    assert public_models.network(str(tmp_path / "mine.onnx")).graph == tiny.graph
    with pytest.raises(ValueError, match="unknown network 'resnet7': not an ONNX file, a public model"):
        public_models.network("resnet7")


def test_prune_simd_blocks_prunes_fully_connected_layers_which_then_run_sparse():
    """AlexNet's and VGG's Gemm layers ([out, in] with transB, [in, out] without) and a MatMul: 70 % of their
    blocks of 16 consecutive outputs at one input zeroed, each then compiled as a sparse GEMV that matches ONNX
    Runtime; with ``fully_connected=False`` they keep every weight."""
    import tvm
    from onnx import TensorProto, helper
    from tvm import relax

    from alcs_tvm import compiler

    rng = np.random.default_rng(3)
    weights = {"w1": rng.standard_normal((96, 48)), "w2": rng.standard_normal((96, 64)),
               "w3": rng.standard_normal((64, 32))}
    inits = [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["a"], name="fc_t", transB=1),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["b"], name="fc_n"),
             helper.make_node("MatMul", ["b", "w3"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert public_models.prune_simd_blocks(model, 16, 0.7, fully_connected=False) == model
    pruned = public_models.prune_simd_blocks(model, 16, 0.7, seed=2)
    blocked = {init.name: numpy_helper.to_array(init) for init in pruned.graph.initializer}
    for name, out_axis_first in (("w1", blocked["w1"]), ("w2", blocked["w2"].T), ("w3", blocked["w3"].T)):
        assert BlockSparseWeight.from_dense(np.ascontiguousarray(out_axis_first), 16).density == \
            pytest.approx(0.3, abs=0.03), name
    x = rng.standard_normal((1, 48)).astype(np.float32)
    executable, report = compiler.compile(pruned, "x86")
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    (expected,) = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
    linear = [layer for layer in report.layers if layer.op == "linear"]
    assert len(linear) == 3 and all(layer.decision == "sparse" for layer in linear), report.table()
