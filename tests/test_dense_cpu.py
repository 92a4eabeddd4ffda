"""Correctness of the hand-written dense CPU schedules (alcs_tvm.schedules.dense_cpu), no mocks: every rule is
compared with torch/numpy on random inputs, whole small MobileNetV2/ResNet-style networks with ONNX Runtime, and
the same builds are compiled for aarch64 NEON (no linking)."""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import tvm
from helpers import assert_close, run_onnxruntime, run_vm
from tvm import relax

from alcs_tvm.schedules.dense_cpu import (DenseCPUSchedule, apply_dense_cpu_schedules, build_dense,
                                          dense_build_passes)
from alcs_tvm.target import resolve_target

warnings.filterwarnings("ignore")

HOST = resolve_target("x86")
ARM = resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
RNG = np.random.RandomState(0)  # reseeded before every test (below): a test draws the same data run alone or not


@pytest.fixture(autouse=True)
def _reseed_rng():
    RNG.seed(0)


def _tensor(shape):
    return relax.TensorType(shape, "float32")


def _graph(inputs: dict, body):
    """A relax module ``main(*inputs)`` whose dataflow is ``body(bb, vars)``."""
    bb = relax.BlockBuilder()
    params = [relax.Var(name, _tensor(shape)) for name, shape in inputs.items()]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, arrays, target=HOST):
    _assert_all_scheduled(_scheduled(mod, target))
    return run_vm(build_dense(mod, target), *arrays)


def _scheduled(mod, target=HOST):
    with target.target:
        return tvm.transform.Sequential(dense_build_passes(target))(mod)


def _assert_all_scheduled(mod):
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            assert "tirx.is_scheduled" in func.attrs, f"{gv.name_hint} was left unscheduled"


def _rand(*shape):
    return RNG.uniform(-1, 1, shape).astype("float32")


# ----------------------------------------------------------------------------------------------- single rules
@pytest.mark.parametrize("channels,size,stride", [(32, 28, 1), (24, 28, 2), (40, 14, 1), (16, 7, 1), (48, 15, 2)])
def test_depthwise_conv_bias_clip(channels, size, stride):
    def body(bb, x, w, b):
        y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=1, groups=channels))
        y = bb.emit(relax.op.add(y, b))
        return bb.emit(relax.op.clip(y, 0.0, 6.0))

    mod = _graph({"x": (1, channels, size, size), "w": (channels, 1, 3, 3), "b": (1, channels, 1, 1)}, body)
    x, w, b = _rand(1, channels, size, size), _rand(channels, 1, 3, 3), _rand(1, channels, 1, 1)
    text = _scheduled(mod).script()
    assert "T.vectorized" in text and "if_then_else" not in text.split("group_conv2d")[-1]
    out = (size - 1) // stride + 1
    assert ("T.parallel" in text) == (channels * out * out * 9 >= 1 << 14)  # too little work: stay serial
    got = _run(mod, [x, w, b])
    ref = torch.clamp(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride,
                                                 padding=1, groups=channels) + torch.from_numpy(b), 0, 6).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", [(0, 0, 1, 1), (1, 2, 0, 1)])
def test_a_conv_whose_fused_epilogue_pads_its_output_writes_the_border(pad):
    """conv -> add -> pad fused into one function (a depthwise conv feeding a blocked kernel): the padded output is
    larger than the conv's, so its border is written outside the conv's loops (found by tools/fuzz_compile.py:
    the border was left unwritten, garbage)."""
    top, left, bottom, right = pad

    def body(bb, x, w, b):
        y = bb.emit(relax.op.nn.conv2d(x, w, padding=1, groups=24))
        y = bb.emit(relax.op.add(y, b))
        return bb.emit(relax.op.nn.pad(y, [0, 0, 0, 0, top, bottom, left, right]))

    mod = _graph({"x": (1, 24, 7, 4), "w": (24, 1, 3, 3), "b": (1, 24, 1, 1)}, body)
    x, w, b = _rand(1, 24, 7, 4), _rand(24, 1, 3, 3), _rand(1, 24, 1, 1)
    got = _run(mod, [x, w, b])
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1, groups=24) + \
        torch.from_numpy(b)
    ref = torch.nn.functional.pad(ref, (left, right, top, bottom)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,kernel,stride,pad", [("max", 3, 2, 1), ("max", 2, 2, 0), ("avg", 2, 2, 0),
                                                    ("avg", 3, 1, 1)])
