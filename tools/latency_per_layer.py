#!/usr/bin/env python
"""Where a latency table's prediction of a compiled model goes wrong, per layer: each conv timed inside one
inference of the model, next to the table's warm, cold and calibrated (mixed) entry for what the compiler ran.

The library must have its compile report beside it (``LIB.report.json``, as ``alcs compile`` and
``tools/validate_latency.py --keep-builds`` write it). The model runs on this host under the Relax VM's call
instrumentation: every call is timed in sequence (the caches as the inference leaves them; the instrument adds
about a microsecond per call), the median over ``--runs`` inferences. A Winograd conv's three kernels count as
its layer; kernels of no rewritten conv are the "rest of the model", the VM's builtins its overhead.

    python tools/latency_per_layer.py model.so table.json [--runs 50] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def in_sequence_times(lib_path, runs):
    """``[(symbol, median ms)]`` of every call of one inference, in call order."""
    import tvm
    from tvm import relax

    from alcs_tvm.kernel_profile import call_times
    from alcs_tvm.run import make_inputs, read_sidecar

    inputs = make_inputs(read_sidecar(lib_path))
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), tvm.cpu())
    arrays = inputs.values() if isinstance(inputs, dict) else inputs
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    for _ in range(2):  # with call_times' own, three inferences before the timed ones
        vm["main"](*args)
    samples = call_times(vm, args, runs)
    return [(symbol, float(np.median([s[i][1] for s in samples])) * 1e3) for i, (symbol, _) in enumerate(samples[0])]


def per_layer(report_layers, calls):
    """Attribute the calls to the report's conv layers: ``({layer name: ms}, rest ms, vm ms)``."""
    owners = {}  # symbol -> layer names calling it, in graph order
    for layer in report_layers:
        owners.setdefault(layer["symbol"], []).append(layer["name"])
    used, found, pending = {}, {}, 0.0
    rest = vm = 0.0
    for symbol, ms in calls:
        if symbol.startswith("vm.builtin"):
            vm += ms
        elif symbol in owners:
            k = used.get(symbol, 0)
            used[symbol] = k + 1
            name = owners[symbol][min(k, len(owners[symbol]) - 1)]
            found[name] = found.get(name, 0.0) + ms + pending
            pending = 0.0
        elif symbol.startswith("alcs_winograd"):  # a Winograd conv's input and GEMM stages: its output stage follows
            pending += ms
        else:
            rest += ms
    return found, rest + pending, vm


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("library")
    ap.add_argument("table")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, help="TVM_NUM_THREADS for the run (default: TVM's)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from alcs_tvm.latency import LatencyTable
    from alcs_tvm.layer import Conv2dSpec, layer_key

    table = LatencyTable.load(args.table)
    report = json.loads(Path(f"{args.library}.report.json").read_text())
    convs = [r for r in report["layers"] if r.get("op") == "conv2d" and r.get("spec") and r.get("symbol")]
    keys = [layer_key(Conv2dSpec.from_json(r["spec"]), r["vector_width"]) for r in convs]
    calls = in_sequence_times(args.library, args.runs)
    measured, rest, vm = per_layer(convs, calls)
    rows = []
    for r, key in zip(convs, keys):
        profile = table.layers[key]
        option = r["algorithm"] if r["algorithm"].startswith("winograd") else r["decision"]
        sparsity = 1.0 - r["density"]
        warm, cold = profile.cache_states(option, sparsity)
        rows.append({"layer": r["name"], "shape": r["shape"], "option": option, "sparsity": round(sparsity, 3),
                     "table_ms": profile.options(sparsity)[option], "warm_ms": warm, "cold_ms": cold,
                     "in_model_ms": measured.get(r["name"], float("nan"))})
    print(f"{'layer':14s} {'shape':30s} {'runs':10s} {'s':>5s} {'table':>8s} {'warm':>8s} {'cold':>8s} "
          f"{'in model':>8s} {'error':>7s}")
    for row in rows:
        err = row["table_ms"] / row["in_model_ms"] - 1
        print(f"{row['layer'][:14]:14s} {row['shape'][:30]:30s} {row['option']:10s} {row['sparsity']:5.2f} "
              f"{row['table_ms']:8.4f} {row['warm_ms']:8.4f} {row['cold_ms']:8.4f} {row['in_model_ms']:8.4f} "
              f"{err * 100:+6.1f}%")
    total = {k: sum(row[k] for row in rows) for k in ("table_ms", "warm_ms", "cold_ms", "in_model_ms")}
    err = total["table_ms"] / total["in_model_ms"] - 1
    print(f"{'convs':14s} {'':30s} {'':10s} {'':5s} {total['table_ms']:8.4f} {total['warm_ms']:8.4f} "
          f"{total['cold_ms']:8.4f} {total['in_model_ms']:8.4f} {err * 100:+6.1f}%")
    rest_model = table.rest_model_for(keys)
    print(f"rest of the model: table {table.rest_ms[rest_model]:.4f} ms; in the model {rest:.4f} ms of other kernels "
          f"+ {vm:.4f} ms of VM builtins (instrumented; the instrument's own cost is in every call)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "rest_kernels_ms": rest, "vm_builtins_ms": vm,
                                               "table_rest_ms": table.rest_ms[rest_model]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
