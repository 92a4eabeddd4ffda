"""Compiled models side by side: several `alcs compile` libraries of one model, timed in one process, interleaved.

The way to tell a code change's effect on a whole model from the host's drift: compile the model with each tree
(`cd TREE && python -m alcs_tvm.cli compile model.onnx -o TREE.so`), then time the libraries together here; each
round times every library once, so a change of the host's speed hits them all alike. Outputs are compared with
the first library's before timing.

    python tools/ab_libraries.py before.so after.so [--threads 1] [--repeat 30]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("libraries", nargs="+", help="compiled models of the same ONNX model (with their .json sidecars)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30, help="interleaved rounds (min is reported)")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import tvm
    from tvm import relax

    from alcs_tvm.run import flatten_outputs, make_inputs, read_sidecar
    from alcs_tvm.timing import measure_interleaved, set_threads

    set_threads(args.threads)
    sidecar = read_sidecar(args.libraries[0])
    if sidecar is None:
        ap.error(f"{args.libraries[0]} has no sidecar with its input shapes")
    inputs = [tvm.runtime.tensor(a) for a in make_inputs(sidecar).values()]
    calls, reference = {}, None
    for path in args.libraries:
        vm = relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
        out = flatten_outputs(vm["main"](*inputs))[0]
        if reference is None:
            reference = out
        else:
            err = float(np.abs(out - reference).max() / (np.abs(reference).max() + 1e-12))
            print(f"{path}: first output off the first library's by {err:.1e} (relative to its max)")
        calls[path] = (lambda vm=vm: vm["main"](*inputs))
    stats = measure_interleaved(calls, args.repeat)
    for path, s in stats.items():
        print(f"{s.min:9.3f} ms min  {s.median:9.3f} ms median  {path}")


if __name__ == "__main__":
    main()
