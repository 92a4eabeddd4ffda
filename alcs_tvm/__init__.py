"""alcs_tvm: Architecture-aware Latency-Constrained Sparse CNNs (ALCS, Zhao et al. 2021) for Apache TVM.

Entry points: :func:`compile` (ONNX -> Relax executable + per-layer report), :class:`SparseConvRewrite` (the
Relax pass, composable in ``tvm.transform.Sequential``), :class:`BlockSparseWeight` (the sparse format),
:func:`build_sparse_conv2d` (one layer on its own) and :class:`ADMMPruner` (the latency-constrained pruner, torch
only); the command line is :mod:`alcs_tvm.cli`.
"""
import importlib

__version__ = "0.1.0"

# name -> module. Loaded on first use, so that ``import alcs_tvm.pruning`` (torch only) does not pull in TVM.
_EXPORTS = {
    "compile": "compiler", "export": "compiler", "SparseConvRewrite": "passes", "build_sparse_conv2d": "kernels",
    "BlockSparseWeight": "sparse_format", "TargetInfo": "target", "resolve_target": "target",
    "ADMMPruner": "pruning",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'alcs_tvm' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
