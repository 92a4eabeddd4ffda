"""Channel shuffles folded into the conv that reads them (ShuffleNet's ``Reshape -> Transpose -> Reshape``).

A channel shuffle of ``g`` groups, ``x [N, C, H, W] -> [N, g, C/g, H, W] -> transpose(0, 2, 1, 3, 4) -> [N, C, H,
W]``, is the channel permutation ``y[:, j] = x[:, perm[j]]`` with ``perm[j] = (j % g) * (C / g) + j // g``. Run as
a transpose it is a pass over the whole tensor between two convs, in NCHW, which breaks the convs' channel-blocked
chain. Folded it costs nothing:

* a depthwise conv (and any op that acts per channel: an activation, a per-channel BatchNormalization) commutes
  with it: ``dw(P x) = P dw'(x)`` with ``dw'``'s weight and bias permuted, so the shuffle moves past it;
* a conv reading it reads ``x`` with its weight's input channels permuted: ``conv(P x) = conv'(x)``. A grouped
  conv first becomes the conv over all input channels whose weight is zero outside each group (how the sparse
  rewrite runs grouped convs anyway); its permuted weight is then a ``groups == 1`` weight whose zeros are whole
  SIMD blocks, which the sparse kernel skips, the pruner can prune further and the latency table can profile.

A shuffle whose path reaches anything else (an add, a concat, an output) stays as it is.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .sparse_format import block_diagonal

__all__ = ["fold_channel_shuffles", "shuffle_permutation"]

#: the transpose of a channel shuffle: ``[N, g, C/g, H, W] -> [N, C/g, g, H, W]``
_SHUFFLE_PERM = [0, 2, 1, 3, 4]

#: ops that act on each channel alone with no parameters: a channel permutation passes through them unchanged
_PER_CHANNEL_OPS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Elu", "Selu", "Tanh",
                    "Softplus", "Identity"}


def shuffle_permutation(channels: int, groups: int) -> np.ndarray:
    """``perm`` with ``shuffled[:, j] = x[:, perm[j]]`` for a channel shuffle of ``groups`` groups."""
    j = np.arange(channels)
    return (j % groups) * (channels // groups) + j // groups


def fold_channel_shuffles(model: onnx.ModelProto, known_shapes) -> onnx.ModelProto:
    """``model`` with every channel shuffle that reaches a conv folded into it (see the module docstring);
    ``known_shapes(model)``: ``{tensor: dims}`` with static shapes (ONNX shape inference's), called only for a
    model with a shuffle's transpose (shape inference copies every weight). ``model`` itself when it has none."""
    if not any(node.op_type == "Transpose" and list(_attr(node, "perm", [])) == _SHUFFLE_PERM
               for node in model.graph.node):
        return model
    shapes = known_shapes(model)
    if _next_foldable(model, shapes) is None:
        return model
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    while (found := _next_foldable(folded, shapes)) is not None:
        _fold(folded, *found)
    return folded


def _attr(node, name, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _next_foldable(model, shapes):
    """``(shuffle nodes, x, perm, per-channel path, conv)`` of the first shuffle that reaches a conv, else None."""
    graph = model.graph
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output}
    inits = {init.name for init in graph.initializer}

    def only_consumer(name):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in outputs else None

    for first in graph.node:
        if first.op_type != "Reshape":
            continue
        x, in_shape, mid_shape = first.input[0], shapes.get(first.input[0]), shapes.get(first.output[0])
        transpose = only_consumer(first.output[0])
        if transpose is None or transpose.op_type != "Transpose" or list(_attr(transpose, "perm", [])) != \
                _SHUFFLE_PERM:
            continue
        last = only_consumer(transpose.output[0])
        if last is None or last.op_type != "Reshape" or not in_shape or not mid_shape or None in in_shape or \
                None in mid_shape or len(in_shape) != 4 or len(mid_shape) != 5:
            continue
        n, c, h, w = in_shape
        groups = mid_shape[1]
        if list(mid_shape) != [n, groups, c // groups, h, w] or c % groups or shapes.get(last.output[0]) != \
                list(in_shape):
            continue
        perm = shuffle_permutation(c, groups)
        path, current = [], last.output[0]
        while True:
            node = only_consumer(current)
            if node is None:
                break
            if node.op_type in _PER_CHANNEL_OPS and node.input[0] == current and \
                    all(name in inits or not name for name in node.input[1:]):
                path.append(node)
            elif node.op_type == "BatchNormalization" and node.input[0] == current and \
                    all(name in inits for name in node.input[1:5]) and len(node.output) == 1:
                path.append(node)
            elif node.op_type == "Conv" and node.input[0] == current and _constant_conv(node, inits):
                if _attr(node, "group", 1) == c and shapes.get(node.input[1], [0, 0])[:2] == [c, 1]:
                    path.append(node)  # depthwise: the shuffle moves past it
                else:
                    return (first, transpose, last), x, perm, path, node
            else:
                break
            current = node.output[0]
    return None


def _constant_conv(node, inits) -> bool:
    return len(node.input) >= 2 and node.input[1] in inits and all(name in inits for name in node.input[2:] if name)


def _fold(model, shuffle, x, perm, path, conv):
    """Rewire ``x -> path -> conv`` without the shuffle: each per-channel node's parameters and the conv's
    weight permuted as the module docstring says."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    inverse = np.argsort(perm)  # x's channel i is the shuffle's output channel inverse[i]

    def replace(node, index, value):
        """``node``'s input ``index`` := ``value``, in a new initializer when another node reads the old one."""
        name = node.input[index]
        if readers.get(name, 0) > 1:
            name = f"{name}__unshuffled_{node.name or node.output[0]}"
            node.input[index] = name
            graph.initializer.append(numpy_helper.from_array(value, name))
        else:
            inits[name].CopyFrom(numpy_helper.from_array(value, name))

    for node in path:  # per-channel parameters indexed by the shuffled channel: reindexed by x's
        if node.op_type == "BatchNormalization":
            for index in range(1, 5):
                replace(node, index, numpy_helper.to_array(inits[node.input[index]])[inverse])
        elif node.op_type == "Conv":
            replace(node, 1, numpy_helper.to_array(inits[node.input[1]])[inverse])
            if len(node.input) > 2 and node.input[2]:
                replace(node, 2, numpy_helper.to_array(inits[node.input[2]])[inverse])
    weight = numpy_helper.to_array(inits[conv.input[1]])
    groups = _attr(conv, "group", 1)
    if groups != 1:
        weight = block_diagonal(weight, groups)
        for attribute in conv.attribute:
            if attribute.name == "group":
                attribute.i = 1
    replace(conv, 1, np.ascontiguousarray(weight[:, inverse]))
    source = (path[0] if path else conv)
    source.input[0] = x
    for node in shuffle:
        graph.node.remove(node)

