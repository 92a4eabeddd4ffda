"""Transposed 2-D convs as sub-pixel convs, so they run the ALCS kernel.

A transposed conv with stride ``s`` writes output row ``Y = q*s + r - pad`` from input rows ``q - j`` through
weight row ``j*s + r``. For each output phase ``r`` that is an ordinary stride-1 conv with a ``ceil(k/s)``-tap
kernel, so all ``s*s`` phases together are one conv with ``s*s*Cout`` output channels; interleaving the phases
(depth to space) and cropping the padding gives the transposed conv's output. The output channels are ordered
phase-major, so a kernel tap that does not exist for a phase (``k`` not a multiple of ``s``) is a whole zero
SIMD block, which the sparse kernel skips. A constant bias right after the transposed conv moves onto the conv
(once per phase), where the kernel fuses it.

    y = R.nn.conv2d_transpose(x, W: Constant [Cin, Cout, Kh, Kw], strides=s, padding=p)   # groups 1, dilation 1
    [y = R.add(y, b: Constant [1, Cout, 1, 1])]

becomes::

    z = R.nn.conv2d(x, K: Constant [s*s*Cout, Cin, Jh, Jw], padding=(Jh-1, Jw-1, bottom, right)) [+ tiled b]
    y = crop(depth_to_space(z))        # reshape, permute_dims, reshape, strided_slice
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..frontend import layer_node_name, with_span
from .relax_expr import const_array, dtype, emit_as, is_const, static_shape

__all__ = ["SubpixelConvTranspose", "subpixel_weight"]


def subpixel_weight(weight: np.ndarray, strides) -> np.ndarray:
    """The transposed conv weight ``[Cin, Cout, Kh, Kw]`` as the sub-pixel conv's ``[sh*sw*Cout, Cin, Jh, Jw]``
    (output channel ``(ry*sw + rx)*Cout + o``, tap ``t`` reading input row ``q - (J-1-t)``)."""
    cin, cout, kh, kw = weight.shape
    sh, sw = strides
    jh, jw = -(-kh // sh), -(-kw // sw)
    out = np.zeros((sh, sw, cout, cin, jh, jw), np.float32)
    for ry in range(sh):
        for rx in range(sw):
            for th in range(jh):
                a = (jh - 1 - th) * sh + ry
                if a >= kh:
                    continue
                for tw in range(jw):
                    b = (jw - 1 - tw) * sw + rx
                    if b < kw:
                        out[ry, rx, :, :, th, tw] = weight[:, :, a, b].T
    return out.reshape(sh * sw * cout, cin, jh, jw)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, bias_of, rewritten):
        super().__init__(mod)
        self.bias_of = bias_of  # var of a transposed conv -> (var of its bias add, bias [Cout])
        self.rewritten = rewritten  # names of the ONNX nodes rewritten (from their spans)
        self.replaced = {}  # var of a bias add -> the rewritten output

    def visit_var_binding_(self, binding):
        if binding.var in self.replaced:
            self.set_var_remap(binding.var, self.replaced[binding.var])
            return None
        call = binding.value
        if not _eligible(call):
            return super().visit_var_binding_(binding)
        data = self.visit_expr(call.args[0])
        weight = const_array(call.args[1])
        attrs = call.attrs
        n, _, h, w = static_shape(call.args[0])
        _, cout, kh, kw = weight.shape
        sh, sw = (int(s) for s in attrs.strides)
        top, left, bottom, right = (int(p) for p in attrs.padding)
        oph, opw = (int(p) for p in attrs.output_padding)
        h_out = (h - 1) * sh - top - bottom + kh + oph
        w_out = (w - 1) * sw - left - right + kw + opw
        jh, jw = -(-kh // sh), -(-kw // sw)
        rows, cols = (h_out - 1 + top) // sh + 1, (w_out - 1 + left) // sw + 1  # input rows the crop needs
        pad = (jh - 1, jw - 1, max(0, rows - h), max(0, cols - w))
        conv = relax.op.nn.conv2d(data, relax.const(subpixel_weight(weight, (sh, sw))), padding=pad)
        conv = with_span(conv, call.span)  # the report names the layer after its ONNX node
        z = self.builder_.emit(conv)
        if binding.var in self.bias_of:
            _, bias = self.bias_of[binding.var]
            z = self.builder_.emit(relax.op.add(z, relax.const(np.tile(bias, sh * sw).reshape(1, -1, 1, 1)
                                                               .astype(np.float32))))
        qh, qw = h + pad[2], w + pad[3]
        z = self.builder_.emit(relax.op.reshape(z, (n, sh, sw, cout, qh, qw)))
        z = self.builder_.emit(relax.op.permute_dims(z, (0, 3, 4, 1, 5, 2)))
        z = self.builder_.emit(relax.op.reshape(z, (n, cout, qh * sh, qw * sw)))
        # the var the transposed conv's value ends up in: its bias add's, when that moved onto the conv
        out_var = self.bias_of[binding.var][0] if binding.var in self.bias_of else binding.var
        y = emit_as(self.builder_, relax.op.strided_slice(z, axes=[2, 3], begin=[top, left],
                                                          end=[top + h_out, left + w_out]), out_var)
        name = layer_node_name(call)
        if name:
            self.rewritten.add(name)
        if binding.var in self.bias_of:
            self.replaced[self.bias_of[binding.var][0]] = y
        self.set_var_remap(binding.var, y)
        return None


def _eligible(call) -> bool:
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and
            call.op.name == "relax.nn.conv2d_transpose"):
        return False
    attrs = call.attrs
    shape = static_shape(call.args[0])
    return (is_const(call.args[1]) and dtype(call.args[1]) == "float32" and const_array(call.args[1]).ndim == 4 and
            shape is not None and len(shape) == 4 and int(attrs.groups) == 1 and
            all(int(d) == 1 for d in attrs.dilation) and str(attrs.data_layout) == "NCHW" and
            str(attrs.kernel_layout) == "IOHW" and str(attrs.out_layout or "NCHW") == "NCHW" and
            dtype(call.args[0]) == "float32")


def _bias_adds(func) -> dict:
    """Transposed conv var -> (its single user ``add(y, b)`` with a constant per-channel ``b``, b as [Cout])."""
    bindings = [b for block in func.body.blocks for b in block.bindings]
    users = {}
    for b in bindings:
        for v in relax.analysis.used_vars(b.value):
            users.setdefault(v, []).append(b)
    for v in relax.analysis.used_vars(func.body.body):
        users.setdefault(v, []).append(None)
    found = {}
    for b in bindings:
        if not _eligible(b.value) or len(users.get(b.var, [])) != 1 or users[b.var][0] is None:
            continue
        add = users[b.var][0]
        value = add.value
        if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.add"):
            continue
        other = value.args[1] if value.args[0].same_as(b.var) else value.args[0]
        bias = const_array(other) if is_const(other) else None
        cout = const_array(b.value.args[1]).shape[1]
        if bias is not None and bias.dtype == np.float32 and bias.size == cout and \
                (bias.shape == (1, cout, 1, 1) or bias.shape == (cout, 1, 1)):
            found[b.var] = (add.var, bias.reshape(cout))
    return found


class SubpixelConvTranspose:
    """Rewrites every eligible transposed 2-D conv of a module; :attr:`rewritten` names their ONNX nodes."""

    def __init__(self):
        self.rewritten = set()

    def rewrite(self, mod):
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function):
                continue
            bindings = [b for block in func.body.blocks for b in block.bindings]
            if not any(_eligible(b.value) for b in bindings):
                continue
            rewriter = _Rewriter(mod, _bias_adds(func), self.rewritten)
            new = rewriter.visit_expr(func)
            rewriter.builder_.update_func(gv, new)
            mod = rewriter.builder_.get()
        return mod
