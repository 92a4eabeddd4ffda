"""The ARM path end to end on the emulated ARM64 device: SIMD-pruned (V=4) ResNet- and MobileNetV2-style models
compiled by `alcs compile --target arm64` and sparse conv layers of the operator's correctness matrix, run over
the RPC tracker and compared with PyTorch. (Emulated timings are not phone timings; correctness is real.)"""
import functools
import json
import re
import subprocess

import helpers
import numpy as np
import pytest
import torch
from helpers import run_cli, stable_seed, torch_conv

from alcs_tvm import zoo
from alcs_tvm.run import run_model

pytestmark = pytest.mark.device  # every test here runs on the emulated ARM64 device

RTOL = 1e-4


assert_close = functools.partial(helpers.assert_close, rtol=RTOL)  # atol: RTOL * max |expected|


@pytest.mark.parametrize("name, groups", [("resnet_tiny", "4"), ("mobilenet_v2_tiny", "4"),
                                          ("resnet_tiny", "target"), ("mobilenet_v2_tiny", "target")])
def test_pruned_model_on_arm64_device(rpc_devices, cross_cxx, tmp_path, name, groups):
    """Pruned in groups of 4 (one q register) or in the target's group widths (8 where Cout allows)."""
    from alcs_tvm.target import resolve_target

    info = resolve_target("arm64")
    model = zoo.get_model(name).eval()
    zoo.simd_prune_(model, 4 if groups == "4" else info, 0.7, rng=0)
    onnx_path = tmp_path / f"{name}.onnx"
    zoo.export_onnx(model, onnx_path, (1, 3, 32, 32))
    library = tmp_path / f"{name}_arm64.so"
    result = run_cli("compile", onnx_path, "--target", "arm64", "-o", library, timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / f"{name}_arm64.so.report.json").read_text())
    convs = [layer for layer in report["layers"] if layer["op"] == "conv2d"]
    sparse = [layer for layer in convs if layer["decision"] == "sparse"]
    widths = [4 if groups == "4" else info.group_width(layer["spec"]["out_channels"]) for layer in sparse]
    assert sparse and all(layer["vector_width"] == v and abs(layer["density"] - 0.3) < 0.05
                          for layer, v in zip(sparse, widths))
    assert groups == "4" or 8 in widths
    assert all("depthwise" in layer["reason"] for layer in convs if layer["decision"] != "sparse")
    disassembly = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(library)], capture_output=True,
                                 text=True, check=True).stdout
    assert re.search(r"\bfmla\s+v\d+\.4s, v\d+\.4s, v\d+\.s\[\d\]", disassembly)

    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    outputs, _ = run_model(library, {"input": x}, tracker=rpc_devices.tracker, key=rpc_devices.arm64_key,
                           timeout=120)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert_close(outputs[0], expected)


# (cin, cout, hw, kernel, stride, padding, dilation, sparsity, bias, activation, batch): cheap cases of the
# operator's matrix; V=4 (NEON)
DEVICE_CASES = [
    (8, 16, 9, 3, 1, 1, 1, 0.5, True, "relu", 1),
    (8, 18, 10, 3, 2, 1, 1, 0.9, False, None, 1),      # Cout not a multiple of V, stride 2
    (3, 8, 16, 7, 2, 3, 1, 0.0, True, "relu6", 1),     # 7x7 stride-2 stem, dense
    (8, 8, 12, 3, 1, 2, 2, 0.5, False, None, 2),       # dilation 2, batch 2
    (16, 12, 7, 1, 1, 0, 1, 1.0, True, "relu6", 1),    # every block pruned: bias + activation only
    (4, 8, 11, 5, 1, (0, 1, 2, 1), 1, 0.3, True, None, 1),  # asymmetric padding
]
# V=8 (two q registers per group, the default where Cout is a multiple of 8 and >= 16) with the default
# register tiles: 1x8 / 1x7 and their remainders, runs of taps, stride 2, a 1x1 conv
DEVICE_CASES_V8 = [
    (8, 16, 19, 3, 1, 1, 1, 0.5, True, "relu", 1),
    (16, 32, 14, 3, 1, 1, 1, 0.0, True, None, 1),
    (8, 24, 13, 3, 2, 1, 1, 0.8, False, "relu6", 1),
    (24, 16, 10, 1, 1, 0, 1, 0.9, True, "relu", 1),
    (16, 16, 9, 3, 1, 2, 2, 0.3, False, None, 2),
    (24, 48, 14, 1, 1, 0, 1, 0.9, True, "relu6", 1),   # each accumulator loads its own copy of the bias
    (16, 32, 7, 3, 1, 1, 1, 0.5, True, "relu", 2),     # ... 2x7 tiles and a remainder row, batch 2
    (16, 32, 28, 1, 1, 0, 1, 0.8, True, "relu6", 2),   # ... one task per 1x14 tile, batch 2
]


