#!/usr/bin/env python
"""Estimated cycles of our sparse conv kernels on phone cores, from their machine code (``llvm-mca``), without
the phone (library: ``alcs_tvm/estimate.py``; what the estimate leaves out: docs/arm64.md).

    python tools/estimate_arm64.py --models resnet18,mobilenet_v2 --sparsities 0,50,80,90 \\
        --core neoverse-n1 --json out.json                         # or --core cortex-a55, or both: a,b
    python tools/estimate_arm64.py --conv 64,64,56,3 --sparsities 0,90 --core neoverse-n1 [--schedule 1x8]
    python tools/estimate_arm64.py --onnx pruned.onnx --core cortex-a55          # a model as it is pruned
    python tools/estimate_arm64.py --x86-check [--core skylake-avx512]  # the model vs this host, measured here
    python tools/estimate_arm64.py --x86-check --bench-json tools/out/bench_kernels.json   # ... vs its times
    python tools/estimate_arm64.py --sweep --models resnet18,mobilenet_v2 --core neoverse-n1,cortex-a55
                                                    # register tiles per distinct conv, ranked by the estimate

Per conv: estimated single-core cycles, useful FLOPs, % of the core's fp32 FMA peak (as its LLVM model has it),
the hot loop's instruction mix, the estimated speedup of the sparse kernel over our dense kernel at the same
shape, and whether the layer is memory-bound (compulsory bytes / the core's stated bandwidth take longer than
the pipeline estimate). Models are pruned with ``zoo.simd_prune_`` in the target's group widths.

``--x86-check``: the same estimate for this x86 host's kernels (``-mcpu`` = the host's LLVM CPU name, cycles
turned into time at the clock measured here by a dependent-add loop) against their measured times: the kernels
of ``tools/bench_kernels.py`` (its layers, weights and seed; 1 thread, "ours kern" column), timed here or read
from its JSON. The error per layer says how far to trust the ARM numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from alcs_tvm import estimate as est  # noqa: E402
from alcs_tvm.compiler import ModelLayer  # noqa: E402
from alcs_tvm.layer import Conv2dSpec, KernelLayout  # noqa: E402
from alcs_tvm.schedules import SparseConvSchedule  # noqa: E402
from alcs_tvm.sparse_format import random_block_sparse  # noqa: E402
from alcs_tvm.target import resolve_target  # noqa: E402

#: the issue's bars, judged on these layers
BAR_PEAK_3X3 = 70.0  # ResNet-18 3x3 at 0 %, neoverse-n1
BAR_PEAK_1X1 = 60.0  # MobileNetV2 1x1 at 0 %, or memory-bound
BAR_SPEEDUP = 0.85  # x 1/(1-s) at 50-90 %


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse_schedule(text: str, vector_width: int) -> SparseConvSchedule:
    tile, _, order = text.partition(":")
    rows, cols = (int(v) for v in tile.split("x"))
    return SparseConvSchedule(vector_width, rows, cols, order == "row-outer")


# ----------------------------------------------------------------------------------------------- rows
def model_rows(name: str, sparsity: float, cores, target: str, input_size: int, seed: int, workdir: str) -> list:
    import torch

    from alcs_tvm import zoo

    torch.manual_seed(seed)
    model = zoo.get_model(name).eval()
    info = resolve_target(target)
    zoo.simd_prune_(model, info, sparsity, rng=seed)
    path = os.path.join(workdir, f"{name}_{round(sparsity * 100)}.onnx")
    zoo.export_onnx(model, path, (1, 3, input_size, input_size))
    return [{"model": name, "sparsity": round(sparsity * 100), **e.row()}
            for e in est.estimate_model(path, cores, info)]


def conv_rows(conv: str, stride: int, sparsities, cores, target: str, vector_width, schedule, seed: int) -> list:
    cin, cout, hw, k = (int(v) for v in conv.split(","))
    info = resolve_target(target, vector_width)
    v = info.group_width(cout)
    spec = Conv2dSpec.create((1, cin, hw, hw), (cout, cin, k, k), stride, k // 2)
    # as in a chained model: input with its border written by the previous conv, NCHW[V]c output, bias + relu
    layout = KernelLayout(bias=True, activation="relu", input_prepadded=True, output_blocked=True,
                          out_block=info.vector_width)
    rng = np.random.default_rng(seed)
    dense = (rng.standard_normal(spec.weight_shape) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
    rows = []
    for s in sparsities:
        w = random_block_sparse(dense, v, s, np.random.default_rng(seed + round(s * 100)))
        layer = ModelLayer(conv, spec, v, 1.0 - s, layout)
        sched = parse_schedule(schedule, v) if schedule else None
        for e in est.estimate_layer(layer, w, info, cores, schedule=sched):
            rows.append({"model": "-", "sparsity": round(s * 100), **e.row()})
    return rows


def onnx_rows(path: str, cores, target: str) -> list:
    info = resolve_target(target)
    return [{"model": os.path.basename(path), "sparsity": round(100 * (1 - e.layer.density)), **e.row()}
            for e in est.estimate_model(path, cores, info)]


# ----------------------------------------------------------------------------------------------- sweep
#: register tiles tried per conv: up to 16 accumulator registers of the 32 NEON q registers where runs of taps
#: keep several weight vectors live, up to 28 where each tap is its own run (the rest hold weights and inputs)
SWEEP_TILES = [(1, 4), (2, 4), (4, 4), (1, 7), (2, 7), (1, 8), (2, 8), (1, 14), (1, 16), (1, 5), (2, 5), (1, 6),
               (2, 6), (3, 4), (4, 7)]
SWEEP_REGISTERS = {1: 28, 2: 16, 3: 16}  # by the conv's longest run


def sweep(names, cores, target: str, input_size: int, seed: int, sparsities, kernels=None) -> list:
    """For every distinct conv (shape, V, layout) of the models: each register tile within 16 accumulator
    registers, estimated at each sparsity on each core; ranked by the geometric mean of % of peak."""
    import torch

    from alcs_tvm import zoo
    from alcs_tvm.compiler import model_layers
    from alcs_tvm.schedules import default_sparse_conv_schedule, registers_per_group
    from alcs_tvm.kernels import max_run_length, sparse_conv2d_kernel
    from alcs_tvm.sparse_format import BlockSparseWeight

    info = resolve_target(target)
    seen, rows = set(), []
    with tempfile.TemporaryDirectory(prefix="alcs-sweep-") as tmp:
        for name in names:
            torch.manual_seed(seed)
            path = zoo.export_onnx(zoo.get_model(name).eval(), os.path.join(tmp, f"{name}.onnx"),
                                   (1, 3, input_size, input_size))
            for layer in model_layers(path, info):
                if kernels and f"{layer.spec.kernel[0]}x{layer.spec.kernel[1]}" not in kernels:
                    continue
                key = (layer.key, layer.layout)
                if key in seen:
                    continue
                seen.add(key)
                spec, v = layer.spec, layer.vector_width
                regs = registers_per_group(info.family, v)
                rng = np.random.default_rng(seed)
                dense = rng.standard_normal(spec.weight_shape).astype(np.float32)
                default = default_sparse_conv_schedule(info.family, v, spec.out_height, spec.out_width,
                                                       max_run_length(spec), pointwise=spec.kernel == (1, 1))
                tiles = {(min(r, spec.out_height), min(c, spec.out_width)) for r, c in SWEEP_TILES
                         if r * c * regs <= SWEEP_REGISTERS[max_run_length(spec)]}
                tiles.add((default.tile_rows, default.tile_cols))
                masks = [BlockSparseWeight.from_dense(
                    random_block_sparse(dense, v, s, np.random.default_rng(seed + round(100 * s))), v)
                    for s in sparsities]
                bias = np.zeros(spec.out_channels, np.float32) if layer.layout.bias else None
                scores = []
                for r, c in sorted(tiles):
                    sched = SparseConvSchedule(v, r, c)
                    pct = []
                    for w in masks:
                        kernel = sparse_conv2d_kernel(w, spec, layer.layout, bias=bias, target=info, schedule=sched)
                        pct += [max(est.estimate_kernel(kernel, info, core).pct_peak, 1e-3) for core in cores]
                    scores.append((float(np.exp(np.mean(np.log(pct)))), sched.describe(), pct))
                scores.sort(reverse=True)
                mine = next(sc for sc in scores if sc[1] == default.describe())
                rows.append({"layer": spec.describe(), "vector_width": v, "default": default.describe(),
                             "default_score": round(mine[0], 1), "best": scores[0][1],
                             "best_score": round(scores[0][0], 1),
                             "ranking": [(d, round(sc, 1)) for sc, d, _ in scores]})
                log(f"[sweep] {spec.describe():24s} V={v}: default {default.describe()} {mine[0]:.1f}, best "
                    f"{scores[0][1]} {scores[0][0]:.1f}; " + ", ".join(f"{d} {sc:.1f}" for sc, d, _ in scores[:5]))
    return rows


# ----------------------------------------------------------------------------------------------- x86 check
def measure_host() -> tuple:
    """``(GHz, zmm FMAs per cycle)`` of this core while busy, by cc-compiled loops: a chain of dependent
    ``imul`` (3 cycles each on Intel and AMD; dependent immediate adds are folded at rename on Golden Cove and
    later, so they cannot time a cycle) and 10 independent ``vfmadd231ps zmm``. The best of 300 short trials:
    a shared machine preempts some of them."""
    code = r"""
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(void) {
    double ghz = 0, fma = 0;
    for (int r = 0; r < 300; r++) {
        long n = 200000, x = 3; double a = now();
        __asm__ volatile("1: imul %0, %0\n imul %0, %0\n imul %0, %0\n imul %0, %0\n dec %1\n jnz 1b"
                         : "+r"(x), "+r"(n));
        double g = 12.0 * 200000 / (now() - a) / 1e9; if (g > ghz) ghz = g;
        n = 100000; a = now();
        __asm__ volatile("2: vfmadd231ps %%zmm14, %%zmm15, %%zmm0\n vfmadd231ps %%zmm14, %%zmm15, %%zmm1\n"
                         " vfmadd231ps %%zmm14, %%zmm15, %%zmm2\n vfmadd231ps %%zmm14, %%zmm15, %%zmm3\n"
                         " vfmadd231ps %%zmm14, %%zmm15, %%zmm4\n vfmadd231ps %%zmm14, %%zmm15, %%zmm5\n"
                         " vfmadd231ps %%zmm14, %%zmm15, %%zmm6\n vfmadd231ps %%zmm14, %%zmm15, %%zmm7\n"
                         " vfmadd231ps %%zmm14, %%zmm15, %%zmm8\n vfmadd231ps %%zmm14, %%zmm15, %%zmm9\n"
                         " dec %0\n jnz 2b" : "+r"(n) :: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",
                         "xmm7", "xmm8", "xmm9");
        g = 10.0 * 100000 / (now() - a) / 1e9; if (g > fma) fma = g;
    }
    printf("%f %f\n", ghz, fma / ghz);
    return 0;
}
"""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "clock.c"), os.path.join(tmp, "clock")
        with open(src, "w") as fh:
            fh.write(code)
        subprocess.run(["cc", "-O1", "-mavx512f", src, "-o", exe], check=True)
        ghz, fma = (float(v) for v in subprocess.run([exe], capture_output=True, text=True,
                                                     check=True).stdout.split())
        return ghz, fma


def x86_check(layers, sparsities, mcpu: str | None, bench_json: str | None, repeat: int, seed: int,
              bandwidth_gbs: float = 20.0) -> list:
    """Estimate the kernels tools/bench_kernels.py times (its layers, weights and seed; 1 thread, the "ours kern"
    column: padded input, NCHW[V]c output) and compare with their measured time: from ``bench_json`` when
    given, else measured here - the min over ``repeat`` single calls, interleaved (single calls fit between the
    preemptions of a shared machine; the min is the undisturbed, warm-cache call the estimate describes)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from bench_kernels import LAYERS, layer_shapes

    from alcs_tvm.kernels import build_sparse_conv2d, sparse_conv2d_kernel
    from alcs_tvm.timing import measure_interleaved, set_threads

    set_threads(1)
    measured = {}
    if bench_json:
        with open(bench_json) as fh:
            doc = json.load(fh)
        for res in (doc["results"] if isinstance(doc, dict) else doc):
            if res.get("threads") == 1:
                for row in res["rows"]:
                    if (row.get("kernel") or {}).get("min") is not None:
                        measured[(res["layer"], row["s"])] = row["kernel"]["min"]
        layers = sorted({name for name, _ in measured}, key=list(LAYERS).index)
        sparsities = sorted({sp for _, sp in measured if sp < 100})
    ghz, fma_per_cycle = measure_host()
    core = est.host_core(ghz, bandwidth_gbs, mcpu=mcpu)
    log(f"[x86] {core.about}; peak {est.peak_flops_per_cycle(core):.1f} FLOP/cycle by the {core.mcpu} model, "
        f"{2 * core.fma_lanes * fma_per_cycle:.1f} measured ({fma_per_cycle:.2f} FMA/cycle)")
    info = resolve_target("x86")
    rows = []
    for name in layers:
        xs, ws, stride, pad = layer_shapes(name)
        rng = np.random.default_rng(seed)  # drawn in bench_kernels' order: input, then the dense weight
        x = rng.standard_normal(xs).astype(np.float32)
        dense_w = (rng.standard_normal(ws) * np.sqrt(2.0 / np.prod(ws[1:]))).astype(np.float32)
        v = info.group_width(ws[0])
        estimates, fns = {}, {}
        for sp in sparsities:
            if bench_json and (name, sp) not in measured:
                continue
            w = random_block_sparse(dense_w, v, sp / 100.0, np.random.default_rng(seed + sp))
            op = build_sparse_conv2d(w, input_shape=xs, stride=stride, padding=pad, target=info)
            # the kernel kernel_time_callable times: same weight, padded input, NCHW[V]c output
            layout = KernelLayout(input_prepadded=True, output_blocked=True)
            kernel = sparse_conv2d_kernel(op.sparse_weight, op.spec, layout, target=info)
            estimates[sp] = (est.estimate_kernel(kernel, info, core), kernel.schedule)
            if not bench_json:
                fns[sp] = op.kernel_time_callable(x)
        if fns:
            stats = measure_interleaved(fns, repeat, min_sample_s=0.0)
            for sp in fns:
                measured[(name, sp)] = stats[sp].min
        for sp, (e, sched) in estimates.items():
            ms = measured[(name, sp)]
            est_ms = e.microseconds / 1e3
            rows.append({"layer": name, "shape": LAYERS[name][0], "sparsity": sp, "vector_width": v,
                         "schedule": sched.describe(), "core": core.mcpu, "ghz": round(ghz, 3),
                         "est_ms": round(est_ms, 5), "measured_ms": round(ms, 5),
                         "error_pct": round(100 * (est_ms - ms) / ms, 1), "pct_peak_est": round(e.pct_peak, 1),
                         "mem_ms": round(e.mem_cycles / (core.ghz * 1e6), 5), "memory_bound": e.memory_bound,
                         "bound_error_pct": round(100 * (max(est_ms, e.mem_cycles / (core.ghz * 1e6)) - ms) / ms, 1),
                         "mix": e.mix_text()})
            log(f"[x86] {name} s={sp}%: est {est_ms:.4f} ms, measured {ms:.4f} ms ({rows[-1]['error_pct']:+.1f}%)")
    return rows


