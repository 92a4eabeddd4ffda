"""The epilogue a conv (or linear) kernel fuses, written once as Relax dataflow patterns (:mod:`tvm.relax.dpl`).

After a conv's output ``y`` the kernel fuses, in this order, each optional:

* a constant float32 bias ``y + b`` (``b`` of shape ``[1, C, 1, 1]`` or ``[C, 1, 1]``; ``[C]`` or ``[1, C]`` after a
  linear layer),
* a residual ``y + shortcut`` (a conv only; ``shortcut`` a float32 var of the conv's output shape), fused into
  the first conv that reaches the add,
* one activation of :data:`ACTIVATIONS`.

Each pattern is a function of the pattern pinning ``y`` (``is_expr(y)``): a shared ``wildcard()`` would not do,
since dpl matches ``add`` and ``multiply`` either way round and keeps the first order that matches, so in
``add(shortcut, y)`` the wildcard would take the shortcut. Patterns are matched at a candidate end of the chain
with ``var2val`` holding only the chain's candidate bindings, so ``y`` and every var outside the chain (a
shortcut) stay vars and match as themselves.

:func:`match_epilogue` adds, in Python, what a dpl pattern does not say:

* every value fused away has exactly one reader, the next op of the chain, and is not a function output
  (``DFPattern.match`` with ``var2val`` looks through bindings without asking who else reads them; the
  ``used_by``/``only_used_by`` edges of :class:`~tvm.relax.dpl.PatternContext` match a whole dataflow block, not
  the chain from one given var);
* the constants' values: a ``ConstantPattern`` matches any constant, and ``is_expr(relax.const(6.0))`` compares
  dtype and shape structurally, while the importers write these scalars in whatever shape and dtype they like.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import CallPattern, is_const, is_expr, is_op, wildcard

from .relax_expr import const_array, const_scalar, dtype, is_const as is_const_expr, scalar_value, static_shape

__all__ = ["ACTIVATIONS", "BindingGraph", "Epilogue", "match_epilogue"]


def _op(name, *args):
    # no PatternContext edges: these patterns are matched one expression at a time, not over a dataflow block
    return is_op(f"relax.{name}")(*args, add_constraint=False)


def _near(value, target, tol):
    return value is not None and abs(value - target) <= tol


def _bounds(call):
    return [scalar_value(a) for a in call.args[1:3]]


# -- the activations: each builds its pattern from y's into a dict of named parts ("out": the whole pattern) ----
def _hardsigmoid(y):
    """``clip(y * 1/6 + 0.5, 0, 1)``."""
    p = {"sixth": is_const(), "half": is_const()}
    p["out"] = p["clip"] = _op("clip", _op("add", _op("multiply", y, p["sixth"]), p["half"]), wildcard(), wildcard())
    return p


def _hardsigmoid_ok(m):
    return _near(const_scalar(m["sixth"]), 1 / 6, 1e-6) and const_scalar(m["half"]) == 0.5 and \
        _bounds(m["clip"]) == [0.0, 1.0]


def _hardswish_gate(y):
    """``y * hardsigmoid(y)``: TVM's import of ONNX HardSwish."""
    p = _hardsigmoid(y)
    p["out"] = _op("multiply", y, p["clip"])
    return p


def _hardswish_scaled(y):
    """``y * (clip(y + 3, 0, 6) / 6)`` or ``y * (clip(y + 3, 0, 6) * 1/6)``."""
    p = {"three": is_const(), "six": is_const(), "sixth": is_const()}
    p["clip"] = _op("clip", _op("add", y, p["three"]), wildcard(), wildcard())
    p["out"] = _op("multiply", y, _op("divide", p["clip"], p["six"]) | _op("multiply", p["clip"], p["sixth"]))
    return p


def _hardswish_scaled_ok(m):
    if const_scalar(m["three"]) != 3.0 or _bounds(m["clip"]) != [0.0, 6.0]:
        return False
    return const_scalar(m["six"]) == 6.0 if "six" in m else _near(const_scalar(m["sixth"]), 1 / 6, 1e-6)


def _clip(y):
    return {"out": _op("clip", y, wildcard(), wildcard())}


def _clip_name(m):
    """clip(y, 0, 6) is relu6, clip(y, 0, +inf) relu."""
    lo, hi = _bounds(m["out"])
    return "relu6" if (lo, hi) == (0, 6) else "relu" if lo == 0 and hi is not None and hi >= 3.4e38 else None


