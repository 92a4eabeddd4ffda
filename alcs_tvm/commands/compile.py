"""``alcs compile``: an ONNX model into a deployable Relax library, with the per-layer report."""
from __future__ import annotations

import os

from ..files import sidecar_path
from ..input_shapes import parse_input_shapes
from .common import TARGET_HELP, VECTOR_WIDTH_HELP, OutputFiles, input_shapes_arg, require_file

# Deferred on purpose: the library modules load TVM, torch and ONNX Runtime (seconds of CPU), so they (and numpy) are
# imported inside the functions that need them, after the arguments are checked: `alcs --help` and a bad argument
# answer at once, and a Ctrl-C while they load is an interrupt like any other (cli.main).


def register(subparsers):
    p = subparsers.add_parser(
        "compile", help="compile an ONNX model into a Relax library with sparse convolutions",
        description="Compile MODEL.onnx for a CPU target. Convolutions with SIMD-block sparse constant weights "
                    "run the ALCS sparse kernel; the report says, per layer, what ran and why.")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--target", default="x86", help=TARGET_HELP)
    p.add_argument("-o", "--output", required=True, help="output library (.so, or .tar of objects)")
    input_shapes_arg(p)
    p.add_argument("--vector-width", type=int, help=VECTOR_WIDTH_HELP)
    p.add_argument("--no-sparse", action="store_true", help="run every conv with the dense kernel")
    p.add_argument("--winograd", default="auto", choices=["auto", "off", "2", "4"],
                   help="3x3 stride-1 convs as Winograd F(m x m, 3x3): per layer where estimated faster than the "
                        "direct kernel at the layer's density (auto, the default), never (off), or every one that "
                        "can with tile m (2, 4)")
    p.add_argument("--sparsity-threshold", type=float, metavar="D",
                   help="use the sparse kernel for layers whose block density is <= D")
    p.add_argument("--latency-table", help="latency table JSON: decide per layer by measured latency")
    p.add_argument("--estimate-missing", nargs="*", metavar="TABLE",
                   help="layers not in --latency-table: estimate them with an XGBoost regressor trained on the "
                        "table (and on these further tables of the same target) instead of failing")
    p.add_argument("--tuning", metavar="RECORDS",
                   help="schedule tuning records from `alcs tune` (same target): each conv with its tuned schedule")
    p.add_argument("--cross-compiler", help="C++ cross compiler for linking (default for arm64: "
                                            "aarch64-linux-gnu-g++)")
    p.add_argument("--report", help="write the per-layer report JSON here (default: OUTPUT.report.json)")
    p.set_defaults(func=run)


def run(args):
    require_file(args.model)
    report_path = args.report or f"{args.output}.report.json"
    sidecar = str(sidecar_path(args.output))
    outputs = OutputFiles(("-o", args.output), ("-o", sidecar), ("--report", report_path))
    input_shapes = parse_input_shapes(args.input_shapes) if args.input_shapes else None
    if args.estimate_missing is not None and not args.latency_table:
        raise ValueError("--estimate-missing needs --latency-table")
    from .. import compiler
    from ..latency import LatencyTable
    from ..latency_regressor import LatencyRegressor
    from ..run import write_sidecar
    from ..target import resolve_target

    latency_table = None
    if args.latency_table:
        latency_table = LatencyTable.load(args.latency_table)
        if args.estimate_missing is not None:
            regressor = LatencyRegressor.fit([latency_table] + [LatencyTable.load(t) for t in args.estimate_missing])
            latency_table.estimate_missing(regressor)
            print(regressor.describe())
    info = resolve_target(args.target, args.vector_width)
    executable, report = compiler.compile(args.model, info, input_shapes=input_shapes, sparse=not args.no_sparse,
                                 density_threshold=args.sparsity_threshold, latency_table=latency_table,
                                 tuning=args.tuning, winograd=int(args.winograd) if args.winograd.isdigit() else args.winograd)
    print(report.table())
    with outputs:  # the library, its sidecar and the report appear together or not at all
        library = outputs.path(args.output)
        outputs.path(sidecar, temp=str(sidecar_path(library)))
        compiler.export(executable, library, info, args.cross_compiler)
        write_sidecar(library, report.relax_module, target=info.target)
        report.write(outputs.path(report_path))
    print(f"wrote {args.output} (+ {os.path.basename(report_path)})")
    return 0
