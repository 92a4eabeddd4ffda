"""Winograd against the direct kernel, per conv shape: measured kernel times next to the compiler's estimates, and
the numerics of F(2x2), F(4x4) and F(6x6) against float64.

For each 3x3 stride-1 shape (ResNet-18's, and a few of other networks), on this host, one thread:
the direct kernel dense and at 30/50 % SIMD-block sparsity, Winograd F(2x2)/F(4x4)/F(6x6) dense, each as it runs
inside a model (pre-padded channel-blocked input, blocked output), min over interleaved rounds; the estimate
:func:`alcs_tvm.winograd.estimated_ms` gives for each, and what :func:`~alcs_tvm.winograd.choose_algorithm` picks.
Then the largest error of each tile size relative to the largest output, against PyTorch in float64.

    python tools/bench_winograd.py                  # all shapes, timing and numerics
    python tools/bench_winograd.py --numerics-only
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: (in channels, out channels, size): ResNet-18's 3x3 stride-1 convs, then VGG/YOLO-like ones and U-Net-like ones
SHAPES = [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7), (32, 64, 112), (96, 96, 20), (48, 64, 40),
          (16, 16, 256), (32, 32, 128)]
SPARSITIES = (0.3, 0.5)
TILES = (2, 4, 6)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def numerics(shapes) -> list:
    import torch

    from alcs_tvm.winograd import build_winograd_conv2d

    rows = []
    rng = np.random.default_rng(0)
    for cin, cout, size in shapes:
        x = rng.standard_normal((1, cin, size, size)).astype(np.float32)
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        reference = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                               padding=1).numpy()
        scale = np.abs(reference).max()
        row = {"shape": f"3x3 {cin}->{cout} @{size}x{size}"}
        direct = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()
        row["torch_fp32"] = float(np.abs(direct - reference).max() / scale)
        for tile in TILES:
            out = build_winograd_conv2d(w, input_shape=x.shape, tile=tile).run(x)
            row[f"F{tile}"] = float(np.abs(out - reference).max() / scale)
        rows.append(row)
        log(f"numerics {row}")
    return rows


def timing(shapes, rounds: int) -> list:
    from alcs_tvm.kernels import build_sparse_conv2d
    from alcs_tvm.layer import Conv2dSpec
    from alcs_tvm.sparse_format import random_block_sparse
    from alcs_tvm.target import resolve_target
    from alcs_tvm.timing import measure_interleaved, set_threads
    from alcs_tvm.winograd import build_winograd_conv2d, choose_algorithm, estimated_ms

    set_threads(1)
    info = resolve_target("x86")
    rows = []
    rng = np.random.default_rng(1)
    for cin, cout, size in shapes:
        x = rng.standard_normal((1, cin, size, size)).astype(np.float32)
        w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
        spec = Conv2dSpec.create(x.shape, w.shape, 1, 1)
        candidates, estimates = {}, {}
        for density in (1.0,) + tuple(1 - s for s in SPARSITIES):
            masked = w if density == 1 else random_block_sparse(w, info.group_width(cout), 1 - density, rng=0)
            name = f"direct d{density:.1f}"
            candidates[name] = build_sparse_conv2d(masked, input_shape=x.shape, padding=1).kernel_time_callable(x)
            estimates[name] = estimated_ms(spec, density, info.family, None)
        for tile in TILES:
            name = f"F{tile}"
            candidates[name] = build_winograd_conv2d(w, input_shape=x.shape, tile=tile).kernel_time_callable(x)
            estimates[name] = estimated_ms(spec, 1.0, info.family, tile)
        measured = measure_interleaved(candidates, repeat=rounds)
        row = {"shape": spec.describe(), "measured_ms": {k: measured[k].min for k in candidates},
               "estimated_ms": estimates,
               "choice": {f"d{d:.1f}": choose_algorithm(spec, d, info)[0] for d in (1.0, 0.7, 0.5)}}
        rows.append(row)
        log(f"timing {row}")
    return rows


def markdown(timings, errors) -> str:
    lines = []
    if timings:
        names = list(timings[0]["measured_ms"])
        lines += ["| shape | " + " | ".join(names) + " | chosen at d=1.0 / 0.7 / 0.5 |",
                  "|---" * (len(names) + 2) + "|"]
        for row in timings:
            cells = [f"{row['measured_ms'][n]:.3f} ({row['estimated_ms'][n]:.3f})" for n in names]
            choice = " / ".join("direct" if t is None else f"F{t}" for t in row["choice"].values())
            lines.append(f"| {row['shape']} | " + " | ".join(cells) + f" | {choice} |")
        lines.append("")
        lines.append("ms measured, min over interleaved rounds, 1 thread (the compiler's estimate in brackets).")
        lines.append("")
    if errors:
        keys = ["torch_fp32"] + [f"F{t}" for t in TILES]
        lines += ["| shape | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for row in errors:
            lines.append(f"| {row['shape']} | " + " | ".join(f"{row[k]:.1e}" for k in keys) + " |")
        lines.append("")
        lines.append("max |error| / max |output| against PyTorch in float64 (torch_fp32: PyTorch's own float32 conv).")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numerics-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    errors = numerics(SHAPES)
    timings = [] if args.numerics_only else timing(SHAPES, args.rounds)
    if args.json:
        from alcs_tvm.files import write_json_atomic
        write_json_atomic(args.json, {"timing": timings, "numerics": errors})
    print(markdown(timings, errors))


if __name__ == "__main__":
    main()
