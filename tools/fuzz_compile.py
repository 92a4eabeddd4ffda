"""Fuzz the compiler: random single-conv and small-chain ONNX models, compiled by alcs and checked against ONNX
Runtime on the same input.

    python tools/fuzz_compile.py --seed 0 --count 200 [--json tools/out/fuzz.json] [--keep DIR] [--winograd 4]

Each case draws an NCHW input (batch 1-2, channels not a multiple of V, odd sizes) and a chain of 1-3 layers:
Conv (1x1, 3x3, 5x5, 1x7, 7x1; stride 1-2; dilation 1-2; per-side pads including zero on one side; groups 1,
depthwise or grouped; with or without bias) and optionally BatchNormalization, or a ConvTranspose (kernel 2-4,
stride 1-3, dilation 1-2, per-side pads, output padding), then an epilogue (none, Relu, Clip(0, 6), HardSwish,
HardSigmoid, Sigmoid, SiLU as Sigmoid+Mul, PRelu, LeakyRelu, or an Add of the chain's input when shapes allow).
Weights are dense or SIMD-block sparse at a random sparsity. A case passes when it compiles and its output matches ORT within
``max |alcs - ort| <= 1e-4 * max(1, max |ort|)``; a failure prints its seed, the model and the first line of the
error, and ``--keep`` saves its ONNX file. Exit status 1 when any case fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from alcs_tvm import compiler  # noqa: E402
from alcs_tvm.run import run_model, write_sidecar  # noqa: E402
from alcs_tvm.sparse_format import random_block_sparse  # noqa: E402

KERNELS = [(1, 1), (3, 3), (5, 5), (1, 7), (7, 1)]
EPILOGUES = [None, "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "SiLU", "PRelu", "LeakyRelu", "Add"]
TOLERANCE = 1e-4


def _conv_out(size, kernel, stride, dilation, pad_before, pad_after):
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def _epilogue(rng, nodes, inits, i, out, desc, current, shape, new_shape):
    """Append a random epilogue after ``out``; returns the new output name and description."""
    epilogue = EPILOGUES[int(rng.integers(len(EPILOGUES)))]
    if epilogue == "Add" and new_shape != shape:
        epilogue = "Relu"
    if epilogue == "Clip":
        inits += [numpy_helper.from_array(np.array(0, np.float32), f"lo{i}"),
                  numpy_helper.from_array(np.array(6, np.float32), f"hi{i}")]
        nodes.append(helper.make_node("Clip", [out, f"lo{i}", f"hi{i}"], [f"act{i}"]))
    elif epilogue == "Add":
        nodes.append(helper.make_node("Add", [out, current], [f"act{i}"]))
    elif epilogue == "LeakyRelu":
        nodes.append(helper.make_node("LeakyRelu", [out], [f"act{i}"], alpha=0.1))
    elif epilogue == "HardSigmoid":  # torch's nn.Hardsigmoid
        nodes.append(helper.make_node("HardSigmoid", [out], [f"act{i}"], alpha=1 / 6))
    elif epilogue == "PRelu":  # per-channel slopes, or one shared
        count = new_shape[1] if rng.random() < 0.7 else 1
        inits.append(numpy_helper.from_array(rng.uniform(0.05, 0.5, (count, 1, 1)).astype(np.float32), f"slope{i}"))
        nodes.append(helper.make_node("PRelu", [out, f"slope{i}"], [f"act{i}"]))
    elif epilogue == "SiLU":  # as torch exports nn.SiLU
        nodes += [helper.make_node("Sigmoid", [out], [f"sig{i}"]),
                  helper.make_node("Mul", [out, f"sig{i}"], [f"act{i}"])]
    elif epilogue is not None:
        nodes.append(helper.make_node(epilogue, [out], [f"act{i}"]))
    if epilogue is None:
        return out, desc
    return f"act{i}", desc + f" +{epilogue}"


def random_case(rng: np.random.Generator, winograd_shapes: bool = False):
    """``(model, input, description)`` for one random case. ``winograd_shapes``: half the groups=1 convs are drawn
    as ones Winograd can run (3x3, stride 1, no dilation, whole 16-channel output blocks); other draws as usual."""
    n = int(rng.choice([1, 1, 1, 2]))
    c = int(rng.choice([1, 3, 5, 8, 17, 24, 33]))
    h, w = int(rng.integers(5, 21)), int(rng.integers(5, 21))
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    nodes, inits, parts = [], [], []
    current, shape = "x", (n, c, h, w)
    for i in range(int(rng.integers(1, 4))):
        cin, hin, win = shape[1], shape[2], shape[3]
        kh, kw = KERNELS[int(rng.integers(len(KERNELS)))]
        stride = int(rng.choice([1, 1, 2]))
        dilation = int(rng.choice([1, 1, 1, 2]))
        eligible = winograd_shapes and cin % 4 == 0 and rng.random() < 0.5
        if eligible:
            (kh, kw), stride, dilation = (3, 3), 1, 1
        pads = [int(rng.integers(0, max(1, (k - 1) * dilation) + 1)) for k in (kh, kw, kh, kw)]
        ho = _conv_out(hin, kh, stride, dilation, pads[0], pads[2])
        wo = _conv_out(win, kw, stride, dilation, pads[1], pads[3])
        if ho < 1 or wo < 1:
            break
        if not eligible and rng.random() < 0.15:  # a transposed conv instead (a decoder's upsampling)
            tk, ts = int(rng.choice([2, 3, 4])), int(rng.choice([1, 2, 2, 3]))
            tdil = int(rng.choice([1, 1, 1, 2]))
            tpads = [int(rng.integers(0, tk)) for _ in range(4)]
            out_pad = int(rng.integers(0, ts)) if tdil == 1 else 0
            ho = (hin - 1) * ts - tpads[0] - tpads[2] + tdil * (tk - 1) + 1 + out_pad
            wo = (win - 1) * ts - tpads[1] - tpads[3] + tdil * (tk - 1) + 1 + out_pad
            if ho < 1 or wo < 1 or ho > 64 or wo > 64:
                break
            cout = int(rng.choice([3, 8, 16, 24]))
            weight = (rng.standard_normal((cin, cout, tk, tk)) / np.sqrt(cin * tk * tk)).astype(np.float32)
            inits.append(numpy_helper.from_array(weight, f"w{i}"))
            inputs = [current, f"w{i}"]
            if rng.random() < 0.6:
                inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), f"b{i}"))
                inputs.append(f"b{i}")
            out = f"conv{i}"
            nodes.append(helper.make_node("ConvTranspose", inputs, [out], name=f"conv{i}", kernel_shape=[tk, tk],
                                          strides=[ts, ts], dilations=[tdil, tdil], pads=tpads,
                                          output_padding=[out_pad, out_pad]))
            desc = f"convT{tk}x{tk} {cin}->{cout} s{ts} d{tdil} p{tpads} op{out_pad}"
            out, desc = _epilogue(rng, nodes, inits, i, out, desc, current, shape, (n, cout, ho, wo))
            parts.append(desc)
            current, shape = out, (n, cout, ho, wo)
            continue
        group_kind = "one" if eligible else rng.choice(["one", "one", "one", "depthwise", "grouped"])
        if group_kind == "depthwise":
            groups, cout = cin, cin * int(rng.choice([1, 1, 2]))
        elif group_kind == "grouped" and cin % 2 == 0 and cin > 2:
            groups = int(rng.choice([d for d in (2, 3, 4) if cin % d == 0] or [1]))
            cout = groups * int(rng.integers(1, 9))
        else:
            groups, cout = 1, int(rng.choice([16, 32, 48, 64] if eligible else [4, 16, 20, 32, 48, 64, 100]))
        weight = (rng.standard_normal((cout, cin // groups, kh, kw)) / np.sqrt(cin // groups * kh * kw)).astype(
            np.float32)
        sparsity = float(rng.choice([0.0, 0.0, 0.5, 0.8, 0.95]))
        if sparsity and groups == 1:
            weight = random_block_sparse(weight, int(rng.choice([4, 8, 16, 32])), sparsity, rng)
        inputs = [current, f"w{i}"]
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        if rng.random() < 0.6:
            inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), f"b{i}"))
            inputs.append(f"b{i}")
        out = f"conv{i}"
        nodes.append(helper.make_node("Conv", inputs, [out], name=f"conv{i}", kernel_shape=[kh, kw],
                                      strides=[stride, stride], dilations=[dilation, dilation], pads=pads,
                                      group=groups))
        desc = f"conv{kh}x{kw} {cin}->{cout} s{stride} d{dilation} p{pads} g{groups} sp{sparsity}"
        if rng.random() < 0.3:
            for name, values in (("scale", rng.uniform(0.5, 1.5, cout)), ("bias", rng.standard_normal(cout)),
                                 ("mean", rng.standard_normal(cout) * 0.1), ("var", rng.uniform(0.5, 2, cout))):
                inits.append(numpy_helper.from_array(values.astype(np.float32), f"bn{i}_{name}"))
            nodes.append(helper.make_node("BatchNormalization", [out] + [f"bn{i}_{k}" for k in
                                                                          ("scale", "bias", "mean", "var")],
                                          [f"bn{i}"], epsilon=1e-5))
            out, desc = f"bn{i}", desc + " +bn"
        new_shape = (n, cout, ho, wo)
        out, desc = _epilogue(rng, nodes, inits, i, out, desc, current, shape, new_shape)
        parts.append(desc)
        current, shape = out, new_shape
    if not nodes:
        return random_case(rng, winograd_shapes)
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, x, f"in {list(x.shape)}: " + " | ".join(parts)


def check_case(model, x, work: str, name: str = "case", winograd="auto") -> tuple:
    """``(ok, detail)``: compile with alcs (``winograd`` as ``alcs compile --winograd``), run on the Relax VM,
    compare with ONNX Runtime. ``name`` must differ between the cases of one process: a library path loaded once
    stays loaded (dlopen)."""
    import onnxruntime as ort

    path = os.path.join(work, f"{name}.onnx")
    onnx.save(model, path)
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    try:
        executable, report = compiler.compile(path, "x86", winograd=winograd)
        lib = os.path.join(work, f"{name}.so")
        compiler.export(executable, lib, "x86")
        write_sidecar(lib, report.relax_module)
        (actual,), _ = run_model(lib, {"x": x})
    except Exception as err:  # noqa: BLE001 - any failure is a finding
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()] or [type(err).__name__]
        return False, f"{type(err).__name__}: {lines[-1][:200]}"
    if actual.shape != expected.shape:
        return False, f"shape {actual.shape} != ORT's {expected.shape}"
    error = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    bound = TOLERANCE * max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    sparse = sum(layer.decision == "sparse" for layer in report.layers)
    winograd_layers = sum(layer.algorithm != "direct" for layer in report.layers)
    return error <= bound, f"max abs error {error:.2e} (bound {bound:.2e}), {sparse} sparse layer(s), " \
        f"{winograd_layers} Winograd"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="first case's seed (case i uses seed + i)")
    ap.add_argument("--count", type=int, default=50, help="number of cases")
    ap.add_argument("--json", help="write every case's result here")
    ap.add_argument("--keep", help="save the ONNX file of each failing case in this directory")
    ap.add_argument("--winograd", default="auto", choices=["auto", "off", "2", "4"],
                    help="as alcs compile --winograd (2 or 4: every 3x3 stride-1 conv that can runs as Winograd, and "
                         "half the convs are drawn so that they can)")
    args = ap.parse_args(argv)
    winograd = int(args.winograd) if args.winograd.isdigit() else args.winograd
    results, failed, started = [], 0, time.time()
    with tempfile.TemporaryDirectory(prefix="alcs-fuzz-") as work:
        for i in range(args.count):
            seed = args.seed + i
            model, x, desc = random_case(np.random.default_rng(seed), winograd_shapes=winograd != "auto")
            try:
                ok, detail = check_case(model, x, work, f"case{seed}", winograd)
            except Exception:  # noqa: BLE001 - a crash of the checker itself is reported, not fatal
                ok, detail = False, "checker crashed: " + traceback.format_exc().strip().splitlines()[-1]
            results.append({"seed": seed, "model": desc, "ok": ok, "detail": detail})
            if not ok:
                failed += 1
                print(f"FAIL seed {seed}: {desc}\n     {detail}", flush=True)
                if args.keep:
                    os.makedirs(args.keep, exist_ok=True)
                    onnx.save(model, os.path.join(args.keep, f"fuzz_{seed}.onnx"))
    summary = f"{args.count - failed} passed, {failed} failed"
    print(f"{summary} (seeds {args.seed}..{args.seed + args.count - 1}, {time.time() - started:.0f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "count": args.count, "failed": failed, "cases": results}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