# ----------------------------------------------------------------------------------------------- output
def print_table(rows):
    head = ["model", "layer", "s%", "V", "tile", "core", "Mcycles", "us", "MFLOP", "%peak", "sp/dense",
            "attain", "ideal", "mem", "hot loop"]
    lines = [head]
    for r in rows:
        lines.append([r["model"], r["layer"], str(r["sparsity"]), str(r["vector_width"]), r["schedule"], r["core"],
                      f"{r['est_cycles'] / 1e6:.3f}", f"{r['est_us']:.1f}", f"{r['flops'] / 1e6:.1f}",
                      f"{r['pct_peak']:.1f}", f"{r['est_speedup_vs_dense']:.2f}", f"{r['attainable_speedup']:.2f}",
                      f"{r['ideal_speedup']:.2f}" if r["ideal_speedup"] else "-",
                      "BOUND" if r["memory_bound"] else "", r["mix"]])
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    for l in lines:
        print("  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip())


def markdown(rows) -> str:
    """Per model: one line per distinct conv (repeats counted), per core the % of peak at 0 % and the speedup
    over dense at each other sparsity (as a % of 1/(1-s) in brackets); memory-bound cells marked with *."""
    out = []
    cores = sorted({r["core"] for r in rows}, reverse=True)
    sparsities = sorted({r["sparsity"] for r in rows})
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        layers = {}
        for r in mine:
            layers.setdefault((r["layer"], r["vector_width"], r["schedule"]), {})
            layers[(r["layer"], r["vector_width"], r["schedule"])].setdefault(r["name"], {})[
                (r["core"], r["sparsity"])] = r
        head = ["layer", "n", "V", "tile"]
        for core in cores:
            head += [f"{core} %peak {s}%" if s == 0 else f"{core} x dense {s}%" for s in sparsities]
        out += [f"**{model}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (layer, v, tile), by_name in layers.items():
            first = next(iter(by_name.values()))
            cells = [layer, str(len(by_name)), str(v), tile]
            for core in cores:
                for s in sparsities:
                    r = first.get((core, s))
                    if r is None:
                        cells.append("-")
                        continue
                    mark = "*" if r["memory_bound"] else ""
                    if s == 0:
                        cells.append(f"{r['pct_peak']:.0f}{mark}")
                    else:
                        speedup = r["est_speedup_vs_dense"]
                        cells.append(f"{speedup:.2f} ({100 * speedup / r['ideal_speedup']:.0f}){mark}")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def judged(r) -> bool:
    """The layers the issue's bars are judged on: ResNet-18's 3x3 convs and MobileNetV2's 1x1 convs."""
    return (r["model"] == "resnet18" and r["kernel"] == "3x3") or (r["model"] == "mobilenet_v2" and r["kernel"] == "1x1")


def speedup_bar(r) -> float:
    """The speedup the bar asks of a row: 0.85 x 1/(1-s)."""
    return BAR_SPEEDUP * r["ideal_speedup"]


def bar_summary(rows) -> list:
    """The issue's bars on ResNet-18's 3x3 and MobileNetV2's 1x1 layers, per core."""
    out = []
    for core in sorted({r["core"] for r in rows}):
        mine = [r for r in rows if r["core"] == core]
        r3 = [r for r in mine if r["model"] == "resnet18" and r["kernel"] == "3x3"]
        m1 = [r for r in mine if r["model"] == "mobilenet_v2" and r["kernel"] == "1x1"]
        dense3 = [r for r in r3 if r["sparsity"] == 0]
        dense1 = [r for r in m1 if r["sparsity"] == 0]
        if dense3:
            ok = sum(r["pct_peak"] >= BAR_PEAK_3X3 for r in dense3)
            out.append(f"{core}: ResNet-18 3x3 at 0%: {ok}/{len(dense3)} >= {BAR_PEAK_3X3:.0f}% of peak "
                       f"(min {min(r['pct_peak'] for r in dense3):.1f}%)")
        if dense1:
            ok = sum(r["pct_peak"] >= BAR_PEAK_1X1 or r["memory_bound"] for r in dense1)
            out.append(f"{core}: MobileNetV2 1x1 at 0%: {ok}/{len(dense1)} >= {BAR_PEAK_1X1:.0f}% or memory-bound "
                       f"(min {min(r['pct_peak'] for r in dense1):.1f}%)")
        for s in sorted({r["sparsity"] for r in r3 + m1} - {0}):
            cells = [r for r in r3 + m1 if r["sparsity"] == s]
            miss = [r for r in cells if r["est_speedup_vs_dense"] < speedup_bar(r)]
            # where the bar exceeds what any kernel writing its output can reach, no schedule meets it
            beyond = [r for r in miss if r["attainable_speedup"] < speedup_bar(r)]
            out.append(f"{core}: speedup >= {BAR_SPEEDUP} x ideal at {s}%: {len(cells) - len(miss)}/{len(cells)}"
                       + (f", {len(beyond)} of the {len(miss)} misses above the attainable speedup" if miss else "")
                       + (f" (misses: {', '.join(sorted({r['model'][:3] + ' ' + r['layer'] for r in miss}))})"
                          if miss else ""))
    return out


def miss_table(rows) -> str:
    """The speedup bar's misses on the judged layers, one line per distinct conv, sparsity and core: our estimate,
    the attainable speedup (any kernel that writes the output) and the bar."""
    lines = ["| core | layer | n | s | estimated x dense | attainable | bar 0.85/(1-s) | beyond any kernel |",
             "|---|---|---|---|---|---|---|---|"]
    seen = {}
    for r in rows:
        if not judged(r) or r["sparsity"] == 0 or r["est_speedup_vs_dense"] >= speedup_bar(r):
            continue
        seen.setdefault((r["core"], r["model"], r["layer"], r["sparsity"]), []).append(r)
    for (core, model, layer, s), same in sorted(seen.items(), key=lambda kv: (kv[0][0], kv[0][3], kv[0][1])):
        r = same[0]
        bar = speedup_bar(r)
        lines.append(f"| {core} | {model[:3]} {layer} | {len(same)} | {s}% | {r['est_speedup_vs_dense']:.2f} | "
                     f"{r['attainable_speedup']:.2f} | {bar:.2f} | "
                     f"{'yes' if r['attainable_speedup'] < bar else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--models", help="comma list of zoo models (resnet18, mobilenet_v2, ...)")
    what.add_argument("--conv", help="one conv: CIN,COUT,HW,K (square, padding K//2)")
    what.add_argument("--onnx", help="an ONNX model as it is (its own weights and sparsity)")
    what.add_argument("--x86-check", action="store_true",
                      help="estimate this host's kernels and compare with their measured times")
    ap.add_argument("--bench-json", help="--x86-check: take the measured times from this tools/bench_kernels.py "
                                         "JSON (1 thread) instead of measuring")
    ap.add_argument("--layers", default="r18_s1,r18_s2,r18_s3,r18_s4,mv2_exp56,mv2_exp14,mv2_proj14,mv2_last7",
                    help="--x86-check: tools/bench_kernels.py layers")
    ap.add_argument("--repeat", type=int, default=60, help="--x86-check: timed single calls per kernel")
    ap.add_argument("--bandwidth", type=float, default=20.0,
                    help="--x86-check: the host's single-core bandwidth in GB/s for the memory bound (default 20)")
    ap.add_argument("--sweep", action="store_true",
                    help="with --models: rank register tiles per distinct conv by the geometric mean of the "
                         "estimated %% of peak over --core and --sparsities")
    ap.add_argument("--sparsities", default="0,50,80,90", help="comma list of percentages (default 0,50,80,90)")
    ap.add_argument("--core", default="neoverse-n1",
                    help=f"comma list of {', '.join(est.CORES)} (default neoverse-n1); with --x86-check an "
                         "LLVM x86 CPU name (default: this host's)")
    ap.add_argument("--target", default="arm64", help="compile target (default arm64)")
    ap.add_argument("--vector-width", type=int, help="--conv: group width V (default: the target's)")
    ap.add_argument("--stride", type=int, default=1, help="--conv: stride")
    ap.add_argument("--schedule", help="--conv: register tile ROWSxCOLS[:row-outer] (default: the target's)")
    ap.add_argument("--kernels", help="--sweep: only convs of these sizes, e.g. 1x1,3x3")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--markdown", help="also write per-model markdown tables here (docs/arm64.md)")
    args = ap.parse_args(argv)
    started = time.time()
    if args.x86_check:
        mcpu = None if args.core in ("neoverse-n1", "native") else args.core
        rows = x86_check(args.layers.split(","), [int(s) for s in args.sparsities.split(",")], mcpu,
                         args.bench_json, args.repeat, args.seed, args.bandwidth)
        errors = [abs(r["error_pct"]) for r in rows]
        for r in rows:
            print(f"{r['layer']:11s} {r['shape']:40s} s={r['sparsity']:3d}%  est {r['est_ms']:.4f} ms  "
                  f"measured {r['measured_ms']:.4f} ms  error {r['error_pct']:+6.1f}%  {r['mix']}")
        if errors:
            bound = [abs(r["bound_error_pct"]) for r in rows]
            print(f"|error|: median {np.median(errors):.1f}%, max {max(errors):.1f}% over {len(errors)} kernels; "
                  f"of max(estimate, memory bound): median {np.median(bound):.1f}%, max {max(bound):.1f}%")
    else:
        unknown = [c for c in args.core.split(",") if c not in est.CORES]
        if unknown:
            ap.error(f"unknown core {unknown}: use {', '.join(est.CORES)}")
        cores = [est.CORES[c] for c in args.core.split(",")]
        for core in cores:
            log(f"[estimate] {core.mcpu}: {core.about}; peak {est.peak_flops_per_cycle(core):.1f} FLOP/cycle "
                "by its LLVM model")
        sparsities = [float(s) / 100 for s in args.sparsities.split(",")]
        rows = []
        if args.sweep:
            if not args.models:
                ap.error("--sweep needs --models")
            rows = sweep(args.models.split(","), cores, args.target, args.input_size, args.seed, sparsities,
                         args.kernels.split(",") if args.kernels else None)
            better = [r for r in rows if r["best_score"] > 1.05 * r["default_score"]]
            print(f"{len(rows)} distinct convs; the default is within 5 % of the best tile's score on "
                  f"{len(rows) - len(better)}")
            for r in better:
                print(f"  {r['layer']} V={r['vector_width']}: default {r['default']} {r['default_score']}, "
                      f"best {r['best']} {r['best_score']}")
        elif args.conv:
            rows = conv_rows(args.conv, args.stride, sparsities, cores, args.target, args.vector_width,
                             args.schedule, args.seed)
        elif args.onnx:
            rows = onnx_rows(args.onnx, cores, args.target)
        else:
            with tempfile.TemporaryDirectory(prefix="alcs-estimate-") as tmp:
                for name in args.models.split(","):
                    for s in sparsities:
                        log(f"[estimate] {name} at {s:.0%} ({time.time() - started:.0f} s)")
                        rows += model_rows(name, s, cores, args.target, args.input_size, args.seed, tmp)
        if not args.sweep:
            print_table(rows)
            for line in bar_summary(rows):
                print(line)
            if args.markdown:
                with open(args.markdown, "w") as fh:
                    fh.write(markdown(rows) + "\n" + "\n".join(f"- {line}" for line in bar_summary(rows)) + "\n\n"
                             + miss_table(rows) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
        log(f"[estimate] wrote {args.json}")
    log(f"[estimate] {time.time() - started:.0f} s; estimates are single-core, warm-cache pipeline cycles "
        "(no cache or TLB misses, no mispredictions, no threading): docs/arm64.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
