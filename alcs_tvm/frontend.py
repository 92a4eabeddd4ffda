"""ONNX import for the ALCS compiler, and the canonical Relax form the sparse rewrite pass is written against.

Entry points
------------
``load_onnx(path_or_model, check=True) -> onnx.ModelProto``
    Reads and checks an ONNX file (or bytes, or a ModelProto); a non-ONNX or malformed file is a one-line
    ``ValueError``. Graph outputs declared without a shape (ONNX Runtime runs them) get the shape ONNX shape
    inference finds.
``parse_input_shapes("input:1x3x224x224,other:1x10") -> {"input": (1, 3, 224, 224), "other": (1, 10)}``
``import_onnx(model, input_shapes=None, dtype="float32", check=True) -> tvm.IRModule``
    Static input shapes come from the model, or from ``input_shapes`` (user-named inputs must exist; every
    dynamic dimension must be given). Every op is checked against TVM's ONNX converter map before converting;
    unsupported ops, and any other conversion failure, are one-line ``ValueError`` naming op type and node.
    Parameters (ONNX initializers) are imported as Relax constants (``keep_params_in_input=False``), so the
    returned module's ``main`` only takes the real inputs. With the input shapes static, ONNX Runtime's basic
    graph optimisations fold every shape computation and constant subgraph first and drop inference no-ops
    (Identity, Dropout); a ``Sum`` becomes ``Add`` nodes (so a residual Sum fuses into the conv before it); a
    channel shuffle that reaches a conv is folded into its weight (:mod:`alcs_tvm.shuffle_folding`); conv
    node names and the graph order are kept. A ConvTranspose's ``output_shape``
    (which TVM's importer ignores) becomes the pads it implies, or a one-line ``ValueError`` when no pads give it.
``prepare_for_sparse(mod, params=None) -> tvm.IRModule``
    Canonicalisation before the SIMD-block sparse rewrite (no legalisation yet): binds parameters (``params``, or
    the ``"params"`` attribute ``from_onnx(keep_params_in_input=True)`` leaves), folds constants, folds eval-mode BatchNorm into the preceding conv, decomposes
    the remaining composite ops for inference, turns the ONNX importer's Clip lowering (two ``call_tir``s of
    ``maximum`` / ``minimum``) back into ``R.clip``, and removes dead code.

The Relax graph after ``prepare_for_sparse``
--------------------------------------------
Every live 2-D ONNX ``Conv`` becomes one ``R.nn.conv2d`` (NCHW / OIHW, ``groups`` as in ONNX: depthwise convs
have ``groups == Cin``) whose span's source name is the ONNX node's name (:func:`layer_node_name`; 1-D, 3-D and
transposed convs carry theirs too; unnamed nodes are named by :func:`node_names`) and whose weight is an inline
**constant** ``[Cout, Cin/groups, Kh, Kw]`` (a ``tvm.ir.GenericConst`` in TVM 0.27; its ``.value`` is a
``tvm.runtime.Tensor``). If the conv has a bias (it always has after BatchNorm
folding; torch's exporter already folds eval BN into ``Conv(W, b)``, and ``prepare_for_sparse`` folds any
remaining ``conv2d [+ add] -> batch_norm``), the bias is the conv's only consumer: ``R.add(conv, b)`` with ``b``
an inline constant of shape ``[1, Cout, 1, 1]`` (the importer's ``R.reshape`` of the 1-D ONNX bias is folded
away). The activation, if any, follows the bias add directly: ``R.nn.relu`` (ONNX Relu) or
``R.clip(x, T.float64(0.0), T.float64(6.0))`` (ONNX Clip, i.e. torch ReLU6; the bounds are ``PrimValue``s).
Residual adds are ``R.add`` of two non-constant tensors placed after the bias add (and, in ResNet, before the
relu). Excerpts of ``mod["main"].script(show_meta=False)``, ResNet-18 stem and tail::

    lv: R.Tensor((1, 64, 112, 112), dtype="float32") = R.nn.conv2d(input, metadata["ir.GenericConst"][0],
        strides=[2, 2], padding=[3, 3, 3, 3], dilation=[1, 1], groups=1, data_layout="NCHW",
        kernel_layout="OIHW", out_layout="NCHW", out_dtype=None)
    lv2: R.Tensor((1, 64, 112, 112), dtype="float32") = R.add(lv, metadata["ir.GenericConst"][1])
    lv3: R.Tensor((1, 64, 112, 112), dtype="float32") = R.nn.relu(lv2)
    lv4: R.Tensor((1, 64, 56, 56), dtype="float32") = R.nn.max_pool2d(lv3, pool_size=[3, 3], strides=[2, 2], ...)
    ...
    lv81: R.Tensor((1, 512, 7, 7), dtype="float32") = R.nn.conv2d(lv80, metadata["ir.GenericConst"][38], ...)
    lv83: R.Tensor((1, 512, 7, 7), dtype="float32") = R.add(lv81, metadata["ir.GenericConst"][39])
    lv84: R.Tensor((1, 512, 7, 7), dtype="float32") = R.add(lv83, lv76)          # residual
    lv85: R.Tensor((1, 512, 7, 7), dtype="float32") = R.nn.relu(lv84)
    lv86: R.Tensor((1, 512, 1, 1), dtype="float32") = R.mean(lv85, axis=[2, 3], keepdims=True)
    lv87: R.Tensor((1, 512), dtype="float32") = R.reshape(lv86, R.shape([1, 512]))
    lv89: R.Tensor((1, 1000), dtype="float32") = R.matmul(lv87, metadata["ir.GenericConst"][40], out_dtype=None)
    gv: R.Tensor((1, 1000), dtype="float32") = R.add(lv89, metadata["ir.GenericConst"][41])

MobileNetV2's first ConvBNReLU6 and depthwise conv::

    lv: R.Tensor((1, 32, 112, 112), dtype="float32") = R.nn.conv2d(input, metadata["ir.GenericConst"][0],
        strides=[2, 2], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1, ...)
    lv4: R.Tensor((1, 32, 112, 112), dtype="float32") = R.add(lv, metadata["ir.GenericConst"][1])
    lv8: R.Tensor((1, 32, 112, 112), dtype="float32") = R.clip(lv4, T.float64(0.0), T.float64(6.0))
    lv9: R.Tensor((1, 32, 112, 112), dtype="float32") = R.nn.conv2d(lv8, metadata["ir.GenericConst"][2],
        strides=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=32, ...)

So the rewrite pattern is ``conv2d(x, const W)`` [-> ``add(., const b[1,Cout,1,1])``] [-> ``nn.relu`` |
``clip(., 0, 6)``]. Gemm becomes ``R.matmul(x, const W^T [in, out])`` + ``R.add(., const b[out])``; global average
pool is ``R.mean(x, axis=[2, 3], keepdims=True)``; Flatten is ``R.reshape``. ``main`` has only the real inputs
(attribute ``num_input``), one dataflow block, and no other functions in the module (no PrimFuncs: nothing is
legalised).
"""
from __future__ import annotations