@pytest.fixture(scope="module")
def device_session(rpc_devices):
    from alcs_tvm import rpc

    return rpc.connect(tracker=rpc_devices.tracker, key=rpc_devices.arm64_key, timeout=120)


@pytest.mark.parametrize("case, v", [(c, 4) for c in DEVICE_CASES] + [(c, 8) for c in DEVICE_CASES_V8],
                         ids=lambda c: f"{c[3]}x{c[3]}-s{c[4]}-sp{c[7]}-{c[9]}" if isinstance(c, tuple) else f"v{c}")
def test_sparse_operator_on_arm64_device(device_session, cross_cxx, tmp_path, case, v):
    import tvm
    from tvm.support import cc

    from alcs_tvm import rpc
    from alcs_tvm.kernels import sparse_conv2d_kernel
    from alcs_tvm.layer import Conv2dSpec, KernelLayout
    from alcs_tvm.sparse_format import BlockSparseWeight, random_block_sparse
    from alcs_tvm.target import resolve_target

    cin, cout, hw, k, stride, padding, dilation, sparsity, has_bias, activation, batch = case
    rng = np.random.default_rng(stable_seed(*case))
    weight = random_block_sparse(rng.standard_normal((cout, cin, k, k)).astype(np.float32), v, sparsity, rng)
    bias = rng.standard_normal(cout).astype(np.float32) if has_bias else None
    x = (rng.standard_normal((batch, cin, hw, hw)) * 3).astype(np.float32)
    info = resolve_target("arm64")
    spec = Conv2dSpec.create(x.shape, weight.shape, stride, padding, dilation)
    layout = KernelLayout(bias=bias is not None, activation=activation)
    kernel = sparse_conv2d_kernel(BlockSparseWeight.from_dense(weight, v), spec, layout, bias=bias, target=info)
    assert kernel.schedule.vector_width == v
    library = tmp_path / "kernel.so"
    tvm.compile(kernel.func, target=info.target).export_library(str(library),
                                                                fcompile=cc.cross_compiler(cross_cxx))
    remote = rpc.upload_library(device_session, library)
    dev = device_session.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev)
            for a in [x] + kernel.packed.arrays() + [np.zeros(kernel.output_shape, np.float32)]]
    remote[kernel.func.attrs["global_symbol"]](*args)
    out = args[-1].numpy()

    assert_close(out, torch_conv(x, weight, bias, stride, padding, dilation, activation))


# the fused 1x1 expand + depthwise kernel: (cin, cout, hw, V, keyword arguments of run_fused); NEON groups of 4
# and 8, stride 1 and 2, strips, a partial last group, blocked and NCHW input, a 5x5 depthwise conv, a strided
# 3x3 first conv (MobileNet's stem)
FUSED_DEVICE_CASES = {
    "v4-s1-strips": (8, 12, 11, 4, {"strip": 4, "out_pad": (1, 1, 1, 1)}),
    "v8-s2-partial": (8, 20, 13, 8, {"stride": 2, "block": 4, "in_block": 4}),
    "v8-s1-5x5-prelu": (4, 16, 9, 8, {"kernel": 5, "padding": 2, "act": "prelu", "dw_act": "hardswish"}),
    "v8-blocked-border": (16, 32, 10, 8, {"in_block": 8, "in_border": (1, 1, 1, 1), "strip": 3}),
    "v8-stem-3x3-s2": (3, 16, 17, 8, {"expand": (3, 2, 1), "strip": 4}),  # the input padded inside the kernel
}


