"""The Relax pass and `alcs compile` on SIMD-pruned ResNet- and MobileNetV2-style networks, against ONNX Runtime."""
import functools
import os

import helpers
import numpy as np
import onnx
import pytest
from helpers import assert_aarch64_elf, requires_avx512, run_cli, run_onnxruntime, run_vm

from alcs_tvm import zoo
from alcs_tvm.compiler import compile as alcs_compile
from alcs_tvm.compiler import export
from alcs_tvm.target import resolve_target

RTOL = 1e-4
V = helpers.host_vector_width()  # the pruning group and the layouts' block
BLOCKED = f"NCHW{V}c"


@pytest.fixture(scope="module")
def pruned_models(tmp_path_factory):
    """Tiny ResNet / MobileNetV2 pruned in 16-wide SIMD blocks at 70% (8-wide blocks too, for AVX2 hosts), exported
    to ONNX."""
    out = {}
    for name in ("resnet_tiny", "mobilenet_v2_tiny"):
        model = zoo.get_model(name).eval()
        zoo.simd_prune_(model, 16, 0.7, rng=0)
        path = tmp_path_factory.mktemp("models") / f"{name}.onnx"
        zoo.export_onnx(model, path, (1, 3, 32, 32))
        out[name] = path
    return out


assert_close = functools.partial(helpers.assert_close, rtol=RTOL)  # atol: RTOL * max |expected|


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_v2_tiny"])
def test_pruned_model_matches_onnx_runtime(pruned_models, name):
    path = pruned_models[name]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    executable, report = alcs_compile(str(path), "x86")
    assert_close(run_vm(executable, x), run_onnxruntime(path, x))
    convs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    conv_layers = [layer for layer in report.layers if layer.op == "conv2d"]
    assert len(conv_layers) == len(convs)
    for layer, node in zip(conv_layers, convs):
        assert layer.name == node.name
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        if groups == 1:  # every pruned groups=1 conv goes sparse, at the density it was pruned to
            assert layer.decision == "sparse", layer
            assert layer.vector_width == V and layer.density == pytest.approx(0.3, abs=0.05)
        else:  # depthwise stays dense and says why
            assert layer.decision == "dense" and "depthwise" in layer.reason


def test_dense_and_threshold_decisions(pruned_models):
    path = pruned_models["resnet_tiny"]
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    executable, report = alcs_compile(str(path), "x86", sparse=False)
    assert all(layer.decision == "dense" for layer in report.layers)
    assert_close(run_vm(executable, x), run_onnxruntime(path, x))
    _, report = alcs_compile(str(path), "x86", density_threshold=0.1)
    assert all(layer.decision == "dense" and "> threshold 0.10" in layer.reason for layer in report.layers)
    assert [layer.op for layer in report.layers].count("linear") == 1


def test_pass_composes_with_tvm_sequential(pruned_models):
    import tvm
    from tvm import relax

    from alcs_tvm import frontend
    from alcs_tvm.passes import SparseConvRewrite

    path = pruned_models["resnet_tiny"]
    mod = frontend.prepare_for_sparse(frontend.import_onnx(str(path)))
    rewrite = SparseConvRewrite("x86")
    seq = tvm.transform.Sequential([rewrite, relax.transform.LegalizeOps(), relax.transform.FoldConstant()])
    lowered = seq(mod)
    kernels = [gv.name_hint for gv in lowered.get_global_vars() if gv.name_hint.startswith("alcs_spconv_")]
    assert kernels and len(rewrite.report.sparse_layers) == 12
    assert "nn.conv2d" not in lowered["main"].script()
    executable = tvm.compile(lowered, target=rewrite.target_info.target)
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert_close(run_vm(executable, x), run_onnxruntime(path, x))


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_v2_tiny"])
def test_arm64_library_builds(pruned_models, name, tmp_path):
    executable, report = alcs_compile(str(pruned_models[name]), "arm64")
    # pruned in 16-wide groups: as sparse in 8-wide blocks (two q registers) where Cout allows them
    info = resolve_target("arm64")
    assert report.sparse_layers and all(layer.vector_width == info.group_width(layer.spec.out_channels)
                                        for layer in report.sparse_layers)
    assert {layer.vector_width for layer in report.sparse_layers} >= {8}
    assert_aarch64_elf(export(executable, tmp_path / f"{name}_arm64.so", "arm64"))


