#!/usr/bin/env python
"""Kernel benchmark: the ALCS sparse conv operator vs dense baselines (TVM MetaSchedule-tuned conv, ONNX
Runtime, PyTorch) on real layer shapes at batch 1, with 1 and 2 threads, side by side with the ideal speedup
1/(1-s).

    python tools/bench_kernels.py                      # small default set (a few minutes; TVM-MS column only
                                                       # if tuning records are already cached)
    python tools/bench_kernels.py --full               # whole matrix: 8 layers x 7 sparsities x 1,2 threads,
                                                       # TVM-MS tuned with 64 trials per layer (cached on disk)
    python tools/bench_kernels.py --tune-only --full   # only fill the tuning cache
    python tools/bench_kernels.py --layers r18_s2,mv2_exp14 --sparsities 0,50,90 --threads 1 --markdown

Bar (x86): at s = 50-90% ours reaches >= 90% of 1/(1-s) over the fastest dense baseline; at s = 0 ours is no
slower than 1/0.95 of the fastest dense baseline. "ours" for the bar is the kernel column: the operator as it
runs inside a compiled model (input already padded by the previous layer, output NCHW16c), which is also the
layout of the calibration prototype the bar comes from; the NCHW column (standalone op: pad + lane transpose)
is shown next to it.

Methodology (``alcs_tvm/timing.py``): every column is a zero-argument callable on pre-bound inputs, timed with
``time.perf_counter`` around ``number`` back-to-back calls (``number`` chosen so one sample is >= ~2 ms);
warm-up, then ``repeat`` rounds in which all columns of a layer are measured in alternation, so drift hits
all of them alike. Reported: min over rounds (median in the JSON too). Dense baselines do not depend on s:
they are measured once per (layer, threads), interleaved with all sparsities of ours. Each thread count runs in
its own subprocess (TVM's thread pool, ORT's and torch's are all set to that count).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

# ----------------------------------------------------------------------------------------------- layers
#: name -> (description, Cin, Cout, H(=W), kernel, stride, padding)
LAYERS = {
    "r18_s1": ("ResNet-18 stage1 3x3 64->64 @56x56", 64, 64, 56, 3, 1, 1),
    "r18_s2": ("ResNet-18 stage2 3x3 128->128 @28x28", 128, 128, 28, 3, 1, 1),
    "r18_s3": ("ResNet-18 stage3 3x3 256->256 @14x14", 256, 256, 14, 3, 1, 1),
    "r18_s4": ("ResNet-18 stage4 3x3 512->512 @7x7", 512, 512, 7, 3, 1, 1),
    "mv2_exp56": ("MobileNetV2 expand 1x1 24->144 @56x56", 24, 144, 56, 1, 1, 0),
    "mv2_exp14": ("MobileNetV2 expand 1x1 96->576 @14x14", 96, 576, 14, 1, 1, 0),
    "mv2_proj14": ("MobileNetV2 project 1x1 576->96 @14x14", 576, 96, 14, 1, 1, 0),
    "mv2_last7": ("MobileNetV2 last 1x1 320->1280 @7x7", 320, 1280, 7, 1, 1, 0),
    # output channels that leave the last block partial (sparse_format.PARTIAL_WIDE_LANES)
    "sq_conv10": ("SqueezeNet classifier 1x1 512->1000 @13x13", 512, 1000, 13, 1, 1, 0),
    "mv3_exp56": ("MobileNetV3 expand 1x1 16->72 @56x56", 16, 72, 56, 1, 1, 0),
    "c1x1_120": ("1x1 40->120 @28x28", 40, 120, 28, 1, 1, 0),
}
FULL_SPARSITIES = [0, 30, 50, 70, 80, 90, 95]
QUICK_LAYERS = ["r18_s3", "mv2_exp14"]
QUICK_SPARSITIES = [0, 50, 90]
FULL_TRIALS = 64


def layer_shapes(name: str):
    _, cin, cout, hw, k, stride, pad = LAYERS[name]
    return (1, cin, hw, hw), (cout, cin, k, k), stride, pad


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- tuning
def tune_layers(names, trials: int, target: str = "x86", verbose: bool = False):
    """Fill the tuning cache for ``names`` (sequentially); returns {name: tuning meta}."""
    from metaschedule import Conv2dWorkload, dense_conv2d_func, tune_tir

    out = {}
    for i, name in enumerate(names):
        xs, ws, stride, pad = layer_shapes(name)
        wl = Conv2dWorkload.create(xs, ws, stride, pad)
        log(f"[tune] layer {i + 1}/{len(names)}: {name} ({LAYERS[name][0]}), {trials} trials")
        res = tune_tir(dense_conv2d_func(wl), target, trials, label=name, report=log, verbose=verbose)
        out[name] = res.meta
    return out

# ----------------------------------------------------------------------------------------------- baselines
def onnx_conv_model(weight: np.ndarray, input_shape, stride: int, pad: int) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out_h = (input_shape[2] + 2 * pad - weight.shape[2]) // stride + 1
    out_w = (input_shape[3] + 2 * pad - weight.shape[3]) // stride + 1
    node = helper.make_node("Conv", ["X", "W"], ["Y"], kernel_shape=list(weight.shape[2:]),
                            strides=[stride, stride], pads=[pad] * 4)
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [input_shape[0], weight.shape[0], out_h, out_w])],
        [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def ort_callable(weight, x, stride, pad, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(onnx_conv_model(weight, x.shape, stride, pad), so,
                                providers=["CPUExecutionProvider"])
    out_shape = sess.run(None, {"X": x})[0].shape
    binding = sess.io_binding()
    binding.bind_ortvalue_input("X", ort.OrtValue.ortvalue_from_numpy(x))
    y = ort.OrtValue.ortvalue_from_numpy(np.empty(out_shape, np.float32))
    binding.bind_ortvalue_output("Y", y)

    def run():
        sess.run_with_iobinding(binding)

    run()
    return run, lambda: y.numpy()


def torch_callable(weight, x, stride, pad):
    import torch

    xt, wt = torch.from_numpy(x.copy()), torch.from_numpy(weight.copy())
    conv = torch.nn.functional.conv2d

    def run():
        return conv(xt, wt, None, stride, pad)

    return run


# ----------------------------------------------------------------------------------------------- worker
def _close(a, b) -> float:
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def run_worker(names, sparsities, threads: int, trials: int, repeat: int, seed: int, vector_width=None) -> list:
    """Measure every layer at one thread count (this process's runtimes are set to ``threads``)."""
    import torch

    from alcs_tvm.sparse_format import random_block_sparse
    from alcs_tvm.target import resolve_target
    from alcs_tvm.timing import OTHER_RUNTIMES, measure_interleaved, set_threads
    from metaschedule import tuned_dense_conv2d

    got = set_threads(threads)
    log(f"[bench] {threads} thread(s): runtimes report {got}")
    info = resolve_target("x86", vector_width)
    from alcs_tvm.kernels import build_sparse_conv2d as build_sparse
    results = []
    with torch.inference_mode():
        for li, name in enumerate(names):
            xs, ws, stride, pad = layer_shapes(name)
            rng = np.random.default_rng(seed)
            x = rng.standard_normal(xs).astype(np.float32)
            dense_w = (rng.standard_normal(ws) * np.sqrt(2.0 / np.prod(ws[1:]))).astype(np.float32)
            V = info.group_width(ws[0])  # the pruning group the compiler gives this layer
            ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(dense_w), None, stride,
                                             pad).numpy()
            log(f"[bench] {threads}T layer {li + 1}/{len(names)} {name}: building baselines")
            fns, notes, errors = {}, {}, {}
            # TVM MetaSchedule dense conv
            tvm_mod = tuned_dense_conv2d(xs, ws, stride=stride, padding=pad, target=info, trials=trials,
                                         report=log)
            if tvm_mod.tune is None:
                notes["tvm_ms"] = "not tuned (no cached records; run with --tune-trials N)"
            else:
                errors["tvm_ms"] = _close(tvm_mod.run(x, dense_w), ref)
                fns["tvm_ms"] = tvm_mod.time_callable(x, dense_w)
                notes["tvm_ms"] = f"{tvm_mod.tune.trials} trials"
            ort_run, ort_out = ort_callable(dense_w, x, stride, pad, threads)
            errors["ort"] = _close(ort_out(), ref)
            fns["ort"] = ort_run
            fns["torch"] = torch_callable(dense_w, x, stride, pad)
            # ours, per sparsity
            sparse_meta = {}
            for sp in sparsities:
                w = random_block_sparse(dense_w, V, sp / 100.0, np.random.default_rng(seed + sp))
                log(f"[bench] {threads}T {name}: building ours at s={sp}%")
                try:
                    op = build_sparse(w, input_shape=xs, stride=stride, padding=pad, target=info)
                    sref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), None,
                                                      stride, pad).numpy()
                    err = _close(op.run(x), sref)
                    fns[f"ours_nchw@{sp}"] = op.time_callable(x)
                    fns[f"ours_kernel@{sp}"] = op.kernel_time_callable(x)
                    sparse_meta[sp] = {"max_rel_err": err, "vector_width": op.sparse_weight.vector_width}
                except Exception as exc:  # noqa: BLE001 - report, keep going
                    traceback.print_exc()
                    sparse_meta[sp] = {"error": f"{type(exc).__name__}: {exc}"}
            for k, e in errors.items():
                if e > ERR_TOL:
                    log(f"[bench] WARNING {name}: {k} differs from torch by {e:.2e} (relative)")
            log(f"[bench] {threads}T {name}: timing {len(fns)} callables x {repeat} interleaved rounds")
            # other runtimes' pools spin on after their runs and would steal the 2nd core from ours: time them apart
            stats = measure_interleaved(fns, repeat, progress=lambda m: log(f"[bench] {threads}T {name}: {m}"),
                                        apart=OTHER_RUNTIMES)
            results.append(_layer_result(name, threads, stats, notes, errors, sparse_meta, sparsities,
                                         tvm_mod.tune.meta if tvm_mod.tune else None))
            results[-1]["vector_width"] = V
            print_layer(results[-1])
    return results


