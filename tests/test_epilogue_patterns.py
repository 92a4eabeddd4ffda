"""The conv epilogue's dpl patterns (alcs_tvm.passes.epilogue_patterns) on hand-built Relax chains: what fuses, in
either operand order, and what must not (an intermediate read elsewhere, a constant off, a function output, an
operand order that is another function)."""
import numpy as np
import pytest
from tvm import relax
from tvm.relax import op as O

from alcs_tvm.passes.sparse_conv import SparseConvRewrite

C = 8
RNG = np.random.default_rng(0)


def _c(value, shape=()):
    return relax.const(np.full(shape, value, np.float32))


def _conv(bb, x, groups=1):
    weight = relax.const(RNG.standard_normal((C, C // groups, 3, 3)).astype(np.float32))
    return bb.emit(O.nn.conv2d(x, weight, padding=1, groups=groups))


def _hardsigmoid(bb, y, half=0.5):
    return bb.emit(O.clip(bb.emit(O.add(bb.emit(O.multiply(y, _c(1 / 6))), _c(half))), 0.0, 1.0))


def _hardswish(bb, y, divide):
    clipped = bb.emit(O.clip(bb.emit(O.add(_c(3.0), y)), 0, 6))
    return bb.emit(O.multiply(y, bb.emit(O.divide(clipped, _c(6.0)) if divide else O.divide(_c(6.0), clipped))))


CASES = {  # name -> (graph, (activation, vars folded into the call, bias?, residual?) of the first conv)
    "bias_relu": (lambda bb, x: bb.emit(O.nn.relu(bb.emit(O.add(_conv(bb, x), _c(0.1, (1, C, 1, 1)))))),
                  ("relu", 2, True, False)),
    "shortcut_left_relu6": (lambda bb, x: bb.emit(O.clip(bb.emit(O.add(x, _conv(bb, x))), 0, 6)),
                            ("relu6", 2, False, True)),
    "max_min": (lambda bb, x: bb.emit(O.minimum(bb.emit(O.maximum(_conv(bb, x), _c(0.0))), _c(6.0))),
                ("relu6", 2, False, False)),
    "max_min5": (lambda bb, x: bb.emit(O.minimum(bb.emit(O.maximum(_conv(bb, x), _c(0.0))), _c(5.0))),
                 ("relu", 1, False, False)),
    "silu_either_order": (lambda bb, x: (lambda y: bb.emit(O.multiply(bb.emit(O.sigmoid(y)), y)))(_conv(bb, x)),
                          ("silu", 2, False, False)),
    "hardswish_gate": (lambda bb, x: (lambda y: bb.emit(O.multiply(_hardsigmoid(bb, y), y)))(_conv(bb, x)),
                       ("hardswish", 4, False, False)),
    "hardswish_divide": (lambda bb, x: _hardswish(bb, _conv(bb, x), True), ("hardswish", 4, False, False)),
    "six_over_clip": (lambda bb, x: _hardswish(bb, _conv(bb, x), False), (None, 0, False, False)),
    "hardsigmoid": (lambda bb, x: _hardsigmoid(bb, _conv(bb, x)), ("hardsigmoid", 3, False, False)),
    "hardsigmoid_off": (lambda bb, x: _hardsigmoid(bb, _conv(bb, x), half=0.25), (None, 0, False, False)),
    "silu_sigmoid_read_twice": (lambda bb, x: (lambda y, s: bb.emit(O.add(bb.emit(O.multiply(y, s)), s)))(
        *(lambda y: (y, bb.emit(O.sigmoid(y))))(_conv(bb, x))), (None, 0, False, False)),
    "prelu_per_channel": (lambda bb, x: bb.emit(O.nn.prelu(_conv(bb, x), _c(0.2, (C,)))), ("prelu", 1, False, False)),
    "leaky_depthwise": (lambda bb, x: bb.emit(O.nn.leakyrelu(_conv(bb, x, groups=C), 0.1)), (None, 0, False, False)),
    "conv_is_output": (lambda bb, x: (lambda y: bb.emit(relax.Tuple([bb.emit(O.nn.relu(y)), y])))(_conv(bb, x)),
                       (None, 0, False, False)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_epilogue(name):
    build, (activation, folded, bias, residual) = CASES[name]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, C, 4, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(build(bb, x))
        bb.emit_func_output(out)
    layer = SparseConvRewrite()._match(bb.get()["main"])[0]
    assert (layer.activation, len(layer.fused_vars), layer.bias is not None, layer.residual is not None) == \
        (activation, folded, bias, residual)
    if activation == "prelu":
        np.testing.assert_allclose(layer.slope, np.full(C, 0.2, np.float32))
