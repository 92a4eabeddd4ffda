"""Relax passes: the ALCS sparse convolution rewrite."""
from .sparse_conv import DEFAULT_DENSITY_THRESHOLD, SparseConvRewrite

__all__ = ["SparseConvRewrite", "DEFAULT_DENSITY_THRESHOLD"]