def test_pooling(kind, kernel, stride, pad):
    shape = (1, 16, 28, 28)

    def body(bb, x):
        op = relax.op.nn.max_pool2d if kind == "max" else relax.op.nn.avg_pool2d
        kw = {} if kind == "max" else {"count_include_pad": True}
        return bb.emit(op(x, pool_size=kernel, strides=stride, padding=pad, **kw))

    x = _rand(*shape)
    got = _run(_graph({"x": shape}, body), [x])
    tx = torch.from_numpy(x)
    ref = (torch.nn.functional.max_pool2d(tx, kernel, stride, pad) if kind == "max"
           else torch.nn.functional.avg_pool2d(tx, kernel, stride, pad, count_include_pad=True)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_global_avg_pool():
    shape = (1, 96, 7, 7)
    x = _rand(*shape)
    got = _run(_graph({"x": shape}, lambda bb, x: bb.emit(relax.op.mean(x, axis=[2, 3], keepdims=True))), [x])
    np.testing.assert_allclose(got, x.mean(axis=(2, 3), keepdims=True), rtol=1e-5, atol=1e-6)


def test_elementwise_chains():
    shape = (1, 24, 20, 20)

    def body(bb, x, y, b):
        z = bb.emit(relax.op.add(x, b))                    # bias broadcast
        z = bb.emit(relax.op.nn.relu(z))
        z = bb.emit(relax.op.add(z, y))                    # residual
        z = bb.emit(relax.op.clip(z, 0.0, 6.0))
        z = bb.emit(relax.op.permute_dims(z, [0, 2, 3, 1]))  # layout transform
        return bb.emit(relax.op.reshape(z, (1, 20 * 20 * 24)))

    x, y, b = _rand(*shape), _rand(*shape), _rand(1, 24, 1, 1)
    mod = _graph({"x": shape, "y": shape, "b": (1, 24, 1, 1)}, body)
    _assert_all_scheduled(_scheduled(mod))
    got = _run(mod, [x, y, b])
    ref = np.clip(np.maximum(x + b, 0) + y, 0, 6).transpose(0, 2, 3, 1).reshape(1, -1)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_pad_and_odd_sizes():
    shape = (1, 5, 9, 13)

    def body(bb, x):
        z = bb.emit(relax.op.nn.pad(x, pad_width=[0, 0, 0, 0, 1, 2, 3, 0], pad_value=0.0))
        return bb.emit(relax.op.sigmoid(z))

    x = _rand(*shape)
    got = _run(_graph({"x": shape}, body), [x])
    ref = 1 / (1 + np.exp(-np.pad(x, [(0, 0), (0, 0), (1, 2), (3, 0)])))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m,k,n", [(1, 1280, 1000), (1, 512, 10), (4, 64, 48)])
def test_linear(m, k, n):
    def body(bb, x, w, b):
        return bb.emit(relax.op.add(relax.op.matmul(x, w), b))

    x, w, b = _rand(m, k), _rand(k, n), _rand(n)
    got = _run(_graph({"x": (m, k), "w": (k, n), "b": (n,)}, body), [x, w, b])
    np.testing.assert_allclose(got, x @ w + b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cin,cout,k,stride", [(8, 16, 3, 1), (16, 8, 1, 1), (8, 16, 3, 2)])
def test_dense_conv_fallback(cin, cout, k, stride):
    """groups==1 conv2d (normally the sparse operator's) still gets a correct parallel+vectorized schedule."""
    def body(bb, x, w, r):
        y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=k // 2))
        return bb.emit(relax.op.nn.relu(relax.op.add(y, r)))

    size = 14
    out = (size + 2 * (k // 2) - k) // stride + 1
    x, w, r = _rand(1, cin, size, size), _rand(cout, cin, k, k), _rand(1, cout, out, out)
    got = _run(_graph({"x": (1, cin, size, size), "w": (cout, cin, k, k), "r": (1, cout, out, out)}, body),
               [x, w, r])
    ref = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride,
                                                padding=k // 2) + torch.from_numpy(r)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_pass_skips_scheduled_functions():
    def body(bb, x):
        return bb.emit(relax.op.nn.relu(x))

    with HOST.target:
        mod = tvm.transform.Sequential(dense_build_passes(HOST)[:-1])(_graph({"x": (1, 64)}, body))
    gv = [g for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)][0]
    mod[gv] = mod[gv].with_attr("tirx.is_scheduled", True)
    before = mod[gv]
    after = DenseCPUSchedule(HOST)(mod)
    assert after[gv].same_as(before)
    assert apply_dense_cpu_schedules(mod, "x86")[gv].same_as(before)


# ----------------------------------------------------------------------------------------------- whole networks
def _cbr(i, o, k=3, s=1, g=1):
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU6())


class _InvRes(nn.Module):
    def __init__(self, i, o, s, t):
        super().__init__()
        h = i * t
        self.res = s == 1 and i == o
        layers = ([] if t == 1 else [_cbr(i, h, 1)]) + [_cbr(h, h, 3, s, h), nn.Conv2d(h, o, 1, bias=False),
                                                          nn.BatchNorm2d(o)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.res else self.conv(x)


class TinyMobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 16, 3, 2), _InvRes(16, 8, 1, 1), _InvRes(8, 16, 2, 6),
                                      _InvRes(16, 16, 1, 6), _InvRes(16, 24, 2, 6), _cbr(24, 64, 1))
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class _Basic(nn.Module):
    def __init__(self, i, o, s):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                                  nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o))
        self.down = (nn.Sequential(nn.Conv2d(i, o, 1, s, bias=False), nn.BatchNorm2d(o))
                     if s != 1 or i != o else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.down(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(_Basic(16, 16, 1), _Basic(16, 32, 2))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def _onnx_relax(model, shape):
    from tvm.relax.frontend.onnx import from_onnx

    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    buf = io.BytesIO()
    torch.onnx.export(model, torch.randn(*shape), buf, dynamo=False, opset_version=13, input_names=["input"])
    return buf.getvalue(), from_onnx(onnx.load_from_string(buf.getvalue()), keep_params_in_input=False)


@pytest.fixture(scope="module", params=["mobilenet_v2", "resnet"])
def network(request):
    model = TinyMobileNetV2() if request.param == "mobilenet_v2" else TinyResNet()
    shape = (1, 3, 64, 64)
    return (*_onnx_relax(model, shape), shape)


def test_network_matches_onnxruntime(network):
    model_bytes, mod, shape = network
    x = RNG.randn(*shape).astype("float32")
    ref = run_onnxruntime(model_bytes, x)
    scheduled = _scheduled(mod)
    _assert_all_scheduled(scheduled)
    got = run_vm(tvm.compile(scheduled, target=HOST.target), x)
    assert_close(got, ref, rtol=1e-4)  # atol: 1e-4 * max |ref|


def test_network_compiles_for_aarch64(network):
    """The same networks built for aarch64 NEON: every kernel scheduled, and the compiled code is aarch64 code
    using 4-lane float vectors (no linking: the cross compiler is not needed)."""
    _, mod, _ = network
    scheduled = _scheduled(mod, ARM)
    _assert_all_scheduled(scheduled)
    ex = tvm.compile(scheduled, target=ARM.target)
    (kernels,) = [m for m in ex.mod.imports if m.kind == "llvm"]
    assert 'target triple = "aarch64-linux-gnu"' in kernels.inspect_source("ll")
    asm = kernels.inspect_source("asm")
    assert re.search(r"\bv\d+\.4s\b", asm), "no NEON .4s vector instruction in the aarch64 kernels"
