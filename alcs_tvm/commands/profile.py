"""``alcs profile``: measure a model's conv layers on a device into a latency table."""
from __future__ import annotations

import time
from pathlib import Path

from ..defaults import DEFAULT_SPARSITIES
from ..input_shapes import parse_input_shapes
from .common import (TARGET_HELP, VECTOR_WIDTH_HELP, add_device_arguments, check_device_arguments,
                     check_output, input_shapes_arg, parse_sparsities, require_file)

# Deferred on purpose: the library modules load TVM, torch and ONNX Runtime (seconds of CPU), so they (and numpy) are
# imported inside the functions that need them, after the arguments are checked: `alcs --help` and a bad argument
# answer at once, and a Ctrl-C while they load is an interrupt like any other (cli.main).


def register(subparsers):
    p = subparsers.add_parser(
        "profile", help="measure a model's conv layers on a device into a latency table",
        description="Measure every distinct conv of MODEL.onnx on the device (dense, and sparse at a grid of "
                    "SIMD-block sparsities) and the rest of the model; write the latency table used by "
                    "`alcs compile --latency-table`. Rerunning resumes an interrupted profile.")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--target", default="x86", help=TARGET_HELP)
    p.add_argument("-o", "--output", required=True, help="latency table JSON (resumed if it exists)")
    add_device_arguments(p)
    p.add_argument("--sparsities", default=",".join(map(str, DEFAULT_SPARSITIES)),
                   help="grid of SIMD-block sparsities, ascending, in [0, 1) (default %(default)s)")
    p.add_argument("--repeat", type=int, default=20, help="timing samples per point (default 20)")
    p.add_argument("--min-repeat-ms", type=int, default=10, help="minimum duration of one sample (default 10)")
    p.add_argument("--masks", type=int, default=3,
                   help="at most this many random masks per sparsity, used when the spread is high (default 3)")
    input_shapes_arg(p)
    p.add_argument("--vector-width", type=int, help=VECTOR_WIDTH_HELP)
    p.add_argument("--model-name", help="name of the model's 'rest' entry in the table (default: file stem)")
    p.add_argument("--weights", choices=["calibrated", "cold", "warm"], default="calibrated",
                   help="which cache state the table uses for a layer's weights: in cache (warm), flushed before "
                        "every call (cold), or the mix that makes two whole-model measurements exact (default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args):
    require_file(args.model)
    check_output(args.output)  # saved after every layer (resumable): a bad path fails now, not after the first
    check_device_arguments(args)
    sparsities = parse_sparsities(args.sparsities)
    input_shapes = parse_input_shapes(args.input_shapes) if args.input_shapes else None
    from ..profiler import profile_model

    t0 = time.time()
    table = profile_model(args.model, args.output, args.target, tracker=args.rpc_tracker, key=args.rpc_key,
                          rpc=args.rpc, local=args.local, input_shapes=input_shapes,
                          vector_width=args.vector_width, sparsities=sparsities, repeat=args.repeat,
                          min_repeat_ms=args.min_repeat_ms, max_masks=args.masks, model_name=args.model_name,
                          timeout=args.device_timeout, quiet=args.quiet,
                          cold_weights={"calibrated": None, "cold": True, "warm": False}[args.weights])
    name = args.model_name or Path(args.model).stem
    rest = table.rest_ms.get(name)
    fit = table.models.get(name, {}).get("rest_fit_ms")
    print(f"wrote {args.output}: {len(table.layers)} layer configurations"
          + (f", rest of {name} {rest:.3f} ms" if rest is not None else "") + f" ({time.time() - t0:.0f} s)")
    if rest is not None and fit is not None and fit < rest:
        print(f"note: the rest of {name} is bounded at 0: the whole model minus its convs came out {fit:.3f} ms "
              f"(the convs timed alone took longer than in the model, e.g. on a busy host); predictions of "
              f"{name} are at least its convs' sum")
    return 0
