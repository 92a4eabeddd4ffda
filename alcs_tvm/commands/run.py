"""``alcs run``: run a compiled model here or on an RPC device, optionally timing it."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..library_file import check_library
from .common import INTERRUPTS, OutputFiles, add_device_arguments, check_device_arguments

# Deferred on purpose: the library modules load TVM, torch and ONNX Runtime (seconds of CPU), so they (and numpy) are
# imported inside the functions that need them, after the arguments are checked: `alcs --help` and a bad argument
# answer at once, and a Ctrl-C while they load is an interrupt like any other (cli.main).


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run a compiled model here or on an RPC device, optionally timing it",
                              description="Run a compiled model here or on an RPC device, optionally timing it.")
    p.add_argument("lib", metavar="OUT.so", help="Relax executable library (export_library output)")
    p.add_argument("--inputs", metavar="IN.npz", help="inputs by name (default: made up from OUT.so.json)")
    p.add_argument("--outputs", metavar="OUT.npz", help="save the outputs here")
    p.add_argument("--fill-mode", choices=("zeros", "ones", "random"), default="random",
                   help="made-up inputs when --inputs is not given (default random, seed 0)")
    p.add_argument("--print-time", action="store_true", help="print mean/median/std latency in ms")
    p.add_argument("--repeat", type=int, default=10, help="timing repeats (with --print-time; default 10)")
    p.add_argument("--number", type=int, default=1, help="runs per repeat (with --print-time; default 1)")
    add_device_arguments(p, local=False)
    p.add_argument("--function", default=None, help="Relax function to run (default main)")
    p.add_argument("--profile", action="store_true",
                   help="time every kernel of one inference on its own and print where the time goes (this host)")
    p.set_defaults(func=run)


def run(args):
    check_library(args.lib, relax=True)  # missing, cut short or not a Relax library: one line, before TVM loads
    check_device_arguments(args)
    if args.repeat < 1 or args.number < 1:
        raise ValueError("--repeat and --number must be >= 1")
    # numpy adds .npz to a name without it
    saved = None if not args.outputs else args.outputs if args.outputs.endswith(".npz") else args.outputs + ".npz"
    outputs_file = OutputFiles(("--outputs", saved))
    if args.profile and (args.rpc or args.rpc_tracker):
        raise ValueError("--profile runs on this host only: TVM's RPC cannot carry the VM's instrument callback to "
                         "a device")
    import numpy as np

    inputs = None
    if args.inputs:
        with np.load(args.inputs) as data:
            inputs = {k: data[k] for k in data.files}
    from ..kernel_profile import format_profile, profile_library
    from ..run import read_sidecar, run_model

    if args.profile:
        rows, whole_ms = profile_library(args.lib, inputs, repeat=args.repeat, function=args.function or "main")
        print(format_profile(rows, whole_ms))
        return 0
    t0 = time.time()
    try:
        outputs, timings = run_model(args.lib, inputs, rpc=args.rpc, tracker=args.rpc_tracker, key=args.rpc_key,
                                     repeat=args.repeat if args.print_time else 0, number=args.number,
                                     fill_mode=args.fill_mode, function=args.function, timeout=args.device_timeout)
    except (ValueError, TypeError, FileNotFoundError, ConnectionError, TimeoutError):
        raise
    except Exception as err:  # noqa: BLE001 - a TVM error from the model: one line
        if INTERRUPTS.fired.is_set():  # the error is how TVM passed Ctrl-C on
            raise
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        print(f"alcs run: error: running {Path(args.lib).name} failed: "
              f"{lines[-1][:300] if lines else type(err).__name__}", file=sys.stderr)
        return 2
    where = (f"{args.rpc_key} via {args.rpc_tracker}" if args.rpc_tracker else args.rpc) or "local cpu"
    print(f"ran {Path(args.lib).name} on {where} in {time.time() - t0:.2f} s")
    sidecar = read_sidecar(args.lib) or {}
    names = [e["name"] for e in sidecar.get("outputs", [])]
    if len(names) != len(outputs):
        names = [f"output_{i}" for i in range(len(outputs))]
    for name, out in zip(names, outputs):
        print(f"output {name}: shape {list(out.shape)} dtype {out.dtype}")
    if timings:
        print(f"time (ms): mean {timings['mean_ms']:.4f} median {timings['median_ms']:.4f} "
              f"std {timings['std_ms']:.4f} (repeat {timings['repeat']}, number {timings['number']})")
    if saved:
        with outputs_file:
            np.savez(outputs_file.path(saved), **dict(zip(names, outputs)))
        print(f"saved outputs to {saved}")
    return 0
