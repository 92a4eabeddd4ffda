"""alcs_tvm: Architecture-aware Latency-Constrained Sparse CNNs (ALCS, Zhao et al. 2021) for Apache TVM."""
from .sparse_format import BlockSparseWeight
from .target import TargetInfo, resolve_target

__version__ = "0.1.0"
__all__ = ["BlockSparseWeight", "TargetInfo", "resolve_target"]