def _max0(y):
    p = {"zero": is_const()}
    p["out"] = _op("maximum", y, p["zero"])
    return p


def _max0_min6(y):
    p = _max0(y)
    p["six"] = is_const()
    p["out"] = _op("minimum", p["out"], p["six"])
    return p


def _prelu(y):
    """Constant float32 slopes per channel (axis 1), or one for all."""
    p = {"slope": is_const().has_dtype("float32")}
    p["out"] = _op("nn.prelu", y, p["slope"])
    return p


#: every activation the kernel fuses: (name, the op its output is, pattern builder, check of the matched parts ->
#: True, a name overriding ``name``, or False). An activation may end at a reader of y or up to two single readers
#: further; :func:`_activation` tries the deeper end first, so relu6 as minimum(maximum(y, 0), 6) wins over relu
#: as its maximum(y, 0).
ACTIVATIONS = [
    ("silu", "multiply", lambda y: {"out": _op("multiply", y, _op("sigmoid", y))}, None),  # as exporters write it
    ("hardswish", "multiply", _hardswish_gate, _hardsigmoid_ok),
    ("hardswish", "multiply", _hardswish_scaled, _hardswish_scaled_ok),
    ("hardsigmoid", "clip", _hardsigmoid, _hardsigmoid_ok),  # torch's Hardsigmoid as ONNX HardSigmoid
    ("sigmoid", "sigmoid", lambda y: {"out": _op("sigmoid", y)}, None),
    ("relu", "nn.relu", lambda y: {"out": _op("nn.relu", y)}, None),
    (None, "clip", _clip, _clip_name),
    ("relu6", "minimum", _max0_min6, lambda m: const_scalar(m["zero"]) == 0.0 and const_scalar(m["six"]) == 6.0),
    ("relu", "maximum", _max0, lambda m: const_scalar(m["zero"]) == 0.0),
    ("prelu", "nn.prelu", _prelu, lambda m: int(m["out"].attrs.axis) == 1 or const_array(m["slope"]).size == 1),
    ("prelu", "nn.leakyrelu", lambda y: {"out": _op("nn.leakyrelu", y)}, None),  # one slope: its alpha
]

_BY_ROOT = {}  # the activations by the op that ends them: a candidate end is matched only against those
for _entry in ACTIVATIONS:
    _BY_ROOT.setdefault(f"relax.{_entry[1]}", []).append(_entry)


class Epilogue:
    """What a conv's (or linear layer's) kernel folds in after it: ``bias`` (float32 [Cout]), ``residual`` (the
    shortcut var) and ``residual_binding`` (the add's var), ``activation`` with ``slope`` (PReLU's per-channel
    slopes, float32 [Cout]), the vars folded into the call (``fused_vars``) and the var the call now binds
    (``last_var``)."""

    def __init__(self, conv_var):
        self.bias = self.residual = self.residual_binding = self.activation = self.slope = None
        self.fused_vars = []
        self.last_var = conv_var

    def extend(self, var, inner=()):
        """The chain now ends at ``var``; the old end and ``inner`` are folded into the call."""
        self.fused_vars += [self.last_var] + list(inner)
        self.last_var = var


class BindingGraph:
    """A function's bindings (var -> value, in binding order), who reads each var (var -> reading binding vars,
    None for a function output), and each value's var."""

    def __init__(self, value_of, users):
        self.value_of = value_of
        self.users = users
        self.var_of = {value: var for var, value in value_of.items()}
        self.order = {var: i for i, var in enumerate(value_of)}

    def single_user(self, var):
        uses = self.users.get(var, [])
        return uses[0] if len(uses) == 1 and uses[0] is not None else None

    def match(self, build, y, end, chain):
        """dpl's match of the pattern ``build`` makes for ``y`` at ``end``, through the bindings of ``chain``
        only: ``(named parts -> matched expr, every call pattern's matched value)``, else None."""
        parts = build(is_expr(y))
        matched = parts["out"].extract_matched_expr(end, {v: self.value_of[v] for v in chain})
        if matched is None:
            return None
        calls = [value for p, value in matched.items() if isinstance(p, CallPattern)]
        return {k: matched[p] for k, p in parts.items() if p in matched}, calls


