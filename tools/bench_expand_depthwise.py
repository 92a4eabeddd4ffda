#!/usr/bin/env python
"""The fused 1x1 expand + depthwise kernel against the two kernels it replaces, on MobileNetV2's pairs.

For each pair (expand Cin -> C at HxW, depthwise 3x3 stride s, ReLU6 after both) and block sparsity of the
expand's weight (random SIMD masks in its group width: 32 where C allows, else 16): ``separate`` is the sparse
kernel writing the wide tensor NCHW16c with the depthwise conv's border, then the blocked depthwise kernel on it
(as a compiled model runs them); ``fused`` is :func:`alcs_tvm.expand_depthwise.expand_depthwise_kernel`. Both
read the same input (NCHW16c where Cin allows, else NCHW) and write the same NCHW16c output; the tool checks
they agree. Timed with ``alcs_tvm.timing.measure_interleaved`` (min over interleaved rounds, warm caches: the
fused kernel's other gain inside a model, the wide tensor's round trip through the outer caches, is not in it).

    python tools/bench_expand_depthwise.py                       # every pair, 0/50/90 %, 1 thread
    python tools/bench_expand_depthwise.py --sparsities 0,80 --threads 2 --repeat 30
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

#: MobileNetV2's expand -> depthwise pairs: (Cin, C, H = W, depthwise stride)
PAIRS = [(16, 96, 112, 2), (24, 144, 56, 1), (24, 144, 56, 2), (32, 192, 28, 1), (32, 192, 28, 2),
         (64, 384, 14, 1), (64, 384, 14, 2), (96, 576, 14, 1), (96, 576, 14, 2), (160, 960, 7, 1)]


def pair_callables(cin, channels, hw, stride, sparsity, info, rng):
    import tvm

    from alcs_tvm.expand_depthwise import DepthwiseConv, expand_depthwise_kernel
    from alcs_tvm.kernels import sparse_conv2d_kernel
    from alcs_tvm.layer import Conv2dSpec, KernelLayout
    from alcs_tvm.schedules.depthwise_cpu import DepthwiseGeometry, depthwise_nchwc_template
    from alcs_tvm.sparse_format import BlockSparseWeight, random_block_sparse

    dev = tvm.cpu()
    v = info.group_width(channels)
    weight = random_block_sparse(rng.standard_normal((channels, cin, 1, 1)).astype(np.float32), v, sparsity, rng)
    packed_weight = BlockSparseWeight.from_dense(weight, v, sparsity == 0)
    spec = Conv2dSpec.create((1, cin, hw, hw), weight.shape)
    bias = rng.standard_normal(channels).astype(np.float32)
    dw = DepthwiseConv(channels, hw, hw, rng.standard_normal((channels, 1, 3, 3)).astype(np.float32), (1, 1, 1, 1),
                       (stride, stride), bias=rng.standard_normal(channels).astype(np.float32), activation="relu6")
    block = 16 if cin % 16 == 0 else 1
    layout = KernelLayout(bias=True, activation="relu6", input_prepadded=block > 1, input_block=block)
    x = rng.standard_normal((1, cin // 16, hw, hw, 16) if block > 1 else (1, cin, hw, hw)).astype(np.float32)

    def tensors(arrays):
        return [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]

    fused = expand_depthwise_kernel(packed_weight, spec, layout, dw, bias=bias, out_block=16, target=info)
    fused_args = tensors([x] + fused.arrays + [np.zeros(fused.output_shape, np.float32)])
    fused_fn = tvm.compile(fused.func, target=info.target)[fused.func.attrs["global_symbol"]]
    expand = sparse_conv2d_kernel(packed_weight, spec, replace(layout, output_blocked=True, output_pad=(1, 1, 1, 1),
                                                               out_block=16), bias=bias, target=info)
    expand_args = tensors([x] + expand.packed.arrays() + [np.zeros(expand.output_shape, np.float32)])
    expand_fn = tvm.compile(expand.func, target=info.target)[expand.func.attrs["global_symbol"]]
    out = dw.out_height
    geom = DepthwiseGeometry(1, channels // 16, 16, hw + 2, hw + 2, (3, 3), (stride, stride), (1, 1), out, out)
    depthwise = depthwise_nchwc_template(geom, activation="relu6")
    dw_weight = dw.weight.reshape(channels // 16, 16, 3, 3).transpose(0, 2, 3, 1)
    dw_args = [expand_args[-1]] + tensors([dw_weight, dw.bias, np.zeros((1, channels // 16, out, out, 16),
                                                                       np.float32)])
    dw_fn = tvm.compile(depthwise, target=info.target)[depthwise.attrs["global_symbol"]]

    def separate():
        expand_fn(*expand_args)
        dw_fn(*dw_args)

    def fused_call():
        fused_fn(*fused_args)

    separate()
    fused_call()
    error = float(np.abs(fused_args[-1].numpy() - dw_args[-1].numpy()).max())
    return {"separate": separate, "fused": fused_call}, error, v


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", default="0,50,90", help="percent, comma separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    from alcs_tvm.target import resolve_target
    from alcs_tvm.timing import measure_interleaved, set_threads

    set_threads(args.threads)
    info = resolve_target("x86")
    print("| pair | V | s | separate ms | fused ms | separate / fused | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for cin, channels, hw, stride in PAIRS:
        for sparsity in [int(s) for s in args.sparsities.split(",")]:
            rng = np.random.default_rng(0)
            fns, error, v = pair_callables(cin, channels, hw, stride, sparsity / 100, info, rng)
            stats = measure_interleaved(fns, repeat=args.repeat)
            sep, fus = stats["separate"].min, stats["fused"].min
            print(f"| {cin}->{channels} @{hw} dw s{stride} | {v} | {sparsity}% | {sep:.4f} | {fus:.4f} | "
                  f"{sep / fus:.2f} | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