def test_cli_compile_writes_library_and_report(pruned_models, tmp_path):
    import json

    out = tmp_path / "resnet_tiny.so"
    result = run_cli("compile", pruned_models["resnet_tiny"], "--target", "x86", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "sparse" in result.stdout and "12 sparse, 1 dense" in result.stdout
    report = json.loads((tmp_path / "resnet_tiny.so.report.json").read_text())
    assert report["summary"] == {"sparse": 12, "dense": 1}  # the unpruned linear head stays a Relax matmul
    import tvm

    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert_close(run_vm(tvm.runtime.load_module(str(out)), x), run_onnxruntime(pruned_models["resnet_tiny"], x))


def _unsupported_op_model(path):
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["input"], ["output"], domain="", name="mystery")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("case, expect", [
    ("not-onnx", "ONNX"),
    ("unsupported-op", "NoSuchOp"),
    ("bad-shapes", "input"),
    ("unknown-target", "unknown target"),
    ("missing-file", "no such model file"),
    ("table-for-another-target", "measured for target"),
])
def test_cli_errors_are_one_line(pruned_models, tmp_path, case, expect):
    model, extra = pruned_models["resnet_tiny"], []
    if case == "not-onnx":
        model = tmp_path / "junk.onnx"
        model.write_text("this is not a model")
    elif case == "unsupported-op":
        model = tmp_path / "odd.onnx"
        _unsupported_op_model(model)
    elif case == "bad-shapes":
        extra = ["--input-shapes", "imput:1x3x32x32"]
    elif case == "unknown-target":
        extra = ["--target", "sparc"]
    elif case == "missing-file":
        model = tmp_path / "nope.onnx"
    elif case == "table-for-another-target":  # an (empty) table made for the ARM target, used for x86
        import json as _json

        import tvm

        from alcs_tvm.latency import LatencyTable
        from alcs_tvm.target import resolve_target

        arm = resolve_target("arm64")
        table = tmp_path / "arm64_table.json"
        LatencyTable(_json.loads(arm.key), arm.family, "arm64-qemu", tvm.__version__).save(str(table))
        extra = ["--target", "x86", "--latency-table", table]
    result = run_cli("compile", model, "-o", tmp_path / "out.so", *extra)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expect.lower() in lines[0].lower()


def test_pruned_linear_head_goes_sparse_batch_2(tmp_path):
    model = zoo.get_model("resnet_tiny").eval()
    zoo.simd_prune_(model, 16, 0.7, rng=0, include_linear=True)
    path = tmp_path / "resnet_tiny_fc.onnx"
    zoo.export_onnx(model, path, (2, 3, 32, 32))
    executable, report = alcs_compile(str(path), "x86")
    linear = [layer for layer in report.layers if layer.op == "linear"]
    assert len(linear) == 1 and linear[0].decision == "sparse" and linear[0].density == pytest.approx(0.3, abs=0.05)
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert_close(run_vm(executable, x), run_onnxruntime(path, x))


def test_resnet_blocks_stay_blocked_with_shortcuts_fused(pruned_models):
    """In ResNet every rewritten conv but the last writes NCHW[V]c with the zero border its readers need: conv1 for
    conv2, and a block's output for the next block's conv1 (border 1), its 1x1 stride-2 shortcut conv (reads
    the border-1 tensor with padding 0) and the next block's conv2, whose epilogue adds it (the residual add and
    relu are fused: no separate add op, no transpose, no pad copy). The result still matches ONNX Runtime."""
    import tvm

    from alcs_tvm import frontend
    from alcs_tvm.compiler import conv_node_names
    from alcs_tvm.passes import SparseConvRewrite

    path = pruned_models["resnet_tiny"]
    rewrite = SparseConvRewrite("x86", layer_names=conv_node_names(frontend.load_onnx(str(path))))
    lowered = rewrite(frontend.prepare_for_sparse(frontend.import_onnx(str(path))))
    convs = [layer for layer in rewrite.report.layers if layer.op == "conv2d"]
    blocked = [layer.name for layer in convs if f"writes {BLOCKED} padded" in layer.implementation]
    assert blocked == [layer.name for layer in convs if layer.name != "/layer4/layer4.0/conv2/Conv"]
    kernels = {layer.name: layer.kernel for layer in convs}
    for stage in (1, 2, 3, 4):
        assert kernels[f"/layer{stage}/layer{stage}.0/conv2/Conv"].residual == "blocked"
    for stage in (2, 3, 4):
        shortcut = kernels[f"/layer{stage}/layer{stage}.0/downsample/downsample.0/Conv"]
        assert shortcut.input_block == V and shortcut.input_border == (1, 1, 1, 1)
    script = lowered["main"].script()
    assert f"R.Tensor((1, {16 // V}, 34, 34, {V})" in script  # the stem's output: 16 channels, 32x32 + border 1
    assert script.count("R.add(") == 1  # only the classifier's bias: every residual add is in a conv epilogue
    executable = tvm.compile(lowered, target=rewrite.target_info.target)
    x = np.random.default_rng(6).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert_close(run_vm(executable, x), run_onnxruntime(path, x))


