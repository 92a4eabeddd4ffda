"""Reading Relax expressions the passes match: constants, static shapes, dtypes."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

__all__ = ["is_const", "const_array", "const_scalar", "scalar_value", "static_shape", "dtype", "emit_as"]


def is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.expr.GenericConst)


def const_array(expr) -> np.ndarray:
    return expr.value.numpy()


def const_scalar(expr):
    if is_const(expr) and const_array(expr).size == 1:
        return float(const_array(expr).reshape(()))
    return None


def scalar_value(expr):
    """A scalar constant or PrimValue (``R.clip`` bounds) as float, else None."""
    if is_const(expr):
        return const_scalar(expr)
    value = getattr(expr, "value", None)
    value = getattr(value, "value", value)  # PrimValue -> FloatImm -> float
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def static_shape(expr):
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None or not isinstance(shape, relax.ShapeExpr):
        return None
    try:
        return tuple(int(d) for d in shape.values)
    except (TypeError, ValueError):
        return None


def dtype(expr) -> str:
    return str(getattr(getattr(expr, "ty", None), "dtype", ""))


def emit_as(builder, expr, var):
    """Emit ``expr`` as the new binding of ``var``: a dataflow var inside the block, or (a function output) an
    output of the dataflow block, which a plain ``emit`` would leave undefined outside it."""
    if isinstance(var, relax.DataflowVar):
        return builder.emit(expr, name_hint=var.name)
    return builder.emit_output(expr, name_hint=var.name)