BAR_RANGE = (50, 90)
ERR_TOL = 1e-3  # max |ours - torch| / max |torch| for a result to count


def _layer_result(name, threads, stats, notes, errors, sparse_meta, sparsities, tune_meta):
    dense = {k: stats[k].to_dict() for k in ("tvm_ms", "ort", "torch") if k in stats}
    best_name = min(dense, key=lambda k: dense[k]["min"]) if dense else None
    best = dense[best_name]["min"] if best_name else None
    rows = []
    for sp in sparsities:
        row = {"s": sp, "ideal": 1.0 / (1.0 - sp / 100.0) if sp < 100 else float("inf")}
        row.update(sparse_meta.get(sp, {}))
        for kind in ("nchw", "kernel"):
            key = f"ours_{kind}@{sp}"
            if key in stats:
                row[f"ours_{kind}"] = stats[key].to_dict()
                row[f"ratio_{kind}"] = best / stats[key].min
                row[f"pct_ideal_{kind}"] = 100.0 * row[f"ratio_{kind}"] / row["ideal"]
        row["bar"] = _bar(sp, row.get("ratio_kernel"), row["ideal"])
        if row.get("max_rel_err", 0.0) > ERR_TOL:  # a fast wrong kernel does not pass
            row["bar"] = "WRONG"
        rows.append(row)
    return {"layer": name, "desc": LAYERS[name][0], "threads": threads, "dense": dense, "notes": notes,
            "max_rel_err": errors, "best_dense": best_name, "best_dense_ms": best, "sparse": rows,
            "tuning": tune_meta}