import contextlib
import heapq
import io
import os
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime
import tvm
from onnx import helper, shape_inference
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

from .input_shapes import parse_input_shapes
from .shuffle_folding import fold_channel_shuffles

__all__ = ["load_onnx", "parse_input_shapes", "model_inputs", "node_names", "name_nodes", "unsupported_ops",
           "import_onnx", "layer_node_name", "prepare_for_sparse"]


# ---------------------------------------------------------------------------------------------- loading


def load_onnx(path_or_model, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model from a path, raw bytes or a ``ModelProto``; one-line ``ValueError`` if it is not one.

    With ``check`` (default) ``onnx.checker.check_model`` must pass too (TVM's own importer only warns), so a
    file truncated at a protobuf field boundary (which still parses) is rejected as well; an input or output
    declared without a shape is not a reason to reject (ONNX Runtime runs such models)."""
    if isinstance(path_or_model, onnx.ModelProto):
        model, what = path_or_model, "the given ModelProto"
    else:
        if isinstance(path_or_model, (bytes, bytearray)):
            data, what = bytes(path_or_model), "the given bytes"
        else:
            path = os.fspath(path_or_model)
            what = repr(path)
            if not os.path.exists(path):
                raise ValueError(f"ONNX file {what} does not exist")
            if not os.path.isfile(path):
                raise ValueError(f"ONNX path {what} is not a file")
            with open(path, "rb") as f:
                data = f.read()
        if not data:
            raise ValueError(f"{what} is empty, not an ONNX model")
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except Exception as err:  # protobuf DecodeError: truncated / not a protobuf
            raise ValueError(f"{what} is not a valid ONNX model (protobuf parse failed: "
                             f"{_one_line(err) or type(err).__name__})") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ValueError(f"{what} is not a valid ONNX model (no graph nodes)")
    model = _fill_output_shapes(model)
    if check:
        try:
            onnx.checker.check_model(_with_shape_fields(model))
        except Exception as err:
            raise ValueError(f"{what} is not a valid ONNX model: {_one_line(err)}") from None
    return model


def _shapeless(values) -> list:
    """Graph inputs / outputs declared with a tensor type but no shape (unknown rank)."""
    return [v for v in values if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape")]


def _fill_output_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs declared without a shape have the shape ONNX shape inference
    finds; ``model`` itself when none lacks one. Exporters write such outputs and ONNX Runtime runs them (an
    output's declared shape is only a promise), but ``onnx.checker`` requires the field."""
    if not _shapeless(model.graph.output):
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # pylint: disable=broad-exception-caught  # the checker, or the import, names the problem
        return model
    found = {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.output)
             if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    filled = onnx.ModelProto()
    filled.CopyFrom(model)
    for output in _shapeless(filled.graph.output):
        if output.name in found:
            output.type.tensor_type.shape.CopyFrom(found[output.name].tensor_type.shape)
    return filled


def _with_shape_fields(model: onnx.ModelProto) -> onnx.ModelProto:
    """What ``onnx.checker`` gets to see: inputs and outputs whose rank is unknown even after shape inference get
    an empty shape field, which the checker requires and ONNX Runtime does not. The copy is only checked: an input
    of unknown rank still needs its shape given (``input_shapes``)."""
    if not (_shapeless(model.graph.input) or _shapeless(model.graph.output)):
        return model
    checked = onnx.ModelProto()
    checked.CopyFrom(model)
    for value in _shapeless(checked.graph.input) + _shapeless(checked.graph.output):
        value.type.tensor_type.shape.SetInParent()
    return checked


def _one_line(err) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------- shapes

def model_inputs(model: onnx.ModelProto) -> dict:
    """Real (non-initializer) graph inputs: ``{name: [dim, ...]}`` with a dim an int, or a ``str`` for a dynamic
    one (its ``dim_param``, or ``"?"``); ``None`` instead of a list for an input of unknown rank."""
    inits = {t.name for t in model.graph.initializer}
    result = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            result[vi.name] = None
            continue
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or "?")
        result[vi.name] = dims
    return result


def _resolve_shapes(model: onnx.ModelProto, input_shapes) -> dict:
    declared = model_inputs(model)
    if isinstance(input_shapes, str):
        input_shapes = parse_input_shapes(input_shapes)
    input_shapes = dict(input_shapes or {})
    unknown = [n for n in input_shapes if n not in declared]
    if unknown:
        raise ValueError(f"unknown input name(s) {', '.join(map(repr, unknown))}; the model's inputs are "
                         f"{', '.join(map(repr, declared)) or '(none)'}")
    shapes = {}
    for name, dims in declared.items():
        if name in input_shapes:
            given = tuple(int(d) for d in input_shapes[name])
            if any(d <= 0 for d in given):
                raise ValueError(f"input {name!r}: shape {given} has a non-positive dimension")
            if dims is not None and len(given) != len(dims):
                raise ValueError(f"input {name!r} has rank {len(dims)} {_fmt_dims(dims)} in the model but "
                                 f"shape {'x'.join(map(str, given))} was given")
            shapes[name] = given
            continue
        if dims is None:
            raise ValueError(f"input {name!r} has unknown rank; give its shape, e.g. '{name}:1x3x224x224'")
        dynamic = [f"dim {i} ({d})" for i, d in enumerate(dims) if isinstance(d, str)]
        if dynamic:
            raise ValueError(f"input {name!r} has dynamic {', '.join(dynamic)} in shape {_fmt_dims(dims)}; "
                             f"give a static shape, e.g. '{name}:{'x'.join(str(d) if isinstance(d, int) else '1' for d in dims)}'")
        shapes[name] = tuple(dims)
    return shapes


def _fmt_dims(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


# ---------------------------------------------------------------------------------------------- names


def node_names(model: onnx.ModelProto) -> list:
    """The name of every node of ``model``'s graph, in graph order: its own, or ``<op_type>_<k>`` for an unnamed
    one, ``k`` counting the nodes of that op type (unnamed Convs are ``Conv_0``, ``Conv_1``, ...; a name another
    node already has gets ``_`` appended). Layers are named this way everywhere: the compile report, tuning
    records, latency tables and the pruning of ONNX files by layer name."""
    used = {node.name for node in model.graph.node if node.name}
    seen: dict = {}
    names = []
    for node in model.graph.node:
        k = seen[node.op_type] = seen.get(node.op_type, -1) + 1
        if node.name:
            names.append(node.name)
            continue
        name = f"{node.op_type}_{k}"
        while name in used:
            name += "_"
        used.add(name)
        names.append(name)
    return names


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every node named as :func:`node_names` names it (a copy; ``model`` itself if all are)."""
    if all(node.name for node in model.graph.node):
        return model
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for node, name in zip(named.graph.node, node_names(model)):
        node.name = name
    return named


# ---------------------------------------------------------------------------------------------- rewrites


def _constant_inputs_dropped(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without initializers among its graph inputs. Before IR version 4 every initializer had to be
    listed as an input too, which makes it an input ONNX Runtime lets a caller override, so it folds nothing
    computed from it (the light zoo models' weights: ConstantOfShape of such a shape). TVM's importer takes an
    initializer as a constant whether or not it is listed, so dropping the listing changes nothing for TVM."""
    constants = {init.name for init in model.graph.initializer}
    if not any(value.name in constants for value in model.graph.input):
        return model
    dropped = onnx.ModelProto()
    dropped.CopyFrom(model)
    real = [value for value in dropped.graph.input if value.name not in constants]
    del dropped.graph.input[:]
    dropped.graph.input.extend(real)
    dropped.ir_version = max(dropped.ir_version, 4)
    return dropped


def _folded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (its inputs static) after ONNX Runtime's basic graph optimisations: every shape computation and
    constant subgraph folded into initializers (Paddle2ONNX's ``Shape -> Cast -> Slice -> Cast -> Concat ->
    Reshape``, which TVM's importer cannot convert; ConstantOfShape weights), Identity and inference Dropout
    removed (a Dropout after a Gemm kept the FC off the dense schedule), BatchNormalization, Add, Mul and Pad
    folded into the conv before them. Only ONNX ops come out, and convs keep their node names (the report,
    tuning records and latency tables are keyed by them).

    Chosen over onnxsim and onnxslim: on the same graphs (those patterns, the light zoo models) all three fold
    the shape computations, but ONNX Runtime is already a dependency, folds fastest (AlexNet: 12 s against 26 s
    and 13 s), removes AlexNet's opset-9 Dropout (onnxsim keeps it), keeps every conv's node name (onnxslim
    renames ResNet-50's convs when it fuses BatchNorm) and runs graphs whose outputs have no declared shape
    (onnxsim's checker refuses them); and what the import should accept is what ONNX Runtime runs.

    ``model`` itself when ONNX Runtime cannot load it (TVM's import then names the problem), or when what comes
    back is not that (an op outside the ONNX domains the model used, a conv whose name the model lacks)."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3  # its warnings (unused initializers removed, ...) are not the user's business
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="alcs-import-") as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "folded.onnx")
        try:
            onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            folded = onnx.load(options.optimized_model_filepath)
        except Exception:  # pylint: disable=broad-exception-caught  # e.g. an op only TVM has: import as it is
            return model
    domains = {"", "ai.onnx"} | {node.domain for node in model.graph.node}
    names = {node.name for node in model.graph.node}
    convs = {node.name for node in folded.graph.node if node.op_type in _LAYER_OPS}
    if any(node.domain not in domains for node in folded.graph.node) or not convs <= names:
        return model
    return _in_order_of(folded, model)


def _in_order_of(folded: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """``folded``'s nodes in the order their namesakes have in ``original`` as far as their inputs allow (a node
    without one right after its inputs' producers): ONNX Runtime saves its graph in an order of its own, and the
    report lists layers in graph order."""
    rank = {node.name: i for i, node in enumerate(original.graph.node) if node.name}
    nodes = list(folded.graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    needs = [{producer[name] for name in _names_read(node) if name in producer and producer[name] != i}
             for i, node in enumerate(nodes)]
    readers: dict = {}
    for i, deps in enumerate(needs):
        for d in deps:
            readers.setdefault(d, []).append(i)
    waiting = [len(deps) for deps in needs]
    key = [0.0] * len(nodes)
    ready = []
    for i, deps in enumerate(needs):
        if not deps:
            key[i] = rank.get(nodes[i].name, -0.5)
            heapq.heappush(ready, (key[i], i))
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for r in readers.get(i, []):
            waiting[r] -= 1
            if waiting[r] == 0:
                key[r] = rank.get(nodes[r].name, max(key[d] for d in needs[r]) + 0.5)
                heapq.heappush(ready, (key[r], r))
    if len(order) != len(nodes):  # not a DAG as far as this reading goes: keep ONNX Runtime's order
        return folded
    del folded.graph.node[:]
    folded.graph.node.extend(nodes[i] for i in order)
    return folded


def _names_read(node) -> set:
    """The tensors a node reads: its inputs and what the graphs in its attributes (If, Loop) read."""
    names = set(node.input)
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in graph.node:
                names |= _names_read(inner)
    return names


def _with_input_shapes(model: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    """A copy of ``model`` whose real inputs declare the resolved static ``shapes``, so that ONNX shape inference
    sees what the import will see."""
    static = onnx.ModelProto()
    static.CopyFrom(model)
    for value in static.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape
            dims.Clear()
            for d in shapes[value.name]:
                dims.dim.add().dim_value = int(d)
    return static


def _known_shapes(model: onnx.ModelProto) -> dict:
    """``{tensor name: [dim, ...]}`` from ONNX shape inference (``None`` for a dim it cannot resolve)."""
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # pylint: disable=broad-exception-caught  # whoever needs a shape says which one is missing
        inferred = model
    shapes = {init.name: [int(d) for d in init.dims] for init in model.graph.initializer}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = value.type.tensor_type
        if value.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes.setdefault(value.name, [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim])
    return shapes


def _sums_as_adds(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every ``Sum`` node as a chain of ``Add`` nodes (the last keeps the Sum's name and output); a one-input Sum
    as an ``Identity``. Caffe2-era graphs (the light zoo's ResNet-50) write a residual as ``Sum``, which TVM's
    importer turns into ``stack`` + ``sum``: an elementwise kernel of its own that the sparse rewrite cannot fuse
    into the conv before it, as it fuses an ``Add``. ``model`` itself when it has no Sum."""
    if not any(node.op_type == "Sum" and node.domain in ("", "ai.onnx") for node in model.graph.node):
        return model
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    nodes = []
    for node in rewritten.graph.node:
        if node.op_type != "Sum" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        inputs, name = list(node.input), node.name or node.output[0]
        if len(inputs) == 1:
            nodes.append(onnx.helper.make_node("Identity", inputs, list(node.output), name=name))
            continue
        total = inputs[0]
        for i, addend in enumerate(inputs[1:], start=1):
            last = i == len(inputs) - 1
            output = node.output[0] if last else f"{name}__partial{i}"
            nodes.append(onnx.helper.make_node("Add", [total, addend], [output],
                                               name=name if last else f"{name}__add{i}"))
            total = output
    del rewritten.graph.node[:]
    rewritten.graph.node.extend(nodes)
    return rewritten


def _conv_transpose_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """ConvTranspose nodes with an ``output_shape`` attribute rewritten to the ``pads`` (and ``output_padding``)
    it implies: TVM's importer ignores the attribute and produces the full-size output (e.g. (1, 2, 9, 7) for
    ONNX's test_convtranspose_output_shape, which asks for (1, 2, 10, 8)). ``model`` itself when no node has one.

    Per spatial axis, ``total = stride * (in - 1) + output_padding + (kernel - 1) * dilation + 1 - out``; a
    non-negative total is cropped as pads, the odd pixel at the start unless ``auto_pad`` is SAME_UPPER (as the
    ONNX spec and ONNX Runtime do); a negative one is extra output padding (rows or columns that no input
    reaches), which must stay below the stride, as ONNX Runtime and TVM require."""
    targets = [i for i, node in enumerate(model.graph.node)
               if node.op_type == "ConvTranspose" and any(a.name == "output_shape" for a in node.attribute)]
    if not targets:
        return model
    shapes = _known_shapes(model)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    for i in targets:
        node = rewritten.graph.node[i]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        what = f"ConvTranspose node {node.name or i!r}"
        out = [int(d) for d in attrs["output_shape"]]
        x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
        if x is None or len(x) < 3 or any(d is None for d in x[2:]):
            raise ValueError(f"{what}: its output_shape {out} needs the spatial size of its input "
                             f"{node.input[0]!r}, which shape inference cannot find")
        n = len(x) - 2
        if len(out) != n:
            raise ValueError(f"{what}: output_shape {out} has {len(out)} entries for {n} spatial dims "
                             f"(it gives the spatial dims only)")
        kernel = list(attrs.get("kernel_shape", []) or (w[2:] if w is not None else []))
        if len(kernel) != n or any(k is None for k in kernel):
            raise ValueError(f"{what}: its output_shape {out} needs the kernel size, which is unknown")
        strides = list(attrs.get("strides", [1] * n))
        dilations = list(attrs.get("dilations", [1] * n))
        output_padding = list(attrs.get("output_padding", [0] * n))
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        begin, end = [0] * n, [0] * n
        for a in range(n):
            full = strides[a] * (x[2 + a] - 1) + output_padding[a] + (kernel[a] - 1) * dilations[a] + 1
            total = full - out[a]
            if total >= 0:
                begin[a] = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
                end[a] = total - begin[a]
            elif output_padding[a] - total < strides[a]:
                output_padding[a] -= total
            else:
                largest = full - output_padding[a] + strides[a] - 1
                raise ValueError(f"{what}: output_shape {out} is larger than it can produce from input "
                                 f"{x[2:]} (at most {largest} along spatial axis {a})")
        kept = [a for a in node.attribute if a.name not in ("output_shape", "auto_pad", "pads", "output_padding")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.extend([helper.make_attribute("pads", begin + end),
                               helper.make_attribute("output_padding", output_padding)])
    return rewritten


# ---------------------------------------------------------------------------------------------- import


def _convert_map() -> dict:
    return onnx_frontend._get_convert_map()  # pylint: disable=protected-access


# Handled by the importer itself rather than the converter map.
_DIRECT_OPS = {"Constant", "If"}


def unsupported_ops(model: onnx.ModelProto) -> dict:
    """``{op_type: [node names]}`` for nodes (subgraphs included) that TVM's ONNX frontend cannot convert."""
    supported = set(_convert_map()) | _DIRECT_OPS
    bad: dict = {}

    def visit(graph):
        for node in graph.node:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            if node.op_type not in supported or node.domain not in ("", "ai.onnx"):
                bad.setdefault(op, []).append(node.name or f"<unnamed {node.op_type} -> {list(node.output)}>")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g)

    visit(model.graph)
    return bad


class _ConversionError(Exception):
    def __init__(self, op_name, node_name, err):
        super().__init__(op_name, node_name, err)
        self.op_name, self.node_name, self.err = op_name, node_name, err


#: ONNX op -> the Relax ops its converter computes the layer with; that call carries the node's name
_LAYER_OPS = {
    "Conv": {"relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d"},
    "ConvTranspose": {"relax.nn.conv1d_transpose", "relax.nn.conv2d_transpose", "relax.nn.conv3d_transpose"},
}

#: ops whose Relax call carries its ONNX node's name: the layers, and the concats and max pools the compile report
#: names
_NAMED_OPS = dict(_LAYER_OPS, Concat={"relax.concat"}, MaxPool={"relax.nn.max_pool2d"})


def rewrite_functions(rewriter, mod):
    """``mod`` with every Relax function passed through ``rewriter`` (a ``PyExprMutator`` built on ``mod``)."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def with_span(call, span):
    """``call`` with ``span`` (a ``tvm.ir.Span``, or a node name for a span of that source name)."""
    if isinstance(span, str):
        span = tvm.ir.Span(tvm.ir.SourceName(span), 0, 0, 0, 0)
    return relax.Call(call.op, call.args, call.attrs, call.ty_args, span)


def layer_node_name(call):
    """The ONNX node name :func:`import_onnx` gave a conv, concat or max pool call (its span's source name), else
    None."""
    span = getattr(call, "span", None)
    return None if span is None else span.source_name.name


class _Importer(ONNXGraphImporter):
    """Remembers which node failed to convert, and marks each conv's, concat's and max pool's Relax call with its
    ONNX node's name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_vars = {}  # bound conv call's var -> node name (marked after the import, see _name_bound)

    def _convert_operator(self, op_name, inputs, attrs, opset):
        node = (attrs.get("tvm_custom") or {}).get("name", "?")
        try:
            result = super()._convert_operator(op_name, inputs, attrs, opset)
        except _ConversionError:
            raise
        except Exception as err:  # pylint: disable=broad-exception-caught
            raise _ConversionError(op_name, node, err) from err
        if op_name in _NAMED_OPS:
            result = self._name_layer(result, inputs, _NAMED_OPS[op_name], node)
        return result

    def _name_layer(self, result, inputs, ops, node):
        """Find the call of one of ``ops`` among what the converter built (not past the node's inputs): the
        result itself gets the node's name as its span now; a call already bound to a var (a conv with a bias
        is ``add(conv, bias)``) is remembered and named once the function is built."""
        inputs = [i for i in inputs if i is not None]
        todo = [result]
        while todo:
            expr = todo.pop(0)
            if any(expr.same_as(i) for i in inputs):
                continue
            value = self.bb.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
            if isinstance(value, relax.Tuple):
                todo.extend(value.fields)
            if not isinstance(value, relax.Call):
                continue
            if isinstance(value.op, tvm.ir.Op) and value.op.name in ops:
                if expr.same_as(result) and not isinstance(expr, relax.Var):
                    return self.bb.normalize(with_span(value, node))
                if isinstance(expr, relax.Var):
                    self.layer_vars[expr] = node
                return result
            todo.extend(value.args)
        return result


def _name_bound(mod, layer_vars: dict):
    """Give the calls bound to ``layer_vars`` their node's name as span (see :class:`_Importer`)."""
    if not layer_vars:
        return mod

    @mutator
    class _Name(PyExprMutator):
        def visit_var_binding_(self, binding):
            node = layer_vars.get(binding.var)
            if node is None:
                return super().visit_var_binding_(binding)
            value = with_span(self.visit_expr(binding.value), node)
            self.set_var_remap(binding.var, self.builder_.emit(value, name_hint=binding.var.name))
            return None

    namer = _Name(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            namer.builder_.update_func(gv, namer.visit_expr(func))
    return namer.builder_.get()


def _opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 1


def import_onnx(model, input_shapes=None, dtype: str = "float32", check: bool = True):
    """Import an ONNX model (path, bytes or ``ModelProto``) into a Relax ``IRModule`` with function ``main``.

    ``input_shapes`` is a dict ``{name: shape}`` or text ``"name:1x3x224x224,..."`` overriding / completing the
    model's declared input shapes. The graph is folded for those shapes by ONNX Runtime (see :func:`_folded`);
    initializers become inline Relax constants (no parameter inputs). Raises a one-line ``ValueError`` for
    unknown input names, unresolved dynamic dims, unsupported ops (listing op types and node names) and any other
    conversion failure (naming the failing op and node). ``check=False`` skips ``onnx.checker`` (see
    :func:`load_onnx`)."""
    model = load_onnx(model, check=check)
    shapes = _resolve_shapes(model, input_shapes)
    if model.ir_version < 3:
        raise ValueError(f"ONNX IR version {model.ir_version} is too old (TVM needs >= 3)")
    # named first: errors point at a node, and every conv carries the name the report shows through the folding
    model = name_nodes(model)
    model = _folded(_constant_inputs_dropped(_with_input_shapes(model, shapes)))
    model = _sums_as_adds(_conv_transpose_pads(model))
    model = fold_channel_shuffles(model, _known_shapes)
    bad = unsupported_ops(model)
    if bad:
        listing = "; ".join(f"{op} (node{'s' if len(n) > 1 else ''} {', '.join(map(repr, n[:5]))}"
                            f"{', ...' if len(n) > 5 else ''})" for op, n in sorted(bad.items()))
        raise ValueError(f"ONNX op(s) not supported by TVM's ONNX frontend: {listing}")
    importer = _Importer({k: list(v) for k, v in shapes.items()}, dtype, keep_params_in_input=False)
    try:
        # The importer prints its failing node's inputs to stdout and warns about renamed inputs; keep it quiet.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importer.from_onnx(model.graph, _opset(model))
    except _ConversionError as err:
        raise ValueError(f"TVM could not convert ONNX op {err.op_name} (node {err.node_name!r}, "
                         f"opset {_opset(model)}): {type(err.err).__name__}: {_one_line(err.err)}") from err.err
    except Exception as err:  # pylint: disable=broad-exception-caught
        raise ValueError(f"TVM's ONNX import failed: {type(err).__name__}: {_one_line(err)}") from err
    if not isinstance(mod, tvm.IRModule):  # pragma: no cover - defensive
        raise ValueError("TVM's ONNX import did not return an IRModule")
    return _name_bound(mod, importer.layer_vars)


# ---------------------------------------------------------------------------------------------- canonicalise


def _elementwise_kind(prim_func):
    """``"max"`` / ``"min"`` if ``prim_func`` is a single-store ``out[...] = max|min(a[...], b[()])``, else None."""
    node = prim_func.body
    for _ in range(64):
        if isinstance(node, tirx.BufferStore):
            break
        nxt = getattr(node, "block", None)
        if nxt is None:
            nxt = getattr(node, "body", None)
        if nxt is None:
            return None
        node = nxt
    else:
        return None
    if not isinstance(node, tirx.BufferStore):
        return None
    if isinstance(node.value, tirx.Max):
        return "max"
    if isinstance(node.value, tirx.Min):
        return "min"
    return None


def _const_array(expr):
    """The numpy value of a Relax tensor constant (``tvm.ir.GenericConst`` in TVM 0.27), else None."""
    if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
        return expr.value.numpy()
    return None


def _bound_value(mutator_self, expr):
    """The value bound to ``expr`` in the function being rewritten if it is a Var with a binding, else ``expr``."""
    if isinstance(expr, relax.Var):
        bound = mutator_self.lookup_binding(expr)
        if bound is not None:
            return bound
    return expr


def _scalar_const(expr):
    arr = _const_array(expr)
    if arr is not None and arr.size == 1:
        return float(arr.reshape(()))
    return None


def _canonicalize_clip(mod):
    """call_tir(maximum, (x, c)) / call_tir(minimum, ...) from the ONNX Clip converter -> R.clip / R.maximum /
    R.minimum / R.nn.relu."""
    call_tir_op = tvm.ir.Op.get("relax.call_tir")
    kinds = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            kinds[gv] = _elementwise_kind(func)

    @mutator
    class _Clip(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != call_tir_op or len(call.args) < 2 or not isinstance(call.args[1], relax.Tuple):
                return call
            kind = kinds.get(call.args[0])
            args = call.args[1].fields
            if kind is None or len(args) != 2:
                return call
            x, c = args
            value = _scalar_const(_bound_value(self, c))
            if value is None or list(x.ty.shape) != list(call.ty.shape) or x.ty.dtype != call.ty.dtype:
                return call
            if kind == "min":
                prev = _bound_value(self, x)
                if (isinstance(prev, relax.Call) and prev.op == tvm.ir.Op.get("relax.maximum")
                        and _scalar_const(_bound_value(self, prev.args[1])) is not None):
                    lo = _scalar_const(_bound_value(self, prev.args[1]))
                    if lo <= value:
                        return relax.op.clip(prev.args[0], lo, value)
                if (isinstance(prev, relax.Call) and prev.op == tvm.ir.Op.get("relax.nn.relu") and value >= 0):
                    return relax.op.clip(prev.args[0], 0.0, value)
                return relax.op.minimum(x, relax.const(value, call.ty.dtype))
            if value == 0.0:
                return relax.op.nn.relu(x)
            return relax.op.maximum(x, relax.const(value, call.ty.dtype))

    return rewrite_functions(_Clip(mod), mod)


def _power_by_square_roots(mod):
    """``power(x, c)`` with a constant exponent that is a multiple of 1/4 in (0, 4] (LocalResponseNormalization's
    ``beta = 0.75`` in AlexNet, ZFNet and GoogLeNet) as products of ``x``, ``sqrt(x)`` and ``sqrt(sqrt(x))``: the
    power is a scalar libm call per element, the square roots vectorize. A negative ``x`` gives NaN both ways."""
    power_op = tvm.ir.Op.get("relax.power")

    @mutator
    class _Power(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op != power_op or str(call.ty.dtype) != "float32":
                return call
            exponent = _scalar_const(_bound_value(self, call.args[1]))
            if exponent is None or not 0 < exponent <= 4 or abs(exponent * 4 - round(exponent * 4)) > 1e-6:
                return call
            if list(call.args[0].ty.shape) != list(call.ty.shape):
                return call  # a broadcasting base
            x = call.args[0]
            whole, quarters = divmod(int(round(exponent * 4)), 4)
            factors = [x] * whole
            if quarters & 2:
                factors.append(relax.op.sqrt(x))
            if quarters & 1:
                factors.append(relax.op.sqrt(relax.op.sqrt(x)))
            result = factors[0]
            for factor in factors[1:]:
                result = relax.op.multiply(result, factor)
            return result

    return rewrite_functions(_Power(mod), mod)


def _fold_bn_into_conv(mod):
    """conv2d(x, const W) [+ const b] -> batch_norm(const gamma, beta, mean, var)[0]  ==>  conv2d(x, W') + b'."""
    conv_op, add_op, bn_op = (tvm.ir.Op.get(n) for n in ("relax.nn.conv2d", "relax.add", "relax.nn.batch_norm"))

    def as_call(mutator_self, expr, op):
        expr = _bound_value(mutator_self, expr)
        return expr if isinstance(expr, relax.Call) and expr.op == op else None

    def const(mutator_self, expr):
        return _const_array(_bound_value(mutator_self, expr))

    @mutator
    class _FoldBN(PyExprMutator):
        def visit_tuple_getitem_(self, tgi):
            tgi = super().visit_tuple_getitem_(tgi)
            if tgi.index != 0:
                return tgi
            bn = as_call(self, tgi.tuple_value, bn_op)
            if bn is None or any(const(self, a) is None for a in bn.args[1:]) or bn.attrs.axis != 1:
                return tgi
            data, bias = bn.args[0], None
            add = as_call(self, data, add_op)
            if add is not None and const(self, add.args[1]) is not None:
                data, bias = add.args[0], const(self, add.args[1])
            conv = as_call(self, data, conv_op)
            if (conv is None or const(self, conv.args[1]) is None or conv.attrs.data_layout != "NCHW"
                    or conv.attrs.kernel_layout != "OIHW" or conv.attrs.out_layout != "NCHW"):
                return tgi
            gamma, beta, mean, var = (const(self, a).astype(np.float64) for a in bn.args[1:])
            scale = gamma / np.sqrt(var + float(bn.attrs.epsilon))
            weight = const(self, conv.args[1])
            cout = weight.shape[0]
            b = np.zeros(cout) if bias is None else bias.astype(np.float64).reshape(-1)
            if b.size != cout:
                return tgi
            new_w = (weight.astype(np.float64) * scale.reshape(-1, 1, 1, 1)).astype(weight.dtype)
            new_b = ((b - mean) * scale + beta).astype(weight.dtype).reshape(1, cout, 1, 1)
            a = conv.attrs
            new_conv = self.builder_.emit(with_span(relax.op.nn.conv2d(
                conv.args[0], relax.const(new_w), strides=a.strides, padding=a.padding, dilation=a.dilation,
                groups=a.groups, data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                out_layout=a.out_layout, out_dtype=a.out_dtype), conv.span))  # the span names its ONNX node
            return relax.op.add(new_conv, relax.const(new_b))

    return rewrite_functions(_FoldBN(mod), mod)


_NUMPY_FOLD = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.sqrt": np.sqrt, "relax.rsqrt": lambda a: 1.0 / np.sqrt(a),
    "relax.isnan": np.isnan, "relax.where": np.where, "relax.negative": np.negative,
}
_NUMPY_SHAPE_OPS = ("relax.reshape", "relax.permute_dims", "relax.astype")


def _numpy_fold(mod):
    """Fold the importer's small constant expressions (bias reshapes, transposed Gemm weights, clip-bound
    ``where(isnan(c))``) in numpy: Relax's FoldConstant builds one LLVM module per expression (~20 ms each), which
    made MobileNetV2's preparation take ~7 s."""

    @mutator
    class _Fold(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or not isinstance(call.ty, relax.TensorType):
                return call
            name = call.op.name
            if name not in _NUMPY_FOLD and name not in _NUMPY_SHAPE_OPS:
                return call
            arrays = [_const_array(_bound_value(self, a))
                      for a in (call.args[:1] if name in _NUMPY_SHAPE_OPS else call.args)]
            if any(a is None for a in arrays):
                return call
            try:
                out_shape = tuple(int(d) for d in call.ty.shape)
            except (TypeError, ValueError):
                return call
            with np.errstate(all="ignore"):
                if name == "relax.reshape":
                    out = arrays[0].reshape(out_shape)
                elif name == "relax.permute_dims":
                    axes = call.attrs.axes
                    out = np.transpose(arrays[0], None if axes is None else [int(a) for a in axes])
                elif name == "relax.astype":
                    out = arrays[0]
                else:
                    out = _NUMPY_FOLD[name](*arrays)
            out = np.array(out, dtype=str(call.ty.dtype), order="C")
            if out.shape != out_shape:
                return call
            return relax.const(out)

    return rewrite_functions(_Fold(mod), mod)


def prepare_for_sparse(mod, params: dict | None = None):
    """Canonicalise an imported module for the SIMD-block sparse rewrite (see the module docstring for the
    resulting pattern). No legalisation.

    Parameters are bound into ``main`` as constants first: ``params`` (``{name: array}``, or a list of arrays
    for ``main``'s parameters after its ``num_input`` real inputs) if given, else the ``"params"`` attribute that
    ``from_onnx(keep_params_in_input=True)`` leaves on ``main``."""
    main = mod["main"]
    if params is None and main.attrs is not None and "params" in main.attrs:
        mod, detached = relax.frontend.detach_params(mod)
        params = list(detached.get("main", []))
        main = mod["main"]
    if params is not None and not isinstance(params, dict):
        num_input = int(main.attrs["num_input"]) if main.attrs is not None and "num_input" in main.attrs else 1
        free = list(main.params)[num_input:]
        if len(free) != len(params):
            raise ValueError(f"{len(params)} parameter values given for {len(free)} parameter inputs of main")
        params = dict(zip(free, params))  # BindParams takes the Vars themselves as keys
    if params:
        mod = relax.transform.BindParams("main", {k: np.asarray(v) if not isinstance(v, tvm.runtime.Tensor) else v
                                                  for k, v in params.items()})(mod)
    mod = relax.transform.ConvertToDataflow()(mod)
    mod = _numpy_fold(mod)
    mod = _fold_bn_into_conv(mod)
    mod = relax.transform.DecomposeOpsForInference()(mod)  # leftover batch_norm etc. -> elementwise arithmetic
    mod = _numpy_fold(mod)
    mod = _canonicalize_clip(mod)
    mod = _power_by_square_roots(mod)
    mod = tvm.transform.Sequential([
        relax.transform.FoldConstant(),  # anything the numpy folder does not know
        relax.transform.CanonicalizeBindings(),
        relax.transform.DeadCodeElimination(),
    ])(mod)
    return mod
