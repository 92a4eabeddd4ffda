#!/usr/bin/env python
"""Side-by-side latency of the dense (non-sparse) parts: Relax default build vs Relax + ``DenseCPUSchedule`` vs
ONNX Runtime vs PyTorch, with 1 and 2 threads, for full MobileNetV2 / ResNet-18 (1x3x224x224, dense weights),
per op class, and per depthwise layer of MobileNetV2.

Per op class: every PrimFunc of the scheduled module is compiled on its own and timed with random inputs
(x the number of times ``main`` calls it); ORT's per-node times come from its profiler. The class
``conv(groups=1)`` is what the sparse operator will replace; the "excl. conv" total is what dense_cpu owns.

    python tools/bench_dense_parts.py                    # both models, 1 and 2 threads
    python tools/bench_dense_parts.py --models mobilenet_v2 --threads 1 --skip-default
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from alcs_tvm.schedules.dense_cpu import dense_build_passes  # noqa: E402
from alcs_tvm.target import resolve_target  # noqa: E402

warnings.filterwarnings("ignore")


# ----------------------------------------------------------------------------------------------- models
def _local_models():
    import torch.nn as nn

    def cbr(i, o, k=3, s=1, g=1):
        return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o),
                             nn.ReLU6(inplace=True))

    class IR(nn.Module):
        def __init__(self, i, o, st, t):
            super().__init__()
            h = i * t
            self.res = st == 1 and i == o
            layers = [] if t == 1 else [cbr(i, h, 1)]
            layers += [cbr(h, h, 3, st, h), nn.Conv2d(h, o, 1, bias=False), nn.BatchNorm2d(o)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.res else self.conv(x)

    class MBV2(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                   (6, 320, 1, 1)]
            c = 32
            layers = [cbr(3, c, 3, 2)]
            for t, o, n, st in cfg:
                for j in range(n):
                    layers.append(IR(c, o, st if j == 0 else 1, t))
                    c = o
            layers.append(cbr(c, 1280, 1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(1280, 1000)

        def forward(self, x):
            return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    class Basic(nn.Module):
        def __init__(self, i, o, s):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o)
            self.c2, self.b2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
            self.down = (nn.Sequential(nn.Conv2d(i, o, 1, s, bias=False), nn.BatchNorm2d(o))
                         if s != 1 or i != o else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.down(x))

    class R18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            layers, c = [], 64
            for o, s in [(64, 1), (128, 2), (256, 2), (512, 2)]:
                layers += [Basic(c, o, s), Basic(o, o, 1)]
                c = o
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(512, 1000)

        def forward(self, x):
            x = self.layers(self.stem(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return {"mobilenet_v2": MBV2, "resnet18": R18}


def get_model(name: str):
    try:  # the project's zoo when it has landed
        from alcs_tvm import zoo
        model = getattr(zoo, name)()
    except Exception:  # noqa: BLE001
        model = _local_models()[name]()
    model.eval()
    with torch.no_grad():  # non-trivial BN statistics so folded weights are not all alike
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def export(model, shape) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(model, torch.randn(*shape), buf, dynamo=False, opset_version=13,
                      input_names=["input"], output_names=["output"])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- threads
def set_threads(n: int) -> None:
    """ORT and torch take it per session / call; TVM's pool reads TVM_NUM_THREADS (set by the parent process)."""
    torch.set_num_threads(n)


def timeit(fn, repeat: int, number: int = 1, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t) / number)
    return float(np.median(runs)) * 1e3


# ----------------------------------------------------------------------------------------------- op classes
def classify_primfunc(func) -> str:
    names = re.findall(r'T\.sblock\("([^"]+)"\)', func.script())
    joined = " ".join(names)
    if "group_conv2d" in joined:
        return "depthwise conv"
    if "conv2d" in joined:
        return "conv(groups=1)"
    if "pool_max" in joined or "pool_sum" in joined or "pool_avg" in joined:
        return "pooling"
    if "_red" in joined:
        return "global avg pool"
    if "matmul" in joined or "dense" in joined:
        return "matmul/linear"
    return "elementwise/other"


def classify_ort_node(op_type: str, group: int, weight_shape=None) -> str:
    if op_type in ("Conv", "FusedConv"):
        if weight_shape is not None and len(weight_shape) == 4:
            group = weight_shape[0] if weight_shape[1] == 1 and weight_shape[0] > 1 else 1
        return "depthwise conv" if group > 1 else "conv(groups=1)"
    if op_type in ("MaxPool", "AveragePool"):
        return "pooling"
    if op_type in ("GlobalAveragePool", "ReduceMean"):
        return "global avg pool"
    if op_type in ("Gemm", "MatMul", "FusedGemm"):
        return "matmul/linear"
    return "elementwise/other"


def _call_re(name: str):
    return re.compile(r"call_tir\((?:cls\.)?" + re.escape(name) + r",")


def _call_counts(mod) -> collections.Counter:
    text = mod["main"].script()
    counts = collections.Counter()
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            counts[gv.name_hint] = len(_call_re(gv.name_hint).findall(text))
    return counts


