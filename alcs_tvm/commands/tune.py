"""``alcs tune``: search the sparse kernel's register tile and task order per conv on a device."""
from __future__ import annotations

import time
from pathlib import Path

from ..input_shapes import parse_input_shapes
from ..schedules import SparseConvSchedule
from .common import (TARGET_HELP, VECTOR_WIDTH_HELP, add_device_arguments, check_device_arguments,
                     check_output, input_shapes_arg, require_file)

# Deferred on purpose: the library modules load TVM, torch and ONNX Runtime (seconds of CPU), so they (and numpy) are
# imported inside the functions that need them, after the arguments are checked: `alcs --help` and a bad argument
# answer at once, and a Ctrl-C while they load is an interrupt like any other (cli.main).


def register(subparsers):
    p = subparsers.add_parser(
        "tune", help="search the sparse kernel's register tile and task order per conv on a device",
        description="Time a few schedules (register tile, task order; the default among them) of every "
                    "rewritable conv of MODEL.onnx on the device, as it runs in the model, and record the "
                    "fastest. `alcs compile --tuning RECORDS` uses them. Rerunning resumes.")
    p.add_argument("model", help="ONNX file (the pruned model you will compile: densities matter)")
    p.add_argument("--target", default="x86", help=TARGET_HELP)
    p.add_argument("-o", "--output", required=True, help="tuning records JSON (resumed if it exists)")
    add_device_arguments(p)
    p.add_argument("--candidates", type=int, default=12, help="schedules tried per conv (default 12)")
    p.add_argument("--repeat", type=int, default=10, help="timing samples per schedule (default 10)")
    p.add_argument("--min-repeat-ms", type=int, default=5, help="minimum duration of one sample (default 5)")
    input_shapes_arg(p)
    p.add_argument("--vector-width", type=int, help=VECTOR_WIDTH_HELP)
    p.add_argument("--estimate", metavar="CORE",
                   help="no device: rank the candidates by their llvm-mca estimate on CORE (neoverse-n1, "
                        "cortex-a55); the records and this report say estimated")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args):
    require_file(args.model)
    check_output(args.output)  # saved after every layer (resumable): a bad path fails now, not after the first
    if args.estimate is None:
        check_device_arguments(args)
    input_shapes = parse_input_shapes(args.input_shapes) if args.input_shapes else None
    from ..autotune import tune_model
    from ..tuning_records import TuningRecords

    t0 = time.time()
    records = tune_model(args.model, args.output, args.target, tracker=args.rpc_tracker, key=args.rpc_key,
                         rpc=args.rpc, local=args.local, input_shapes=input_shapes, vector_width=args.vector_width,
                         repeat=args.repeat, min_repeat_ms=args.min_repeat_ms, max_candidates=args.candidates,
                         timeout=args.device_timeout, quiet=args.quiet, estimate=args.estimate)
    rows = [["conv", "schedule", "ms", "default", "ms ", "gain"]]
    tuned = default = 0.0
    for name, entry in records.layers.items():
        tuned, default = tuned + entry["tuned_ms"], default + entry["default_ms"]
        rows.append([name, TuningRecords.schedule_of(entry).describe(), f"{entry['tuned_ms']:.4f}",
                     SparseConvSchedule(**entry["default_schedule"]).describe(), f"{entry['default_ms']:.4f}",
                     f"{entry['default_ms'] / entry['tuned_ms']:.2f}x"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    how = f", ESTIMATED by llvm-mca -mcpu={args.estimate} (not measured)" if args.estimate else ""
    print(f"wrote {Path(args.output)}: {len(records.layers)} convs, sum {default:.3f} -> {tuned:.3f} ms{how} "
          f"({time.time() - t0:.0f} s)")
    return 0