def _chain_inner(graph, calls, y, end):
    """The vars of the matched ``calls`` between ``y`` and ``end`` in binding order, when ``y``'s readers are
    exactly the calls reading it and every call in between has exactly one reader (the next op), else None."""
    ops = {graph.var_of.get(value) for value in calls}
    if None in ops:
        return None
    readers = [v for v in ops if any(a.same_as(y) for a in graph.value_of[v].args)]
    uses = graph.users.get(y, [])
    if len(uses) != len(readers) or any(u is None or u not in readers for u in uses):
        return None
    inner = sorted(ops - {end}, key=graph.order.__getitem__)
    return inner if all(graph.single_user(v) is not None for v in inner) else None


def _activation(graph, y):
    """``(name, inner vars, output var)`` of the activation reading ``y``, else None."""
    if None in graph.users.get(y, []):
        return None
    ends = []
    for u in graph.users.get(y, []):
        chain = [u]
        while len(chain) < 3 and graph.single_user(chain[-1]) is not None:
            chain.append(graph.single_user(chain[-1]))
        ends += chain[::-1]
    for end in ends:
        value = graph.value_of.get(end)
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            continue
        for name, _, build, check in _BY_ROOT.get(value.op.name, []):
            found = graph.match(build, y, end, ends)
            inner = None if found is None else _chain_inner(graph, found[1], y, end)
            verdict = inner is not None and (check is None or check(found[0]))
            if verdict:
                return (verdict if isinstance(verdict, str) else name), inner, end
    return None


def _add_at_reader(graph, y, other):
    """``(add var, named parts)`` when ``y``'s only reader is ``add(y, other)``, else None."""
    user = graph.single_user(y)
    found = None if user is None else graph.match(lambda p: {"other": other, "out": _op("add", p, other)}, y, user,
                                                  [user])
    return None if found is None else (user, found[0])


def _bias(graph, y, conv_call):
    """The bias of ``add(y, b: float32 constant)`` at ``y``'s only reader, float32 [Cout], else None."""
    found = _add_at_reader(graph, y, is_const().has_dtype("float32"))
    out_shape = static_shape(conv_call)
    if found is None or out_shape is None:
        return None
    cout = out_shape[1]
    data = const_array(found[1]["other"])
    allowed = ((1, cout, 1, 1), (cout, 1, 1)) if len(out_shape) == 4 else ((cout,), (1, cout))
    return np.ascontiguousarray(data.reshape(cout), np.float32) if data.shape in allowed else None


def _residual(graph, y, conv_call):
    """``(add var, shortcut var)`` of ``add(y, shortcut)`` at ``y``'s only reader: a non-constant float32 var of
    the conv's output shape, else None."""
    found = _add_at_reader(graph, y, wildcard())
    other = None if found is None else found[1]["other"]
    if other is None or other.same_as(y) or is_const_expr(other) or not isinstance(other, relax.Var) or \
            dtype(other) != "float32" or static_shape(other) is None or static_shape(other) != static_shape(conv_call):
        return None
    return found[0], other


def match_epilogue(conv_var, conv_call, kind, graph, claimed_adds) -> Epilogue:
    """The epilogue fused after ``conv_var = conv_call`` (``kind`` "conv2d", any groups, or "linear") in the
    function ``graph`` describes. A residual add already in ``claimed_adds`` (add var -> conv var) belongs to
    another conv; a new one is claimed for ``conv_var``."""
    epi = Epilogue(conv_var)
    bias = _bias(graph, epi.last_var, conv_call)
    if bias is not None:
        epi.bias = bias
        epi.extend(graph.single_user(epi.last_var))
    residual = _residual(graph, epi.last_var, conv_call) if kind == "conv2d" else None
    if residual is not None and residual[0] not in claimed_adds:
        claimed_adds[residual[0]] = conv_var
        epi.residual_binding, epi.residual = residual
        epi.extend(residual[0])
    found = _activation(graph, epi.last_var)
    if found is None:
        return epi
    name, inner, end = found
    if name == "prelu":
        call = graph.value_of[end]
        slope = np.array([float(call.attrs.alpha)], np.float32) if call.op.name == "relax.nn.leakyrelu" \
            else const_array(call.args[1]).reshape(-1)
        out_shape = static_shape(conv_call)
        if kind != "conv2d" or int(conv_call.attrs.groups) != 1 and static_shape(conv_call.args[1])[1] == 1 or \
                out_shape is None or slope.size not in (1, out_shape[1]):
            return epi  # the depthwise kernel takes no slopes
        epi.slope = np.ascontiguousarray(np.broadcast_to(slope, (out_shape[1],)), np.float32)
    epi.activation = name
    epi.extend(end, inner)
    return epi
