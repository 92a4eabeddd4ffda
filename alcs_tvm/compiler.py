"""ONNX -> deployable Relax library: import, the sparse rewrite, dense schedules, build, export; and the
rewritable conv layers of a model as the pass sees them (:func:`model_layers`), which every measuring tool uses.

The build sequence (also the one to copy when composing the pass into your own pipeline)::

    mod = frontend.import_onnx(model, input_shapes)        # parameters become constants
    mod = frontend.prepare_for_sparse(mod)                 # BN folded, conv -> add(bias) -> relu/clip
    SparseConvRewrite(target)                              # before legalisation: it matches R.nn.conv2d
    dense_build_passes(target)                             # legalise, fuse, hand-written CPU schedules
    tvm.compile(mod, target)                               # Relax VM executable
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import tvm

from . import frontend
from .layer import Conv2dSpec, KernelLayout, layer_key
from .passes.sparse_conv import SparseConvRewrite
from .schedules.dense_cpu import dense_build_passes
from .target import TargetInfo, resolve_target
from .toolchain import cross_compile_function
from .tuning_records import TuningRecords

__all__ = ["compile", "compile_module", "export", "conv_node_names", "ModelLayer", "model_layers"]


def conv_node_names(model) -> list:
    """The names of the ONNX model's Conv nodes in graph order, as the compile report names them
    (:func:`alcs_tvm.frontend.node_names`). Dead convs and 1-D / 3-D ones are among them: the report's rows are
    named from the node each conv came from, not by position in this list."""
    return [name for node, name in zip(model.graph.node, frontend.node_names(model)) if node.op_type == "Conv"]


def compile_module(mod, target="x86", *, vector_width=None, sparse=True, density_threshold=None,
                   latency_table=None, layer_names=None, tuning=None, winograd="auto"):
    """Compile an already imported and prepared Relax module. Returns ``(executable, report, lowered_mod)``.
    ``tuning``: :class:`~alcs_tvm.tuning_records.TuningRecords` (or their path) from ``alcs tune``."""
    info = resolve_target(target, vector_width)
    if latency_table is not None:  # a table measured on another target or TVM would pick layers wrongly
        latency_table.check_compatible(info, tvm.__version__)
    if tuning is not None and not isinstance(tuning, TuningRecords):
        tuning = TuningRecords.load(tuning)
    if tuning is not None:  # records measured for another target or TVM would pick schedules wrongly
        tuning.check_compatible(info, tvm.__version__)
    rewrite = SparseConvRewrite(info, sparse=sparse,
                                density_threshold=density_threshold, latency_table=latency_table,
                                layer_names=layer_names, tuning=tuning, winograd=winograd)
    with info.target:
        # the rewrite runs as a plain call, so a bad input (a layer missing from the table, say) surfaces as the
        # error it is rather than wrapped by TVM's pass infrastructure
        rewritten = rewrite.rewrite(mod)
        lowered = tvm.transform.Sequential(dense_build_passes(info))(rewritten)
    executable = tvm.compile(lowered, target=info.target)
    return executable, rewrite.report, lowered


def compile(model, target="x86", *, input_shapes=None, vector_width=None, sparse=True,  # noqa: A001
            density_threshold=None, latency_table=None, tuning=None, winograd="auto", verbose=False):
    """Compile an ONNX model (path, bytes or ModelProto) for ``target``. Returns ``(executable, report)``.

    ``winograd``: ``"auto"`` (per layer, by estimate), ``"off"`` or a tile size (see :class:`SparseConvRewrite`).
    ``executable.export_library(path)`` writes the deployable library (see :func:`export`, which also
    cross-compiles for ``arm64``)."""
    started = time.perf_counter()
    onnx_model = frontend.load_onnx(model)
    mod = frontend.prepare_for_sparse(frontend.import_onnx(onnx_model, input_shapes))
    executable, report, _ = compile_module(mod, target, vector_width=vector_width, sparse=sparse,
                                           density_threshold=density_threshold, latency_table=latency_table,
                                           tuning=tuning, winograd=winograd)
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
    fcompile = cross_compile_function(cross_compiler) if cross_compiler or info.is_cross else None
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1] or '.so'}"
    try:
        executable.export_library(tmp, fcompile=fcompile) if fcompile else executable.export_library(tmp)
        os.replace(tmp, path)
    except BaseException:  # a failed or interrupted link leaves no partial library behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


@dataclass(frozen=True)
class ModelLayer:
    """A rewritable conv of a model, as the Relax pass sees it: what a latency table or a tuning record measures."""

    name: str  # ONNX node name (frontend.node_names)
    spec: Conv2dSpec
    vector_width: int  # the layer's group width
    density: float  # block density of the model's weight
    layout: KernelLayout  # how its kernel is called in the model: fused epilogue, chained layouts

    @property
    def key(self) -> str:
        return layer_key(self.spec, self.vector_width)


def model_layers(model, target="x86", *, input_shapes=None, vector_width=None, return_module=False):
    """The rewritable convs of an ONNX model (path, bytes or ModelProto), in graph order, mapped exactly as the
    Relax pass maps them (the pass itself runs, with ``sparse=False``). With ``return_module``: ``(layers,
    target_info, onnx_model, prepared_relax_module)``."""
    info = resolve_target(target, vector_width)
    onnx_model = frontend.load_onnx(model)
    mod = frontend.prepare_for_sparse(frontend.import_onnx(onnx_model, input_shapes))
    rewrite = SparseConvRewrite(info, sparse=False)
    rewrite.rewrite(mod)
    # depthwise/grouped convs and linear layers are part of the "rest of the model"
    layers = [ModelLayer(d.name, d.spec, int(d.vector_width), float(d.density), d.kernel)
              for d in rewrite.report.layers if d.op == "conv2d" and d.spec is not None]
    if return_module:
        return layers, info, onnx_model, mod
    return layers