def primfunc_times(mod, target, repeat: int) -> list:
    """[(name, class, calls, ms per call, shape text)] for every PrimFunc of a scheduled module, in call order."""
    counts = _call_counts(mod)
    text = mod["main"].script()
    order = sorted(counts, key=lambda n: (_call_re(n).search(text).start() if counts[n] else 0))
    out = []
    dev = tvm.cpu()
    for name in order:
        func = mod[name]
        if counts[name] == 0:
            continue
        single = tvm.IRModule({name: func.with_attr("global_symbol", name)})
        lib = tvm.compile(single, target=target)
        args = []
        for p in func.params:
            buf = func.buffer_map[p] if hasattr(func, "buffer_map") else p  # 0.27: params are buffers
            shape = [int(s) for s in buf.shape]
            args.append(tvm.runtime.tensor(np.random.uniform(-1, 1, shape).astype(str(buf.dtype)), dev))
        f = lib[name]
        ms = timeit(lambda: f(*args), repeat=repeat, number=5)
        last = func.params[-1]
        out_shape = [int(s) for s in (func.buffer_map[last] if hasattr(func, "buffer_map") else last).shape]
        out.append((name, classify_primfunc(func), counts[name], ms, "x".join(map(str, out_shape))))
    return out


def ort_profile(model_bytes: bytes, feed: dict, threads: int, runs: int) -> list:
    """[(node name, class, mean us per run)] from ORT's profiler, in first-execution order."""
    onnx_model = onnx.load_from_string(model_bytes)
    groups = {}
    for node in onnx_model.graph.node:
        g = [a.i for a in node.attribute if a.name == "group"]
        groups[node.name] = g[0] if g else 1
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, feed)
    path = sess.end_profiling()
    # profile a fresh session so warm-up noise is excluded: restart with profiling on, then measure runs
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    for _ in range(2):
        sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    path = sess.end_profiling()
    with open(path) as fh:
        events = json.load(fh)
    per = collections.OrderedDict()
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        op = ev.get("args", {}).get("op_name", "")
        shapes = ev.get("args", {}).get("input_type_shape", [])
        wshape = list(shapes[1].values())[0] if len(shapes) > 1 and op in ("Conv", "FusedConv") else None
        per.setdefault(name, [op, [], wshape])[1].append(ev["dur"])
    out = []
    for name, (op, durs, wshape) in per.items():
        durs = durs[-runs:]
        out.append((name, classify_ort_node(op, groups.get(name, 1), wshape), float(np.median(durs)) / 1e3, op))
    return out  # ms per run


# ----------------------------------------------------------------------------------------------- main
def measure(name: str, threads: int, tinfo, repeat: int, skip_default: bool) -> dict:
    """All measurements of one model at one thread count (run in a process whose TVM pool has ``threads``)."""
    set_threads(threads)
    shape = (1, 3, 224, 224)
    x = np.random.RandomState(0).randn(*shape).astype("float32")
    model = get_model(name)
    model_bytes = export(model, shape)
    mod = from_onnx(onnx.load_from_string(model_bytes), keep_params_in_input=False)
    t0 = time.time()
    with tinfo.target:
        fused = tvm.transform.Sequential(dense_build_passes(tinfo))(mod)
    ours = relax.VirtualMachine(tvm.compile(fused, target=tinfo.target), tvm.cpu())
    build_s = time.time() - t0
    tx = tvm.runtime.tensor(x)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input": x})[0]
    got = ours["main"](tx).numpy()
    err = float(np.abs(got - ref).max() / max(1e-6, np.abs(ref).max()))
    res = {}
    if skip_default:
        res["relax default"] = float("nan")
    else:
        default = relax.VirtualMachine(tvm.compile(mod, target=tinfo.target), tvm.cpu())
        res["relax default"] = timeit(lambda: default["main"](tx), repeat=2, warmup=1)
    xt = torch.from_numpy(x)
    # interleave the contenders so machine noise hits all of them alike
    runs = collections.defaultdict(list)
    for _ in range(repeat):
        runs["relax+dense_cpu"].append(timeit(lambda: ours["main"](tx), repeat=1, number=3))
        runs["onnxruntime"].append(timeit(lambda: sess.run(None, {"input": x}), repeat=1, number=3))
        with torch.no_grad():
            runs["pytorch"].append(timeit(lambda: model(xt), repeat=1, number=3))
    for k, v in runs.items():
        res[k] = float(np.median(v))
    funcs = primfunc_times(fused, tinfo.target, repeat=repeat)
    nodes = ort_profile(model_bytes, {"input": x}, threads, runs=10)
    calls = _ordered_calls(fused, [(nm, ms, shp) for nm, cls, c, ms, shp in funcs if cls == "depthwise conv"])
    return {"build_s": build_s, "err": err, "whole": res, "funcs": funcs, "nodes": nodes, "dw_calls": calls}


