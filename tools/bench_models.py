"""Whole-model benchmark: `alcs compile` output vs ONNX Runtime and PyTorch on the same pruned model.

ResNet-18 and MobileNetV2 (224x224, batch 1, random weights) with every groups=1 conv SIMD-block pruned to a
sparsity (V = the host's SIMD width), exported to ONNX, compiled with the ALCS pass for this host, and timed side
by side (interleaved rounds, min of R, see alcs_tvm/timing.py) against ONNX Runtime and PyTorch running the
same pruned model densely. One subprocess per thread count. Also prints where the compiled model spends its
time (sparse kernels vs depthwise vs the rest) and the compile time.

    python tools/bench_models.py                    # both models, 0/50/70/80/90 %, 1 and 2 threads
    python tools/bench_models.py --models resnet18 --sparsities 0,80 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from alcs_tvm.kernel_profile import time_by_kind  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2")
SPARSITIES = (0, 50, 70, 80, 90)
BARS = {  # (sparsity %, minimum ORT/alcs ratio) from the issue; at 0 % alcs may be at most 1.25x slower
    "resnet18": {0: 1 / 1.25, 80: 3.5},
    "mobilenet_v2": {0: 1 / 1.25, 80: 2.5},
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_worker(models, sparsities, threads: int, repeat: int, vector_width=None, tune=False) -> list:
    import onnxruntime as ort
    import torch
    import tvm
    from tvm import relax

    from alcs_tvm import zoo
    from alcs_tvm.compiler import compile as alcs_compile
    from alcs_tvm.target import resolve_target
    from alcs_tvm.timing import OTHER_RUNTIMES, measure_interleaved, set_threads

    set_threads(threads)
    info = resolve_target("x86", vector_width)
    rows = []
    tmp = tempfile.mkdtemp(prefix="bench_models_")
    for name in models:
        for sparsity in sparsities:
            model = zoo.get_model(name).eval()
            if sparsity:
                zoo.simd_prune_(model, info, sparsity / 100, rng=0)  # each conv in its group width
            path = os.path.join(tmp, f"{name}_{sparsity}.onnx")
            zoo.export_onnx(model, path, (1, 3, 224, 224))
            t0 = time.perf_counter()
            executable, report = alcs_compile(path, info)  # a TargetInfo carries its V
            compile_s = time.perf_counter() - t0
            tuned = None
            if tune:  # alcs tune on this host at this thread count, then compile with the records
                from alcs_tvm.autotune import tune_model

                t0 = time.perf_counter()
                records = tune_model(path, os.path.join(tmp, f"{name}_{sparsity}.tuning.json"), info, local=True,
                                     quiet=True)
                tune_s = time.perf_counter() - t0
                tuned = relax.VirtualMachine(alcs_compile(path, info, tuning=records)[0], tvm.cpu())
            x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
            vm = relax.VirtualMachine(executable, tvm.cpu())
            arg = tvm.runtime.tensor(x)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            xt = torch.from_numpy(x)
            ours = vm["main"](arg).numpy()
            ref = session.run(None, {"input": x})[0]
            error = float(np.abs(ours - ref).max() / np.abs(ref).max())

            def torch_run():
                with torch.inference_mode():
                    model(xt)

            log(f"[{threads}t] {name} {sparsity}%: compiled in {compile_s:.1f} s "
                f"({len(report.sparse_layers)} sparse layers), timing...")
            runs = {"alcs": lambda: vm["main"](arg), "ort": lambda: session.run(None, {"input": x}),
                    "torch": torch_run}
            if tuned is not None:
                runs["alcs_tuned"] = lambda: tuned["main"](arg)
                error = max(error, float(np.abs(tuned["main"](arg).numpy() - ref).max() / np.abs(ref).max()))
            # ORT's and torch's pools spin on after their runs and would steal the 2nd core: time them apart
            stats = measure_interleaved(runs, repeat=repeat, apart=OTHER_RUNTIMES)
            rows.append({"model": name, "sparsity": sparsity, "threads": threads,
                         "vector_width": "/".join(map(str, info.group_widths())),
                         "alcs_ms": stats["alcs"].min, "ort_ms": stats["ort"].min, "torch_ms": stats["torch"].min,
                         "alcs_median_ms": stats["alcs"].median, "ort_median_ms": stats["ort"].median,
                         "torch_median_ms": stats["torch"].median, "compile_s": compile_s,
                         "sparse_layers": len(report.sparse_layers), "dense_layers": len(report.dense_layers),
                         "max_rel_error_vs_ort": error, "time_breakdown": time_by_kind(executable, [x])})
            if tuned is not None:
                rows[-1].update({"alcs_tuned_ms": stats["alcs_tuned"].min, "tune_s": tune_s})
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def table(rows) -> list:
    tuned = any("alcs_tuned_ms" in r for r in rows)
    lines = ["| model | V | sparsity | threads | alcs ms | ORT ms | torch ms | ORT/alcs | torch/alcs | bar | "
             "compile s | time in alcs conv kernels |" + (" alcs tuned ms | ORT/tuned | tune s |" if tuned else ""),
             "|---" * (15 if tuned else 12) + "|"]
    for r in rows:
        ratio = r["ort_ms"] / r["alcs_ms"]
        bar = BARS.get(r["model"], {}).get(r["sparsity"])
        verdict = "-" if bar is None else (f"{'pass' if ratio >= bar else 'MISS'} (>= {bar:.2f})")
        line = (f"| {r['model']} | {r.get('vector_width', '-')} | {r['sparsity']}% | {r['threads']} | "
                f"{r['alcs_ms']:.2f} | {r['ort_ms']:.2f} | {r['torch_ms']:.2f} | {ratio:.2f} | "
                f"{r['torch_ms'] / r['alcs_ms']:.2f} | {verdict} | {r['compile_s']:.1f} | "
                f"{r['time_breakdown'].get('alcs conv', 0):.0%} |")
        if tuned:
            line += (f" {r['alcs_tuned_ms']:.2f} | {r['ort_ms'] / r['alcs_tuned_ms']:.2f} | {r['tune_s']:.0f} |"
                     if "alcs_tuned_ms" in r else " - | - | - |")
        lines.append(line)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="percent, comma separated")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--tune", action="store_true",
                    help="also `alcs tune` each model on this host and time the compile with its records")
    ap.add_argument("--vector-width", type=int, default=None,
                    help="pruning group / kernel width V (default: the host's SIMD width; 32 = two AVX-512 vectors)")
    ap.add_argument("--json", default=os.path.join(ROOT, "tools", "out", "bench_models.json"))
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    models = args.models.split(",")
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    sparsities = [int(s) for s in args.sparsities.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    if args._worker:
        with open(args._worker, "w") as f:
            json.dump(run_worker(models, sparsities, threads[0], args.repeat, args.vector_width, args.tune), f)
        return 0
    from alcs_tvm.timing import rows_per_thread_count

    with tempfile.TemporaryDirectory(prefix="bench_models_") as work:
        rows = rows_per_thread_count([sys.executable, os.path.abspath(__file__), "--models", args.models,
                                      "--sparsities", args.sparsities, "--repeat", str(args.repeat)]
                                     + ([] if args.vector_width is None else ["--vector-width", str(args.vector_width)])
                                     + (["--tune"] if args.tune else []), threads, work)
    print("\n".join(table(rows)))
    for r in rows:
        print(f"{r['model']} {r['sparsity']}% {r['threads']}t time split: "
              + ", ".join(f"{k} {v:.0%}" for k, v in r["time_breakdown"].items()))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    command = "python tools/bench_models.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    with open(args.json, "w") as f:
        json.dump({"command": command, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
