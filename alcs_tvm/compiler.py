"""ONNX -> deployable Relax library: import, the sparse rewrite, dense schedules, build, export.

The build sequence (also the one to copy when composing the pass into your own pipeline)::

    mod = frontend.import_onnx(model, input_shapes)        # parameters become constants
    mod = frontend.prepare_for_sparse(mod)                 # BN folded, conv -> add(bias) -> relu/clip
    SparseConvRewrite(target)                              # before legalisation: it matches R.nn.conv2d
    dense_build_passes(target)                             # legalise, fuse, hand-written CPU schedules
    tvm.compile(mod, target)                               # Relax VM executable
"""
from __future__ import annotations

import os
import time

import tvm

from . import frontend
from .passes.sparse_conv import SparseConvRewrite
from .schedules.dense_cpu import dense_build_passes
from .target import VECTOR_WIDTH_HELP, TargetInfo, resolve_target

__all__ = ["compile", "compile_module", "export", "conv_node_names"]


def conv_node_names(model) -> list:
    """ONNX Conv node names in graph order (the order the Relax importer emits them)."""
    return [node.name or f"Conv_{i}" for i, node in enumerate(n for n in model.graph.node if n.op_type == "Conv")]


def compile_module(mod, target="x86", *, vector_width=None, sparse=True, density_threshold=None,
                   latency_table=None, layer_names=None, tuning=None):
    """Compile an already imported and prepared Relax module. Returns ``(executable, report, lowered_mod)``.
    ``tuning``: :class:`~alcs_tvm.autotune.TuningRecords` (or their path) from ``alcs tune``."""
    info = resolve_target(target, vector_width)
    if latency_table is not None:  # a table measured on another target or TVM would pick layers wrongly
        latency_table.check_compatible(info, tvm.__version__)
    rewrite = SparseConvRewrite(info, sparse=sparse,
                                density_threshold=density_threshold, latency_table=latency_table,
                                layer_names=layer_names, tuning=tuning)
    with info.target:
        try:
            lowered = tvm.transform.Sequential([rewrite] + dense_build_passes(info))(mod)
        except Exception:
            rewrite.raise_user_error()
            raise
    executable = tvm.compile(lowered, target=info.target)
    return executable, rewrite.report, lowered


def compile(model, target="x86", *, input_shapes=None, vector_width=None, sparse=True,  # noqa: A001
            density_threshold=None, latency_table=None, tuning=None, verbose=False):
    """Compile an ONNX model (path, bytes or ModelProto) for ``target``. Returns ``(executable, report)``.

    ``executable.export_library(path)`` writes the deployable library (see :func:`export`, which also
    cross-compiles for ``arm64``)."""
    started = time.perf_counter()
    onnx_model = frontend.load_onnx(model)
    mod = frontend.prepare_for_sparse(frontend.import_onnx(onnx_model, input_shapes))
    executable, report, _ = compile_module(mod, target, vector_width=vector_width, sparse=sparse,
                                           density_threshold=density_threshold, latency_table=latency_table,
                                           layer_names=conv_node_names(onnx_model), tuning=tuning)
    report.notes.append(f"compiled in {time.perf_counter() - started:.1f} s")
    report.relax_module = mod
    if verbose:
        print(report.table())
    return executable, report


def export(executable, path: str, target="x86", cross_compiler: str | None = None):
    """Write the executable as a shared library (``.so``) or a ``.tar`` of objects; cross-compiles for targets
    this host cannot run (aarch64 uses ``aarch64-linux-gnu-g++`` unless ``cross_compiler`` is given)."""
    info = target if isinstance(target, TargetInfo) else resolve_target(target)
    path = str(path)
    if path.endswith(".tar"):
        executable.export_library(path)
        return path
    fcompile = None
    if cross_compiler or info.is_cross:
        from tvm.support import cc

        if cross_compiler is None:
            from .device import ensure_cross_toolchain

            cross_compiler = ensure_cross_toolchain(verbose=False)
        fcompile = cc.cross_compiler(cross_compiler)
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1] or '.so'}"
    executable.export_library(tmp, fcompile=fcompile) if fcompile else executable.export_library(tmp)
    os.replace(tmp, path)
    return path




def register_cli(subparsers):
    p = subparsers.add_parser(
        "compile", help="compile an ONNX model into a Relax library with sparse convolutions",
        description="Compile MODEL.onnx for a CPU target. Convolutions with SIMD-block sparse constant weights "
                    "run the ALCS sparse kernel; the report says, per layer, what ran and why.")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--target", default="x86",
                   help="x86 (host features), x86-avx2, x86-avx512, arm64, or a TVM target JSON dict")
    p.add_argument("-o", "--output", required=True, help="output library (.so, or .tar of objects)")
    p.add_argument("--input-shapes", help="e.g. input:1x3x224x224 (needed when the model has dynamic dims)")
    p.add_argument("--vector-width", type=int, help=VECTOR_WIDTH_HELP)
    p.add_argument("--no-sparse", action="store_true", help="run every conv with the dense kernel")
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
    p.set_defaults(func=_cli_compile)


def _cli_compile(args):
    from .run import write_sidecar

    if not os.path.isfile(args.model):
        raise FileNotFoundError(f"no such model file: {args.model}")
    input_shapes = frontend.parse_input_shapes(args.input_shapes) if args.input_shapes else None
    latency_table = None
    if args.latency_table:
        from .latency import LatencyTable

        latency_table = LatencyTable.load(args.latency_table)
        if args.estimate_missing is not None:
            from .latency_regressor import LatencyRegressor

            regressor = LatencyRegressor.fit([latency_table] + [LatencyTable.load(t) for t in args.estimate_missing])
            latency_table.estimate_missing(regressor)
            print(regressor.describe())
    elif args.estimate_missing is not None:
        raise ValueError("--estimate-missing needs --latency-table")
    info = resolve_target(args.target, args.vector_width)
    executable, report = compile(args.model, info, input_shapes=input_shapes, sparse=not args.no_sparse,
                                 density_threshold=args.sparsity_threshold, latency_table=latency_table,
                                 tuning=args.tuning)
    print(report.table())
    export(executable, args.output, info, args.cross_compiler)
    write_sidecar(args.output, report.relax_module, target=info.target)
    report_path = args.report or f"{args.output}.report.json"
    report.write(report_path)
    print(f"wrote {args.output} (+ {os.path.basename(report_path)})")
    return 0