@pytest.mark.parametrize("sparsity", [0.0, 0.7])
@pytest.mark.parametrize("name", sorted(FUSED_DEVICE_CASES))
def test_expand_depthwise_on_arm64_device(device_session, cross_cxx, tmp_path, name, sparsity):
    import tvm
    from tvm.support import cc

    from alcs_tvm import rpc
    from alcs_tvm.target import resolve_target
    from test_expand_depthwise import run_fused

    info = resolve_target("arm64")

    def on_device(kernel, data):
        library = tmp_path / "fused.so"
        tvm.compile(kernel.func, target=info.target).export_library(str(library),
                                                                    fcompile=cc.cross_compiler(cross_cxx))
        remote = rpc.upload_library(device_session, library)
        dev = device_session.cpu()
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in [data] + kernel.arrays] + \
            [tvm.runtime.tensor(np.full(kernel.output_shape, np.nan, np.float32), dev)]
        remote[kernel.func.attrs["global_symbol"]](*args)
        return args[-1].numpy()

    cin, cout, hw, v, kwargs = FUSED_DEVICE_CASES[name]
    got, expected = run_fused(stable_seed(name, sparsity), cin, cout, hw, v, sparsity, target="arm64",
                              run=on_device, **kwargs)
    assert_close(got, expected)


@pytest.mark.parametrize("hw", [14, 28])
@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_blocked_relu6_pointwise_on_arm64_device(device_session, cross_cxx, tmp_path, sparsity, hw):
    """A MobileNetV2 expand conv as the compiled model calls it: V=8 groups written as NCHW[4]c blocks with a zero
    border for the depthwise conv, bias + ReLU6, per-accumulator bias copies (the 1x14 tile spans the 14-wide row;
    at 28 each tile is its own task)."""
    import tvm
    from tvm.support import cc

    from alcs_tvm import rpc
    from alcs_tvm.kernels import sparse_conv2d_kernel
    from alcs_tvm.layer import Conv2dSpec, KernelLayout
    from alcs_tvm.sparse_format import BlockSparseWeight, random_block_sparse
    from alcs_tvm.target import resolve_target

    cin, cout, v, block = 24, 48, 8, 4
    rng = np.random.default_rng(stable_seed(cin, cout, hw, sparsity))
    weight = random_block_sparse(rng.standard_normal((cout, cin, 1, 1)).astype(np.float32), v, sparsity, rng)
    bias = rng.standard_normal(cout).astype(np.float32)
    x = (rng.standard_normal((1, cin, hw, hw)) * 3).astype(np.float32)
    info = resolve_target("arm64")
    spec = Conv2dSpec.create(x.shape, weight.shape, 1, 0, 1)
    layout = KernelLayout(bias=True, activation="relu6", output_blocked=True, out_block=block,
                          output_pad=(1, 1, 1, 1))
    kernel = sparse_conv2d_kernel(BlockSparseWeight.from_dense(weight, v), spec, layout, bias=bias, target=info)
    assert kernel.schedule.vector_width == v and kernel.packed.bias.size > cout  # the per-accumulator copies
    library = tmp_path / "kernel.so"
    tvm.compile(kernel.func, target=info.target).export_library(str(library),
                                                                fcompile=cc.cross_compiler(cross_cxx))
    remote = rpc.upload_library(device_session, library)
    dev = device_session.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev)
            for a in [x] + kernel.packed.arrays() + [np.full(kernel.output_shape, np.nan, np.float32)]]
    remote[kernel.func.attrs["global_symbol"]](*args)
    out = args[-1].numpy()  # [1, cout / 4, hw + 2, hw + 2, 4]

    border = out.copy()
    border[:, :, 1:-1, 1:-1, :] = 0
    assert not border.any()
    inner = out[:, :, 1:-1, 1:-1, :].transpose(0, 1, 4, 2, 3).reshape(1, cout, hw, hw)
    assert_close(inner, torch_conv(x, weight, bias, 1, 0, 1, "relu6"))
