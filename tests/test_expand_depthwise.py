"""The fused 1x1 expand + depthwise kernel against torch on the same weights and input (x86), alone and inside
compiled models against ONNX Runtime; the rule that decides which pairs fuse."""
import functools

import numpy as np
import pytest
import torch
import helpers
from helpers import skip_unless_host_runs, stable_seed

from alcs_tvm.expand_depthwise import DepthwiseConv, expand_depthwise_kernel, fusion_blocker, strip_rows
from alcs_tvm.layer import Conv2dSpec, KernelLayout
from alcs_tvm.sparse_format import BlockSparseWeight, random_block_sparse

assert_close = functools.partial(helpers.assert_close, rtol=1e-5, scale_floor=1.0)

_ACT = {None: lambda t: t, "relu": torch.relu, "relu6": lambda t: torch.clamp(t, 0, 6),
        "sigmoid": torch.sigmoid, "hardswish": torch.nn.functional.hardswish}


def _reference(x, weight, bias, act, slope, dw: DepthwiseConv, spec: Conv2dSpec):
    top, left, bottom, right = spec.padding
    t = torch.nn.functional.pad(torch.from_numpy(x), (left, right, top, bottom))
    t = torch.nn.functional.conv2d(t, torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias),
                                   stride=spec.stride)
    if act == "prelu":
        t = torch.nn.functional.prelu(t, torch.from_numpy(slope))
    else:
        t = _ACT[act](t)
    top, left, bottom, right = dw.padding
    t = torch.nn.functional.pad(t, (left, right, top, bottom))
    t = torch.nn.functional.conv2d(t, torch.from_numpy(dw.weight),
                                   None if dw.bias is None else torch.from_numpy(dw.bias), stride=dw.stride,
                                   groups=dw.channels)
    return _ACT[dw.activation](t).numpy()


def _unblocked(y, pad):
    n, cb, hp, wp, b = y.shape
    top, left, bottom, right = pad
    inner = y[:, :, top:hp - bottom, left:wp - right, :]
    border = y.copy()
    border[:, :, top:hp - bottom, left:wp - right, :] = 0
    assert not border.any(), "the output border is not zero"
    return inner.transpose(0, 1, 4, 2, 3).reshape(n, cb * b, hp - top - bottom, wp - left - right)


def run_fused(seed, cin, cout, hw, v, sparsity, *, stride=1, kernel=3, padding=1, block=None, in_block=1,
              in_border=(0, 0, 0, 0), out_pad=(0, 0, 0, 0), act="relu6", dw_act="relu6", bias=True, strip=None,
              batch=1, target="x86", run=None, expand=(1, 1, 0)):
    """Build and run one fused kernel; returns ``(got, expected)`` in NCHW. ``run(kernel, data)``: the kernel's
    raw output where it runs somewhere else (default: compiled for ``target``, run here). ``expand``: the first
    conv's (kernel, stride, padding), MobileNet's stem being (3, 2, 1); ``hw`` is its input's size."""
    import tvm
    rng = np.random.default_rng(seed)
    h, w = (hw, hw) if isinstance(hw, int) else hw
    ek, es, ep = expand
    weight = random_block_sparse(rng.standard_normal((cout, cin, ek, ek)).astype(np.float32), v, sparsity, rng)
    b = rng.standard_normal(cout).astype(np.float32) if bias else None
    slope = rng.uniform(0, 0.5, cout).astype(np.float32) if act == "prelu" else None
    x = rng.standard_normal((batch, cin, h, w)).astype(np.float32)
    pad = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
    spec = Conv2dSpec.create(x.shape, weight.shape, es, ep)
    dw = DepthwiseConv(cout, spec.out_height, spec.out_width, rng.standard_normal((cout, 1, kernel, kernel)).astype(np.float32), pad,
                       (stride, stride), bias=rng.standard_normal(cout).astype(np.float32), activation=dw_act)
    prepadded = in_block > 1 or any(in_border)
    layout = KernelLayout(bias=bias, activation=act, input_prepadded=prepadded, input_block=in_block,
                          input_border=tuple(p + e for p, e in zip(spec.padding, in_border))
                          if any(in_border) else None)
    kernel_ = expand_depthwise_kernel(BlockSparseWeight.from_dense(weight, v), spec, layout, dw, bias=b,
                                      slope=slope, out_block=block, output_pad=out_pad, strip=strip, target=target)
    in_pad = tuple(p + e for p, e in zip(spec.padding, in_border))
    data = helpers.blocked(x, in_block, in_pad) if layout.input_prepadded else x
    expected = _reference(x, weight, b, act, slope, dw, spec)
    if run is None:
        from alcs_tvm.target import resolve_target
        lib = tvm.compile(kernel_.func, target=resolve_target(target).target)
        run = functools.partial(run_here, lib)
    return _unblocked(run(kernel_, data), out_pad), expected


def run_here(lib, kernel, data):
    """The kernel's output on this host; it starts as NaN, so every element it fails to write shows."""
    import tvm
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in [data] + kernel.arrays] + \
        [tvm.runtime.tensor(np.full(kernel.output_shape, np.nan, np.float32))]
    lib[kernel.func.attrs["global_symbol"]](*args)
    return args[-1].numpy()


