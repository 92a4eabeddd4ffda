#!/usr/bin/env python
"""How good is the default schedule? For real layer shapes at several block densities, time every candidate
schedule ``alcs tune`` would try (register tile, task order) on this host and print the default against the best.

This is how the defaults in ``alcs_tvm/schedules/__init__.py`` were checked (and the x86 1x1 default changed);
rerun it on a new machine or target before trusting them there. The layer runs as inside a compiled model:
pre-padded NCHW16c input (NCHW where the channels are not a multiple of 16), NCHW16c output, bias + relu.

    python tools/bench_schedules.py                                  # MobileNetV2 1x1 + ResNet-18 3x3 layers
    python tools/bench_schedules.py --layers mv2_exp14 --densities 1,0.2 --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS = {  # name: (cin, cout, output size, kernel)
    "r18_s1": (64, 64, 56, 3), "r18_s3": (256, 256, 14, 3),
    "mv2_exp56": (24, 144, 56, 1), "mv2_exp28": (32, 192, 28, 1), "mv2_exp14": (96, 576, 14, 1),
    "mv2_proj14": (576, 96, 14, 1), "mv2_last7": (320, 1280, 7, 1),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default=",".join(LAYERS), help=f"comma list of {', '.join(LAYERS)}")
    ap.add_argument("--densities", default="1,0.5,0.2,0.1", help="block densities (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="TVM threads (default 1)")
    ap.add_argument("--vector-width", type=int, default=None)
    ap.add_argument("--candidates", type=int, default=12)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts

    from alcs_tvm.autotune import tune_layer
    from alcs_tvm.layer import Conv2dSpec, KernelLayout
    from alcs_tvm.compiler import ModelLayer
    from alcs_tvm.profiler import Measurer
    from alcs_tvm.target import resolve_target

    info = resolve_target("x86", args.vector_width)
    measurer = Measurer(info, local=True)
    print(f"{info.family}, V={info.describe_widths()}, {args.threads} thread(s); median of 10 samples of >= 5 ms "
          "per schedule")
    print(f"{'layer':11s} {'density':>7s}  {'default':16s} {'us':>8s}  {'best':16s} {'us':>8s}  default/best")
    for name in args.layers.split(","):
        if name not in LAYERS:
            ap.error(f"unknown layer {name!r}; choose from {', '.join(LAYERS)}")
        cin, cout, size, k = LAYERS[name]
        spec = Conv2dSpec.create((1, cin, size, size), (cout, cin, k, k), 1, k // 2)
        v, block = info.group_width(cout), info.vector_width  # group width; the blocked layout's block
        for density in (float(d) for d in args.densities.split(",")):
            layout = KernelLayout(bias=True, activation="relu", input_prepadded=True,
                                  input_block=block if cin % block == 0 else 1, output_blocked=True,
                                  out_block=0 if v == block else block)
            layer = ModelLayer(name, spec, v, density, layout)
            record = tune_layer(layer, info, measurer, repeat=10, min_repeat_ms=5, max_candidates=args.candidates)
            default, best = record["candidates"][0], min(record["candidates"], key=lambda c: c["ms"])
            print(f"{name:11s} {density:7.2f}  {default['schedule']:16s} {default['ms'] * 1e3:8.1f}  "
                  f"{best['schedule']:16s} {best['ms'] * 1e3:8.1f}  {default['ms'] / best['ms']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