def test_expand_depthwise_project_chain_runs_blocked(pruned_models):
    """MobileNetV2's expand -> depthwise -> project: the depthwise conv between two rewritten convs runs
    channel-blocked, in one kernel with the expand conv before it (the first one, after the tiny net's 3x3
    stride-1 stem, which writes NCHW, in the depthwise kernel), the project conv reads NCHW[V]c, and
    outputs still match."""
    path = pruned_models["mobilenet_v2_tiny"]
    executable, report = alcs_compile(str(path), "x86")
    depthwise = [layer for layer in report.layers if "depthwise" in layer.reason]
    fused = [layer for layer in depthwise if layer.implementation.startswith(f"alcs expand + depthwise {BLOCKED}")]
    assert depthwise[0].implementation.startswith(f"alcs depthwise {BLOCKED} kernel (")
    assert fused == depthwise[1:] and all(layer.symbol.startswith("alcs_expand_dwconv_") for layer in fused)
    x = np.random.default_rng(7).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert_close(run_vm(executable, x), run_onnxruntime(path, x))


@pytest.fixture(scope="module")
def wide_pruned_models(tmp_path_factory):
    """The same tiny networks pruned as the AVX-512 target prunes them: groups of 32 output channels where a
    conv's channels allow it, 16 elsewhere."""
    from alcs_tvm.target import resolve_target

    info = resolve_target("x86-avx512")
    out = {}
    for name in ("resnet_tiny", "mobilenet_v2_tiny"):
        model = zoo.get_model(name).eval()
        zoo.simd_prune_(model, info, 0.7, rng=1)
        path = tmp_path_factory.mktemp("wide") / f"{name}.onnx"
        zoo.export_onnx(model, path, (1, 3, 32, 32))
        out[name] = path
    return out


@pytest.fixture(scope="module")
def wide_compiled(wide_pruned_models):
    """``wide_compiled(name)``: the wide-pruned model compiled for x86-avx512, ``(executable, report)``, built once
    per module whichever test asks first."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = alcs_compile(str(wide_pruned_models[name]), "x86-avx512")
        return built[name]

    return get


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_v2_tiny"])
def test_wide_groups_where_channels_allow_and_layouts_still_chain(wide_pruned_models, wide_compiled, pruned_models,
                                                                  name):
    """AVX-512: a conv whose output channels are a multiple of 32 and whose weight is pruned in 32-channel groups
    runs with V=32 (two registers per kept position share each input broadcast); the others keep V=16; every
    conv still reads and writes NCHW16c (a 32-group is stored as two 16c blocks), so the chains and fused
    shortcuts are unchanged. The same network pruned in 16-groups stays at V=16: its zeros are not 32-structured.
    (Compiling only: any host; the outputs are the next test's.)"""
    path = wide_pruned_models[name]
    _, report = wide_compiled(name)
    convs = [layer for layer in report.layers if layer.op == "conv2d" and layer.decision == "sparse"]
    widths = {layer.name: layer.vector_width for layer in convs}
    graph = onnx.load(str(path)).graph
    dims = {init.name: init.dims[0] for init in graph.initializer}
    cout = {node.name: dims[node.input[1]] for node in graph.node if node.op_type == "Conv"}
    assert widths and all(v == (32 if cout[n] % 32 == 0 and cout[n] >= 64 else 16) for n, v in widths.items())
    assert 32 in widths.values() and all(layer.density == pytest.approx(0.3, abs=0.06) for layer in convs)
    for layer in convs:
        if layer.kernel.output_blocked:
            assert "NCHW16c" in layer.implementation
            assert layer.kernel.out_block == (16 if layer.vector_width == 32 else 0)
    _, narrow = alcs_compile(str(pruned_models[name]), "x86-avx512")
    assert {layer.vector_width for layer in narrow.sparse_layers} == {16}


@requires_avx512
@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_v2_tiny"])
def test_wide_groups_model_matches_onnx_runtime(wide_pruned_models, wide_compiled, name):
    """The wide-pruned networks compiled for x86-avx512 (V=32 and V=16 convs chained) equal ONNX Runtime's
    outputs: runs AVX-512 code, so only on a host that has it."""
    path = wide_pruned_models[name]
    x = np.random.default_rng(8).standard_normal((1, 3, 32, 32)).astype(np.float32)
    executable, _ = wide_compiled(name)
    assert_close(run_vm(executable, x), run_onnxruntime(path, x))


def test_cli_gives_tvm_an_explicit_thread_count_unless_the_user_did():
    from alcs_tvm.cli import default_tvm_threads

    env = {}
    assert default_tvm_threads(env) == env["TVM_NUM_THREADS"] == str(max(1, (os.cpu_count() or 2) // 2))
    env = {"OMP_NUM_THREADS": "3"}
    assert default_tvm_threads(env) == "3"
    env = {"TVM_NUM_THREADS": "7", "OMP_NUM_THREADS": "3"}
    assert default_tvm_threads(env) == "7" and env["TVM_NUM_THREADS"] == "7"