CASES = {  # name: (cin, cout, hw, V, keyword arguments)
    "v16-s1": (24, 144, 14, 16, {}),
    "v32-s1-blocked-in": (16, 96, 12, 32, {"in_block": 16, "out_pad": (1, 1, 1, 1)}),
    "v32-s2-partial-group": (24, 144, 15, 32, {"stride": 2, "block": 16, "in_block": 8}),
    "v32-s2-even": (16, 64, 16, 32, {"stride": 2, "in_border": (1, 1, 1, 1), "in_block": 16}),
    "strips-uneven": (8, 32, (19, 11), 16, {"strip": 5, "out_pad": (0, 1, 2, 3)}),
    "strips-s2": (8, 32, 21, 16, {"strip": 3, "stride": 2}),
    "nchw-border-in": (8, 48, 9, 16, {"in_border": (1, 2, 0, 1), "block": 8, "act": "prelu", "dw_act": None}),
    "5x5-p2": (8, 32, 11, 16, {"kernel": 5, "padding": 2, "act": "hardswish", "dw_act": "relu"}),
    "no-bias-sigmoid": (8, 32, 7, 32, {"bias": False, "act": "sigmoid", "block": 8}),
    "narrow-wide": (16, 32, (3, 40), 16, {"padding": (0, 1, 2, 1)}),
    "batch2": (8, 32, 10, 16, {"batch": 2, "strip": 4}),
    # a strided 3x3 first conv (MobileNet's stem): an NCHW input padded inside the kernel, or a blocked one
    "stem-3x3-s2": (3, 32, 23, 16, {"expand": (3, 2, 1)}),
    "stem-3x3-s2-strips": (3, 32, 32, 16, {"expand": (3, 2, 1), "strip": 5, "stride": 2, "out_pad": (1, 1, 1, 1)}),
    "3x3-s2-blocked-in": (16, 64, 15, 32, {"expand": (3, 2, 1), "in_block": 16, "in_border": (1, 0, 1, 1)}),
    "5x5-s2-p2": (8, 32, 14, 16, {"expand": (5, 2, 2), "kernel": 5, "padding": 2}),
}


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("name", sorted(CASES))
@skip_unless_host_runs("x86-avx512")
def test_fused_against_torch(name, sparsity):
    cin, cout, hw, v, kwargs = CASES[name]
    got, expected = run_fused(stable_seed(name, sparsity), cin, cout, hw, v, sparsity, **kwargs)
    assert_close(got, expected)


def test_fusion_rule():
    spec = Conv2dSpec.create((1, 24, 56, 56), (144, 24, 1, 1))
    dw = DepthwiseConv(144, 56, 56, np.zeros((144, 1, 3, 3), np.float32), (1, 1, 1, 1), (2, 2))
    assert fusion_blocker(spec, KernelLayout(activation="relu6"), dw) is None
    assert "shortcut" in fusion_blocker(spec, KernelLayout(residual="blocked"), dw)
    spec3 = Conv2dSpec.create((1, 24, 58, 58), (144, 24, 3, 3))
    assert "share input loads" in fusion_blocker(spec3, KernelLayout(), dw)
    stem = Conv2dSpec.create((1, 3, 112, 112), (144, 3, 3, 3), 2, 1)
    assert fusion_blocker(stem, KernelLayout(), dw) is None
    tall = DepthwiseConv(144, 56, 56, np.zeros((144, 1, 1, 1), np.float32), (0, 0, 0, 0), (2, 2))
    assert "strides" in fusion_blocker(spec, KernelLayout(), tall)
    assert strip_rows(56, 3) == 28 and strip_rows(7, 30) == 7 and strip_rows(112, 1) == 28 and strip_rows(9, 1) == 9


@pytest.mark.parametrize("sparsity", [0.0, 0.8])
@skip_unless_host_runs("x86-avx512")
def test_mobilenet_v2_runs_every_expand_and_depthwise_pair_fused_and_matches_onnx_runtime(tmp_path, sparsity):
    """Full-size MobileNetV2 (224x224, random weights, every groups=1 conv SIMD-pruned in its group width as
    tools/bench_peers.py prunes it): its 16 expand -> depthwise pairs (stride 1 and 2, V = 16 and 32, 144 channels
    in V = 16 groups, 7x7 to 112x112) and the stem's 3x3 stride-2 conv with the first depthwise conv run fused; the
    output equals ONNX Runtime's."""
    from alcs_tvm import compiler, zoo
    from alcs_tvm.target import resolve_target

    model = zoo.get_model("mobilenet_v2").eval()
    if sparsity:
        zoo.simd_prune_(model, resolve_target("x86"), sparsity, rng=0)
    path = zoo.export_onnx(model, tmp_path / "mobilenet_v2.onnx", (1, 3, 224, 224))
    executable, report = compiler.compile(str(path), "x86")
    depthwise = [row for row in report.layers if "depthwise" in row.reason]
    fused = [row for row in depthwise if row.implementation.startswith("alcs expand + depthwise")]
    assert len(depthwise) == 17 and len(fused) == 17, report.table()
    assert fused[0].symbol.startswith("alcs_expand_dwconv_k3x3s1_v16"), fused[0]  # the stem's pair
    assert {row.symbol.split("_v")[1][:2] for row in fused} == {"16", "32"}
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert_close(helpers.run_vm(executable, x), helpers.run_onnxruntime(path, x))