def _bar(sp, ratio, ideal):
    """'pass' / 'FAIL' against the issue's bar, '-' where it sets none, None if ours was not measured."""
    if ratio is None:
        return None
    if sp == 0:
        return "pass" if ratio >= 0.95 else "FAIL"
    if BAR_RANGE[0] <= sp <= BAR_RANGE[1]:
        return "pass" if ratio >= 0.9 * ideal else "FAIL"
    return "-"


# ----------------------------------------------------------------------------------------------- output
def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


COLS = ["layer", "thr", "s%", "ours kern ms", "ours NCHW ms", "TVM-MS ms", "ORT ms", "torch ms", "best/kern",
        "ideal", "% ideal kern", "% ideal NCHW", "bar"]


def table_rows(res) -> list:
    d = res["dense"]
    rows = []
    for r in res["sparse"]:
        rows.append([res["layer"], str(res["threads"]), str(r["s"]),
                     _fmt(r.get("ours_kernel", {}).get("min")), _fmt(r.get("ours_nchw", {}).get("min")),
                     _fmt(d.get("tvm_ms", {}).get("min")), _fmt(d.get("ort", {}).get("min")),
                     _fmt(d.get("torch", {}).get("min")), _fmt(r.get("ratio_kernel"), ".2f"),
                     _fmt(r["ideal"], ".2f"), _fmt(r.get("pct_ideal_kernel"), ".0f"),
                     _fmt(r.get("pct_ideal_nchw"), ".0f"),
                     r["bar"] or ("error" if "error" in r else "n/a")])
    return rows