def report(name: str, results: dict) -> None:
    first = next(iter(results.values()))
    print(f"\n=== {name} (1x3x224x224, dense weights): schedule+compile {first['build_s']:.1f}s, "
          f"max|ours-ORT|/max|ORT| = {first['err']:.1e}")
    print("\nwhole model (ms, median of interleaved runs)")
    print(f"{'threads':>7} {'relax default':>14} {'relax+dense_cpu':>16} {'onnxruntime':>12} {'pytorch':>9}"
          f" {'ours/ORT':>9} {'ours/torch':>10} {'default/ours':>12}")
    for n, r in results.items():
        w = r["whole"]
        print(f"{n:>7} {w['relax default']:>14.2f} {w['relax+dense_cpu']:>16.2f} {w['onnxruntime']:>12.2f} "
              f"{w['pytorch']:>9.2f} {w['relax+dense_cpu'] / w['onnxruntime']:>9.2f} "
              f"{w['relax+dense_cpu'] / w['pytorch']:>10.2f} {w['relax default'] / w['relax+dense_cpu']:>12.1f}")
    classes = ["depthwise conv", "pooling", "global avg pool", "matmul/linear", "elementwise/other",
               "conv(groups=1)"]
    for n, r in results.items():
        tvm_c = collections.defaultdict(float)
        ort_c = collections.defaultdict(float)
        for _, cls, calls, ms, _ in r["funcs"]:
            tvm_c[cls] += ms * calls
        for _, cls, ms, _ in r["nodes"]:
            ort_c[cls] += ms
        print(f"\nper op class, {n} thread(s) (ms per inference; ours = sum over PrimFuncs of time x calls, "
              f"ORT = profiler node times)")
        print(f"{'class':>20} {'ours':>8} {'ORT':>8} {'ours/ORT':>9}")
        for cls in classes:
            if tvm_c[cls] or ort_c[cls]:
                ratio = tvm_c[cls] / ort_c[cls] if ort_c[cls] else float("nan")
                print(f"{cls:>20} {tvm_c[cls]:>8.3f} {ort_c[cls]:>8.3f} {ratio:>9.2f}")
        t_ex = sum(v for k, v in tvm_c.items() if k != "conv(groups=1)")
        o_ex = sum(v for k, v in ort_c.items() if k != "conv(groups=1)")
        print(f"{'TOTAL excl. conv':>20} {t_ex:>8.3f} {o_ex:>8.3f} {t_ex / o_ex:>9.2f}")
        t_all, o_all = sum(tvm_c.values()), sum(ort_c.values())
        print(f"{'TOTAL (sum of ops)':>20} {t_all:>8.3f} {o_all:>8.3f} {t_all / o_all:>9.2f}")
        dw_t = r["dw_calls"]
        dw_o = [(nm, ms) for nm, cls, ms, _ in r["nodes"] if cls == "depthwise conv"]
        if dw_t and len(dw_t) == len(dw_o):
            print(f"\ndepthwise layers, {n} thread(s): ours (conv+bias+clip fused) vs ORT (fused Conv), in graph order")
            print(f"{'#':>3} {'output':>16} {'ours ms':>8} {'ORT ms':>8} {'ratio':>6}")
            for i, ((_, ms, shp), (_, oms)) in enumerate(zip(dw_t, dw_o)):
                print(f"{i:>3} {shp:>16} {ms:>8.4f} {oms:>8.4f} {ms / oms:>6.2f}")
        elif dw_t:
            print(f"(depthwise: {len(dw_t)} TVM calls vs {len(dw_o)} ORT nodes, not matched)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--target", default="x86")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--skip-default", action="store_true", help="skip the (very slow) unscheduled Relax build")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tinfo = resolve_target(args.target)

    if args.worker is not None:  # child: TVM_NUM_THREADS is set in our environment
        out = {m: measure(m, args.worker, tinfo, args.repeat, args.skip_default) for m in args.models}
        print("@@RESULT@@" + json.dumps(out))
        return

    print(f"target {tinfo.key}  family {tinfo.family}  V={tinfo.vector_width}")
    print("(TVM's thread pool size is fixed at start-up, so each thread count runs in its own process)")
    per_thread = {}
    for n in args.threads:
        env = dict(os.environ, TVM_NUM_THREADS=str(n), OMP_NUM_THREADS=str(n))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(n), "--target", args.target,
               "--repeat", str(args.repeat), "--models", *args.models] + (["--skip-default"]
                                                                          if args.skip_default else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")]
        if proc.returncode != 0 or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"worker with {n} threads failed")
        per_thread[n] = json.loads(line[0][len("@@RESULT@@"):])
    for m in args.models:
        report(m, {n: per_thread[n][m] for n in args.threads})


def _ordered_calls(mod, dw_rows):
    """Expand per-function rows into per-call rows in main's call order."""
    text = mod["main"].script()
    by_name = {nm: (ms, shp) for nm, ms, shp in dw_rows}
    out = []
    for line in text.splitlines():
        for nm in by_name:
            if _call_re(nm).search(line):
                out.append((nm, *by_name[nm]))
    return out


if __name__ == "__main__":
    main()
