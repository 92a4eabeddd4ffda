"""alcs_tvm: Architecture-aware Latency-Constrained Sparse CNNs (ALCS, Zhao et al. 2021) for Apache TVM.

Entry points: :func:`compile` (ONNX -> Relax executable + per-layer report), :class:`SparseConvRewrite` (the
Relax pass, composable in ``tvm.transform.Sequential``), :class:`BlockSparseWeight` (the sparse format) and
:func:`build_sparse_conv2d` (one layer on its own).
"""
from .compiler import compile, export  # noqa: A004 - the package's main verb, as in tvm.compile
from .operator import build_sparse_conv2d
from .passes import SparseConvRewrite
from .sparse_format import BlockSparseWeight
from .target import TargetInfo, resolve_target

__version__ = "0.1.0"
__all__ = ["compile", "export", "SparseConvRewrite", "BlockSparseWeight", "build_sparse_conv2d", "TargetInfo",
           "resolve_target"]