def _text_table(rows) -> list:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLS)]
    return ["  ".join(c.rjust(w) for c, w in zip(COLS, widths))] + \
        ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]


def print_layer(res) -> None:
    print(f"\n{res['desc']} - {res['threads']} thread(s); best dense: {res['best_dense']} "
          f"({_fmt(res['best_dense_ms'])} ms); TVM-MS: {res['notes'].get('tvm_ms')}", flush=True)
    print("\n".join(_text_table(table_rows(res))), flush=True)


def _by_threads(results) -> dict:
    out = {}
    for res in results:
        out.setdefault(res["threads"], []).append(res)
    return out


def print_tables(results) -> None:
    """One table per thread count, all layers."""
    for n, group in _by_threads(results).items():
        rows = [r for res in group for r in table_rows(res)]
        print(f"\n--- {n} thread(s) (ms = min over rounds; dense columns do not depend on s) ---")
        print("\n".join(_text_table(rows)), flush=True)
        untuned = [res["layer"] for res in group if "tvm_ms" not in res["dense"]]
        if untuned:
            print(f"TVM-MS left out for {', '.join(untuned)}: no tuning records cached "
                  f"(run with --tune-trials N, e.g. 64, or --full)")


def markdown(results, command: str) -> str:
    out = [f"Command: `{command}`", ""]
    for n, group in _by_threads(results).items():
        out += [f"#### {n} thread{'s' if n > 1 else ''}", "",
                "| " + " | ".join(COLS) + " |",
                "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLS))) + "|"]
        for res in group:
            for r in table_rows(res):
                out.append("| " + " | ".join(r) + " |")
        out.append("")
    return "\n".join(out)


def summary(results) -> str:
    bars = [r["bar"] for res in results for r in res["sparse"] if r["bar"] in ("pass", "FAIL")]
    if not bars:
        return "bar: not evaluated (sparse columns missing)"
    return f"bar: {bars.count('pass')}/{len(bars)} (layer, s, threads) cells pass"


def _machine() -> dict:
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), "")
    except OSError:
        pass
    vers = {}
    for mod in ("tvm", "onnxruntime", "torch", "numpy"):
        try:
            vers[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    try:
        rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "git": rev, "python": platform.python_version(), "versions": vers,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="all 8 layers, all 7 sparsities, 64 tuning trials")
    ap.add_argument("--layers", help=f"comma list of {','.join(LAYERS)}")
    ap.add_argument("--sparsities", help="comma list of percentages")
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts (default 1,2)")
    ap.add_argument("--tune-trials", type=int, default=None,
                    help=f"MetaSchedule trials per layer ({FULL_TRIALS} with --full; default 0 = no tuning: "
                         "use cached records if any, else leave the TVM-MS column out)")
    ap.add_argument("--tune-only", action="store_true", help="only fill the tuning cache, measure nothing")
    ap.add_argument("--verbose-tuning", action="store_true", help="keep MetaSchedule's own log output")
    ap.add_argument("--repeat", type=int, default=30, help="interleaved timing rounds (min is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vector-width", type=int, default=None,
                    help="pruning group / kernel width V (default: the host's SIMD width; 32 = two AVX-512 vectors)")
    ap.add_argument("--json", default=os.path.join(ROOT, "tools", "out", "bench_kernels.json"),
                    help="where to write the results as JSON")
    ap.add_argument("--markdown", nargs="?", const="-", default=None,
                    help="also print (or write to the given path) the table as Markdown")
    ap.add_argument("--in-process", action="store_true",
                    help="measure all thread counts in this process (default: one subprocess per count)")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    names = args.layers.split(",") if args.layers else (list(LAYERS) if args.full else QUICK_LAYERS)
    for n in names:
        if n not in LAYERS:
            ap.error(f"unknown layer {n!r}; choose from {', '.join(LAYERS)}")
    trials = args.tune_trials if args.tune_trials is not None else (FULL_TRIALS if args.full else 0)
    if args.tune_only:
        if trials <= 0:
            ap.error("--tune-only needs --tune-trials N > 0 (or --full)")
        start = time.perf_counter()
        metas = tune_layers(names, trials, verbose=args.verbose_tuning)
        for n, m in metas.items():
            print(f"{n:12s} trials={m.get('trials')} tune_seconds={m.get('tune_seconds', 0):.0f} "
                  f"best_ms={(m.get('best_seconds') or float('nan')) * 1e3:.3f}")
        print(f"total {time.perf_counter() - start:.0f} s")
        return 0
    sparsities = [int(v) for v in args.sparsities.split(",")] if args.sparsities else \
        (FULL_SPARSITIES if args.full else QUICK_SPARSITIES)
    threads = [int(v) for v in args.threads.split(",")]
    if args._worker:  # child: one thread count, results to the given file
        res = run_worker(names, sparsities, threads[0], trials, args.repeat, args.seed, args.vector_width)
        with open(args._worker, "w") as fh:
            json.dump(res, fh)
        return 0

    command = "python tools/bench_kernels.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    start = time.perf_counter()
    if trials > 0:  # tune once, up front, in this process (cached), so the workers only load records
        tune_layers(names, trials, verbose=args.verbose_tuning)
    results = []
    from alcs_tvm.timing import rows_per_thread_count

    if args.in_process:
        for n in threads:
            results += run_worker(names, sparsities, n, trials, args.repeat, args.seed, args.vector_width)
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--layers", ",".join(names), "--sparsities",
               ",".join(map(str, sparsities)), "--tune-trials", str(trials), "--repeat", str(args.repeat),
               "--seed", str(args.seed)]
        if args.vector_width:
            cmd += ["--vector-width", str(args.vector_width)]
        if args.verbose_tuning:
            cmd.append("--verbose-tuning")
        log(f"[bench] one subprocess per thread count: {' '.join(cmd[2:])}")
        with tempfile.TemporaryDirectory(prefix="bench_kernels_") as work:
            results = rows_per_thread_count(cmd, threads, work)
    elapsed = time.perf_counter() - start

    print("\n==================== summary ====================")
    print_tables(results)
    print(f"\n{summary(results)}; total {elapsed:.0f} s")
    doc = {"command": command, "machine": _machine(), "repeat": args.repeat, "tune_trials": trials,
           "threads": threads, "sparsities": sparsities, "layers": names, "seconds": elapsed,
           "bar": {"s0_min_ratio": 0.95, "range": list(BAR_RANGE), "min_fraction_of_ideal": 0.9,
                   "ours_column": "kernel"},
           "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(doc, fh, indent=1)
    log(f"[bench] JSON written to {args.json}")
    if args.markdown:
        md = markdown(results, command)
        if args.markdown == "-":
            print("\n" + md)
        else:
            with open(args.markdown, "w") as fh:
                fh.write(md)
            log(f"[bench] Markdown written to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
