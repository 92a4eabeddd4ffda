"""Relax pass: rewrite constant-weight convolutions into calls of the ALCS sparse conv kernel.

Pattern (after parameters are bound as constants, see :func:`alcs_tvm.frontend.prepare_for_sparse`)::

    y = R.nn.conv2d(x, W: Constant, groups=1, NCHW/OIHW, float32)
    [y = R.add(y, b: Constant of shape [1, C, 1, 1] or [C, 1, 1])]      # bias, if y has no other user
    [y = R.add(y, shortcut)]                                             # a residual add, likewise
    [y = relu(y) | relu6(y) | prelu(y) | sigmoid(y) | silu(y) | ...]      # activation, likewise

(the epilogue's Relax dataflow patterns: :mod:`.epilogue_patterns`) becomes
``R.call_tir(alcs_sparse_conv2d_k, (x, indptr, offsets, values, bias[, shortcut]), R.Tensor(out_shape))`` with the
packed constants (a residual add fuses into the first of its two operands' convs to reach it). Per
layer the pass decides sparse or dense: sparse skips pruned blocks; dense runs the same register-tiled kernel
with every block kept (still far faster than an unscheduled Relax conv). A grouped conv is the conv over all
input channels whose weight is zero outside each group: it runs the sparse kernel with that block-diagonal weight.
Depthwise convolutions are left to the dense schedules (or the blocked depthwise kernel inside a chain, in one kernel
with the 1x1 conv before it where :mod:`.layout_chain` fuses the two): they are memory-bound, with no reduction
over input channels for SIMD blocks to skip. A transposed 2-D conv becomes a
sub-pixel conv first (:mod:`.conv_transpose`). Linear layers (``R.matmul(x[N, K], W: Constant[K, Out])``
[+ bias]) run the same kernel as a 1x1 conv on a 1x1 image (V along the output features) when their weight is
sparse enough; a dense one stays a Relax matmul. 1-D and 3-D convs, and transposed convs with dilation or groups,
stay Relax ops. Channel concats and max pools between rewritten convs keep their channel-blocked layout
(:mod:`.layout_chain`). Every decision lands in :attr:`SparseConvRewrite.report`, one row per conv (of any kind),
linear layer and channel concat, named after the ONNX node it came from.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..expand_depthwise import DepthwiseConv, expand_depthwise_kernel
from ..frontend import layer_node_name, rewrite_functions
from ..kernels import sparse_conv2d_kernel
from ..layer import Conv2dSpec, KernelLayout, layer_key
from ..report import CompileReport, LayerDecision
from ..schedules.depthwise_cpu import DepthwiseGeometry, depthwise_nchwc_template
from ..schedules.pool_cpu import PoolGeometry, max_pool_nchwc_template
from ..schedules.sparse_conv2d_cpu import bordered_shape
from ..sparse_format import BlockSparseWeight, block_diagonal, widest_block_format
from ..target import resolve_target
from ..winograd import WINOGRAD_TILES, choose_algorithm, winograd_applies, winograd_conv2d, winograd_layout
from .conv_transpose import SubpixelConvTranspose
from .epilogue_patterns import BindingGraph, match_epilogue
from .relax_expr import const_array, dtype, emit_as, is_const, static_shape
from .layout_chain import plan_layouts

__all__ = ["SparseConvRewrite", "DEFAULT_DENSITY_THRESHOLD"]

#: Sparse wins below this density. The kernel's time is proportional to density (docs/benchmarks.md), so any
#: skipped block pays; above 0.95 the saving is within noise and the dense form avoids depending on the mask.
DEFAULT_DENSITY_THRESHOLD = {"x86-avx512": 0.95, "x86-avx2": 0.95, "arm64": 0.95, "generic": 0.95}


_ACTIVATION_OPS = {"relax.nn.relu": "relu", "relax.nn.relu6": "relu6"}

#: convs the kernel does not compute, reported as dense layers with the reason: Relax op -> (report op, reason)
_OTHER_CONVS = {
    "relax.nn.conv1d": ("conv1d", "1-D conv: the ALCS kernel is 2-D only"),
    "relax.nn.conv3d": ("conv3d", "3-D conv: the ALCS kernel is 2-D only"),
    "relax.nn.conv1d_transpose": ("conv1d_transpose", "transposed conv: the ALCS kernel computes convs only"),
    "relax.nn.conv2d_transpose": ("conv2d_transpose", "transposed conv: the ALCS kernel computes convs only"),
    "relax.nn.conv3d_transpose": ("conv3d_transpose", "transposed conv: the ALCS kernel computes convs only"),
}


class _Layer:
    """A matched conv (or linear) chain: the op binding, optional bias/activation/shortcut bindings folded into
    it, and what the pass decided for it."""

    def __init__(self, conv_var, call, kind="conv2d"):
        self.conv_var = conv_var
        self.call = call
        self.kind = kind  # "conv2d" | "linear" (a 1x1 conv on a 1x1 image) | "depthwise" | "other" (1-D, ...) |
        # "concat" (channel concat) | "maxpool" | "mean" (a global average pool) | "scale" (x * a per-channel gate)
        self.bias = None  # the bias constant, float32 [Cout]
        self.activation = None
        self.slope = None  # PReLU's per-channel slopes, float32 [Cout], when the activation is "prelu"
        self.block_input = False  # a channel-blocked depthwise conv whose input comes NCHW: convert it first
        self.unblock_output = False  # ... whose output is read NCHW: convert it back after
        self.last_var = conv_var
        self.fused_vars = []  # bindings folded into the call (skipped when rewriting)
        # a shortcut tensor added before the activation (ResNet/MobileNetV2 residual), fused into the epilogue
        self.residual = None  # the Relax var
        self.residual_binding = None  # the add's binding var (folded into the call)
        self.report_row = None
        self.sparse_weight = None
        self.spec = None
        self.layout = None  # KernelLayout: the epilogue, then the layouts planned with the neighbours
        self.schedule = None  # a tuned SparseConvSchedule (alcs tune), else the target's default
        self.winograd = None  # the output tile m when the conv runs as Winograd F(m x m, 3x3)
        self.weight = None  # the dense OIHW weight (Winograd transforms it)
        self.gate = None  # a channel scale's [N, C, 1, 1] operand (a squeeze-excitation's gate)
        self.depthwise_conv = None  # a depthwise conv's DepthwiseConv
        # a 1x1 conv and the depthwise conv reading it run as one kernel (see layout_chain): the depthwise layer
        # holds its expand conv here, the expand conv its depthwise layer
        self.expand = None
        self.fused_depthwise = None

    def epilogue_layout(self) -> KernelLayout:
        return KernelLayout(bias=self.bias is not None, activation=self.activation,
                            residual=None if self.residual is None else "nchw")


@tvm.transform.module_pass(opt_level=0, name="alcs.SparseConvRewrite")
class SparseConvRewrite:
    """Module pass rewriting ``groups == 1`` constant-weight convs into ALCS sparse/dense kernel calls.

    Everything it decides on comes in as data: ``target`` (short name, dict, Target or TargetInfo),
    ``vector_width`` (override V), ``sparse`` (False: every conv dense), ``density_threshold`` (sparse iff density
    <= it), ``latency_table`` (an object with ``choose(spec, density, vector_width) -> (decision, predicted_ms,
    reason)`` and ``layers`` keyed by :func:`~alcs_tvm.layer.layer_key`; overrides the threshold), ``layer_names``
    (names for the 2-D convs in graph order, for a module whose convs do not carry their ONNX node's name as
    :func:`~alcs_tvm.frontend.import_onnx` gives it them), ``tuning`` (an object with
    ``schedule_for(name, key, layout) -> (schedule | None, why)``, such as
    :class:`~alcs_tvm.tuning_records.TuningRecords`: each named conv gets its measured schedule), ``winograd``
    (``"auto"``: a 3x3 stride-1 conv runs as Winograd where it is estimated faster than the direct kernel at its
    density, :func:`~alcs_tvm.winograd.choose_algorithm`; ``"off"``: none does; a tile size, 2 or 4: every one
    that can does, with that tile).
    After the pass has run, :attr:`report` holds a :class:`CompileReport`. :meth:`rewrite` is the same
    transformation as a plain function (its errors are the original Python exceptions, not TVM's wrappers).
    """

    def __init__(self, target="x86", vector_width=None, sparse=True, density_threshold=None, latency_table=None,
                 layer_names=None, tuning=None, winograd="auto"):
        self.target_info = resolve_target(target, vector_width)
        self.sparse = sparse
        if winograd not in ("auto", "off") + WINOGRAD_TILES:
            raise ValueError(f"winograd must be 'auto', 'off' or a tile size in {WINOGRAD_TILES}, got {winograd!r}")
        self.winograd = winograd
        self.threshold = (DEFAULT_DENSITY_THRESHOLD[self.target_info.family] if density_threshold is None
                          else float(density_threshold))
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"density threshold must be in [0, 1], got {density_threshold}")
        self.latency_table = latency_table
        self.tuning = tuning
        self.layer_names = list(layer_names or [])
        self._subpixel = set()  # ONNX names of the transposed convs the last rewrite() turned into sub-pixel convs
        self.report = CompileReport(target=self.target_info.family)

    # -- analysis ---------------------------------------------------------------------------------------------
    def _match(self, func) -> list:
        bindings = []
        for block in func.body.blocks:
            bindings.extend(block.bindings)
        value_of = {b.var: b.value for b in bindings}
        users = {}
        for b in bindings:
            for v in relax.analysis.used_vars(b.value):
                users.setdefault(v, []).append(b.var)
        for v in relax.analysis.used_vars(func.body.body):
            users.setdefault(v, []).append(None)  # a function output: never fuse away

        graph = BindingGraph(value_of, users)
        self._single_user = graph.single_user
        self._users = users
        self._claimed_adds = {}  # a shortcut add is fused into the first conv that reaches it, not both operands'
        self._pools = []  # max pools that may run channel-blocked between rewritten convs
        self._excitations = []  # global means and channel scales: a squeeze-excitation may run channel-blocked

        layers = []
        for b in bindings:
            call = b.value
            op = call.op.name if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) else None
            if op == "relax.nn.conv2d" or (op == "relax.matmul" and self._is_linear(call)):
                layer = _Layer(b.var, call, "conv2d" if op == "relax.nn.conv2d" else "linear")
                self._extend_chain(layer, graph)
                layers.append(layer)
            elif op in _OTHER_CONVS:
                layers.append(_Layer(b.var, call, "other"))
            elif op == "relax.nn.max_pool2d" and self._is_blockable_pool(call):
                pool = _Layer(b.var, call, "maxpool")  # runs blocked between rewritten convs, see layout_chain
                pool.layout = KernelLayout()
                self._pools.append(pool)
            elif op == "relax.concat" and self._is_channel_concat(call):
                layers.append(_Layer(b.var, call, "concat"))  # may join blocked convs' outputs, see layout_chain
            elif op == "relax.mean" and self._is_global_mean(call):
                self._excitations.append(_Layer(b.var, call, "mean"))
            elif op == "relax.multiply" and (gate := self._channel_scale_gate(call)) is not None:
                scale = _Layer(b.var, call, "scale")
                scale.gate = gate
                self._excitations.append(scale)
        return layers

    @staticmethod
    def _is_global_mean(call) -> bool:
        """A float32 mean of a 4-D tensor over its image, keeping the dims: ONNX's GlobalAveragePool."""
        shape = static_shape(call.args[0])
        return shape is not None and len(shape) == 4 and dtype(call) == "float32" and bool(call.attrs.keepdims) \
            and call.attrs.axis is not None and sorted(int(a) % 4 for a in call.attrs.axis) == [2, 3]

    @staticmethod
    def _channel_scale_gate(call):
        """The gate of ``x[N, C, H, W] * gate[N, C, 1, 1]`` (two float32 vars, either order), else None."""
        args = list(call.args)
        shapes = [static_shape(a) for a in args]
        if not all(isinstance(a, relax.Var) for a in args) or any(s is None or len(s) != 4 for s in shapes) or \
                dtype(call) != "float32":
            return None
        for data, gate in ((0, 1), (1, 0)):
            x, g = shapes[data], shapes[gate]
            if tuple(g) == (x[0], x[1], 1, 1) and tuple(x[2:]) != (1, 1):
                return args[gate]
        return None

    @staticmethod
    def _is_channel_concat(call) -> bool:
        """A float32 concat of 4-D tensors along the channel axis, its inputs a tuple of vars."""
        shape = static_shape(call)
        parts = call.args[0]
        return shape is not None and len(shape) == 4 and dtype(call) == "float32" and \
            call.attrs.axis is not None and int(call.attrs.axis) % 4 == 1 and isinstance(parts, relax.Tuple) and \
            all(isinstance(p, relax.Var) for p in parts.fields)

    @staticmethod
    def _is_blockable_pool(call) -> bool:
        attrs = call.attrs
        return str(attrs.layout) == "NCHW" and str(attrs.out_layout or "NCHW") == "NCHW" and \
            not bool(attrs.ceil_mode) and dtype(call.args[0]) == "float32" and static_shape(call.args[0]) is not None \
            and len(static_shape(call.args[0])) == 4

    @staticmethod
    def _is_linear(call) -> bool:
        """``matmul(x[N, K], W[K, Out] constant)``: a Linear/Gemm layer as the ONNX importer emits it."""
        x, w = call.args
        return is_const(w) and dtype(w) == "float32" and dtype(x) == "float32" and \
            const_array(w).ndim == 2 and static_shape(x) is not None and len(static_shape(x)) == 2

    def _extend_chain(self, layer, graph):
        epi = match_epilogue(layer.conv_var, layer.call, layer.kind, graph, self._claimed_adds)
        layer.bias, layer.residual, layer.residual_binding = epi.bias, epi.residual, epi.residual_binding
        layer.activation, layer.slope = epi.activation, epi.slope
        layer.fused_vars, layer.last_var = epi.fused_vars, epi.last_var

    def _decide_linear(self, layer, index) -> LayerDecision:
        x, w = layer.call.args
        (batch, k), (_, out) = static_shape(x), const_array(w).shape
        name = f"linear{index}"
        weight = np.ascontiguousarray(const_array(w).T).reshape(out, k, 1, 1)
        v = self.target_info.vector_width
        sparse_weight = BlockSparseWeight.from_dense(weight, v)
        density = sparse_weight.density
        shape = f"linear {k}->{out}" + (f" n{batch}" if batch != 1 else "")
        if self.sparse and density <= self.threshold:
            layer.spec = Conv2dSpec.create((batch, k, 1, 1), weight.shape)
            layer.layout = layer.epilogue_layout()
            layer.sparse_weight = sparse_weight
            return LayerDecision(name, "linear", shape, round(density, 4), v, "sparse",
                                 "alcs sparse kernel (GEMV over kept blocks)",
                                 f"density {density:.3f} <= threshold {self.threshold:.2f}", spec=layer.spec)
        why = "sparsity disabled (--no-sparse)" if not self.sparse else \
            f"density {density:.3f} > threshold {self.threshold:.2f}"
        return LayerDecision(name, "linear", shape, round(density, 4), v, "dense", "relax dense schedule (matmul)",
                             why)

    def _name(self, layer, index) -> str:
        """The ONNX node the layer's call came from (its span, set by :func:`alcs_tvm.frontend.import_onnx`), so
        a dead conv, a 1-D conv or anything else before it cannot shift the names; for a module built some other
        way, ``layer_names`` by position among the 2-D convs, else a made-up name."""
        name = layer_node_name(layer.call)
        if name:
            return name
        if layer.kind == "other":
            return f"{_OTHER_CONVS[layer.call.op.name][0]}_{index}"
        return self.layer_names[index] if index < len(self.layer_names) else f"conv{index}"

    def _decide_other(self, layer, index) -> LayerDecision:
        op, reason = _OTHER_CONVS[layer.call.op.name]
        data, weight = layer.call.args
        in_shape, w_shape = static_shape(data), static_shape(weight)
        shape = f"{op} {w_shape} on {in_shape}" if in_shape and w_shape else f"{op}, dynamic shape"
        return LayerDecision(self._name(layer, index), op, shape, None, None, "dense", "relax dense schedule",
                             reason)

    def _decide_concat(self, layer, index) -> LayerDecision:
        """A channel concat's row: a Relax concat in NCHW unless :func:`.layout_chain.plan_layouts` joins it
        channel-blocked (it then rewrites the row, or says why not)."""
        name = layer_node_name(layer.call) or f"concat{index}"
        layer.layout = KernelLayout()
        shape = f"concat of {len(layer.call.args[0].fields)} -> {list(static_shape(layer.call))}"
        return LayerDecision(name, "concat", shape, None, None, "nchw", "relax concat (NCHW)", "")

    def _decide(self, layer, index) -> LayerDecision:
        if layer.kind == "concat":
            return self._decide_concat(layer, index)
        if layer.kind == "linear":
            return self._decide_linear(layer, index)
        if layer.kind == "other":
            return self._decide_other(layer, index)
        call = layer.call
        attrs = call.attrs
        name = self._name(layer, index)
        data, weight = call.args
        in_shape, w_shape = static_shape(data), static_shape(weight)
        describe = f"{w_shape} on {in_shape}" if in_shape and w_shape else "dynamic shape"

        def dense(reason, implementation="relax dense schedule", density=None, shape=describe):
            return LayerDecision(name, "conv2d", shape, density, None, "dense", implementation, reason)

        groups = int(attrs.groups)
        depthwise = groups != 1 and in_shape and w_shape and groups == in_shape[1] == w_shape[0] and w_shape[1] == 1
        if depthwise:
            if is_const(weight) and dtype(data) == "float32" and str(attrs.data_layout) == "NCHW":
                layer.kind = "depthwise"  # may run blocked between two rewritten convs, see layout_chain
                layer.layout = layer.epilogue_layout()
                layer.depthwise_conv = DepthwiseConv(
                    in_shape[1], in_shape[2], in_shape[3], const_array(weight),
                    tuple(int(p) for p in attrs.padding), tuple(int(x) for x in attrs.strides),
                    tuple(int(x) for x in attrs.dilation), layer.bias, layer.activation, batch=in_shape[0])
            return dense("depthwise conv: memory-bound, no channel reduction for SIMD blocks to skip")
        if not is_const(weight):
            return dense("weight is not a constant (bind parameters first)")
        if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout or attrs.data_layout)) != \
                ("NCHW", "OIHW", "NCHW"):
            return dense(f"layout {attrs.data_layout}/{attrs.kernel_layout} (needs NCHW/OIHW)")
        if dtype(data) != "float32" or dtype(weight) != "float32" or \
                (attrs.out_dtype and str(attrs.out_dtype) not in ("", "float32", "void")):
            return dense(f"dtype {dtype(data)} (only float32 is supported)")
        if in_shape is None or w_shape is None:
            return dense("dynamic shape")
        w = const_array(weight)
        if groups != 1:  # the same conv over all input channels, with the weight zero outside each group
            w = block_diagonal(w, groups)
            w_shape = list(w.shape)
        padding = [int(p) for p in attrs.padding]
        spec = Conv2dSpec.create(in_shape, w_shape, [int(s) for s in attrs.strides],
                                 (padding[0], padding[1], padding[2], padding[3]),
                                 [int(d) for d in attrs.dilation])
        sparse_weight = self._sparse_weight(spec, w)
        v = sparse_weight.vector_width
        density = sparse_weight.density
        predicted = {}
        # latency tables and the pruner measure groups=1 convs: a grouped or transposed conv is part of the "rest
        # of the model", decided here without a table
        op = "grouped_conv2d" if groups != 1 else "conv2d_transpose" if name in self._subpixel else "conv2d"
        shape = spec.describe() + (f" g{groups}" if groups != 1 else "")
        if groups != 1:
            # the kernel skips the blocks outside each group whatever the weight's density: keeping them would
            # multiply zeros
            decision, reason = "sparse", f"grouped ({groups}): block-diagonal weight, the kernel skips the " \
                                         f"blocks outside each group"
        elif not self.sparse:
            decision, reason = "dense", "sparsity disabled (--no-sparse)"
        elif op == "conv2d" and self.latency_table is not None:
            decision, predicted, reason = self.latency_table.choose(spec, density, v)
        elif density <= self.threshold:
            decision, reason = "sparse", f"density {density:.3f} <= threshold {self.threshold:.2f}"
        else:
            decision, reason = "dense", f"density {density:.3f} > threshold {self.threshold:.2f}"
        if op == "conv2d_transpose":
            reason = f"as a sub-pixel conv ({spec.out_channels} channels = stride^2 phases); {reason}"
        tile, why = self._winograd_tile(op, spec, density, decision, predicted) if op == "conv2d" else (None, None)
        if decision.startswith("winograd"):  # the table measured Winograd fastest (run it unless told otherwise)
            decision = "dense"
        layer.spec = spec
        layer.layout = layer.epilogue_layout()
        layer.sparse_weight = sparse_weight if decision == "sparse" else BlockSparseWeight.from_dense(w, v, True)
        implementation = "alcs sparse kernel" if decision == "sparse" else "alcs dense kernel (all blocks)"
        if tile is not None:  # the transformed weight is dense: the masked weight's zeros are not skipped
            layer.winograd, layer.weight = tile, w
            decision, implementation = "dense", f"alcs Winograd F({tile}x{tile}, 3x3)"
            reason = f"{reason}; {why}" if why else reason
        fused = "+".join(["conv"] + (["bias"] if layer.bias is not None else []) +
                         ([layer.activation] if layer.activation else []))
        return LayerDecision(name, op, shape, round(density, 4), v, decision,
                             f"{implementation}, {fused}", reason, predicted, spec,
                             algorithm=f"winograd{layer.winograd}" if layer.winograd else "direct")

    def _winograd_tile(self, op, spec, density, decision, predicted) -> tuple:
        """``(tile or None, why to add to the reason or None)`` for a groups=1 conv decided ``decision``: the tile
        asked for (``winograd`` 2 or 4) where Winograd applies; with ``"auto"`` the table's measured choice when the
        table has Winograd times for the layer, else the estimate's (:func:`choose_algorithm`)."""
        if self.winograd == "off":
            return None, None
        if self.winograd != "auto":
            why = winograd_applies(spec, self.target_info.vector_width)
            return (None, None) if why else (self.winograd, f"Winograd F({self.winograd}x{self.winograd}) requested")
        if decision.startswith("winograd"):
            return int(decision[len("winograd"):]), None
        if any(name.startswith("winograd") for name in predicted):  # measured, and slower than what was decided
            return None, None
        tile, why = choose_algorithm(spec, density if decision == "sparse" else 1.0, self.target_info)
        return tile, why if tile is not None else None

    def _sparse_weight(self, spec, w) -> BlockSparseWeight:
        """The weight in this layer's group width: the target's wide groups where the output channels allow
        them and the weight's zeros are structured in them (:func:`widest_block_format`; a model pruned in V-wide
        groups keeps V-wide blocks) and, with a latency table, the table has that width for this layer."""
        widths = self.target_info.group_widths()
        if len(widths) > 1 and self.latency_table is not None and hasattr(self.latency_table, "layers"):
            measured = [v for v in widths if layer_key(spec, v) in self.latency_table.layers]
            widths = tuple(v for v in widths[:-1] if v in measured or not measured) + widths[-1:]
        return widest_block_format(w, widths)

    # -- rewrite ----------------------------------------------------------------------------------------------
    def transform_module(self, mod, ctx):
        return self.rewrite(mod)

    def _apply_tuning(self, layer):
        row = layer.report_row
        schedule, why = self.tuning.schedule_for(row.name, layer_key(layer.spec, row.vector_width), layer.layout)
        layer.schedule = schedule
        how = "estimated" if getattr(self.tuning, "settings", {}).get("estimate") else "tuned"
        row.implementation += f"; default schedule ({why})" if schedule is None else \
            f"; {how} schedule {schedule.describe()}"

    def rewrite(self, mod):
        """Match, decide, plan layouts and rewrite every Relax function of ``mod``; fills :attr:`report`."""
        self.report = CompileReport(target=self.target_info.family)
        subpixel = SubpixelConvTranspose()
        mod = subpixel.rewrite(mod)
        self._subpixel = subpixel.rewritten
        plans = {}
        index = {"conv2d": 0, "linear": 0, "other": 0, "concat": 0}
        for gv, func in mod.functions.items():
            if not isinstance(func, relax.Function):
                continue
            layers = self._match(func)
            for layer in layers:
                counter = layer.kind
                layer.report_row = self._decide(layer, index[counter])
                index[counter] += 1
                self.report.layers.append(layer.report_row)
                if layer.spec is not None:
                    plans[layer.last_var] = layer
                    for v in layer.fused_vars:
                        plans[v] = None  # folded into the call emitted at layer.last_var
            plan_layouts([layer for layer in layers if layer.spec is not None],
                         [layer for layer in layers if layer.kind == "depthwise"], self._users, self._single_user,
                         self.target_info.vector_width, plans, self._pools,
                         [layer for layer in layers if layer.kind == "concat"], self._excitations)
            for layer in layers:
                if layer.spec is not None and layer.kind == "conv2d":
                    layer.report_row.kernel = layer.layout
                    if self.tuning is not None and not layer.winograd and layer.fused_depthwise is None:
                        # records are direct-kernel tiles
                        self._apply_tuning(layer)
        if not any(plans.values()):
            return mod
        return rewrite_functions(_Rewriter(mod, plans, self.target_info), mod)


def _blocked_depthwise(layer):
    """The depthwise kernel and its constants (weight [CB, Kh, Kw, V], bias [C]) for a chained layer."""
    conv = layer.depthwise_conv
    n, c, v = conv.batch, conv.channels, layer.layout.out_block
    (kh, kw), padding = conv.kernel, conv.padding
    hp, wp = conv.height + padding[0] + padding[2], conv.width + padding[1] + padding[3]
    ho, wo = conv.out_height, conv.out_width
    geom = DepthwiseGeometry(n, c // v, v, hp, wp, (kh, kw), conv.stride, conv.dilation, ho, wo,
                             layer.layout.output_pad)
    weight = conv.weight.reshape(c // v, v, kh, kw).transpose(0, 2, 3, 1)
    bias = np.zeros(c, np.float32) if conv.bias is None else conv.bias
    out_shape = bordered_shape(n, c // v, ho, wo, layer.layout.output_pad, (v,))
    return geom, [np.ascontiguousarray(weight, np.float32), bias], out_shape


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, plans, info):
        super().__init__(mod)
        self.plans = plans
        self.info = info
        self.kernels = {}  # dedup identical kernels: key -> GlobalVar
        self.names = {}  # kernel symbol -> how many kernels of the module carry it

    def _unique(self, name: str) -> str:
        """``name``, or ``name_2``, ``name_3``.. for further kernels of the same kind with other shapes."""
        count = self.names[name] = self.names.get(name, 0) + 1
        return name if count == 1 else f"{name}_{count}"

    def visit_var_binding_(self, binding):
        if binding.var not in self.plans:
            return super().visit_var_binding_(binding)
        layer = self.plans[binding.var]
        if layer is None:
            return None  # folded into a later call
        if layer.kind == "concat":  # the inputs are NCHW[V]c with one border: join them along the channel blocks
            parts = [self.visit_expr(part) for part in layer.call.args[0].fields]
            self.set_var_remap(binding.var, emit_as(self.builder_, relax.op.concat(parts, axis=1), binding.var))
            return None
        if layer.kind == "scale":  # NCHW[b]c x gate [N, C, 1, 1] viewed as [N, C/b, 1, 1, b]
            data = self.visit_expr(next(a for a in layer.call.args if not a.same_as(layer.gate)))
            n, cb, _, _, b = static_shape(data)
            gate = self.builder_.emit(relax.op.reshape(self.visit_expr(layer.gate), (n, cb, 1, 1, b)))
            self.set_var_remap(binding.var, emit_as(self.builder_, relax.op.multiply(data, gate), binding.var))
            return None
        if layer.kind == "depthwise" and layer.expand is not None:
            return self._emit_expand_depthwise(binding, layer, self.visit_expr(layer.expand.call.args[0]))
        data = self.visit_expr(layer.call.args[0])
        if layer.kind == "depthwise":
            return self._emit_depthwise(binding, layer, data)
        if layer.kind == "maxpool":
            return self._emit_max_pool(binding, layer, data)
        if layer.kind == "mean":  # of NCHW[b]c over the image: [N, C/b, 1, 1, b], laid out as NCHW [N, C, 1, 1]
            mean = self.builder_.emit(relax.op.mean(data, axis=[2, 3], keepdims=True))
            call = relax.op.reshape(mean, static_shape(layer.call))
            self.set_var_remap(binding.var, emit_as(self.builder_, call, binding.var))
            return None
        if layer.winograd:
            return self._emit_winograd(binding, layer, data)
        if layer.kind == "linear":  # [N, K] -> [N, K, 1, 1]: a view, no copy
            data = self.builder_.emit(relax.op.reshape(data, layer.spec.input_shape))
        kernel = sparse_conv2d_kernel(layer.sparse_weight, layer.spec, layer.layout, bias=layer.bias,
                                      slope=layer.slope, target=self.info, schedule=layer.schedule)
        gv = self._function((kernel.geometry, kernel.schedule, layer.layout.bias, layer.layout.activation),
                            lambda: kernel.func)
        layer.report_row.symbol = gv.name_hint
        args = [data] + [relax.const(a) for a in kernel.packed.arrays()]
        if layer.residual is not None:
            args.append(self.visit_expr(layer.residual))
        call = relax.call_tir(gv, args, relax.TensorType(kernel.output_shape, "float32"))
        if layer.kind == "linear":
            call = relax.op.reshape(self.builder_.emit(call), kernel.output_shape[:2])
        new_var = emit_as(self.builder_, call, binding.var)
        self.set_var_remap(binding.var, new_var)
        return None

    def _function(self, key, build, name=None):
        """The module's GlobalVar for the PrimFunc ``build()`` makes, one per distinct ``key`` (built only for a new
        key), named ``name`` or its symbol: opaque (never fused by FuseOps) and already scheduled (the dense
        schedule rules leave it alone)."""
        gv = self.kernels.get(key)
        if gv is None:
            func = build()
            name = name or func.attrs["global_symbol"]
            func = func.without_attr("global_symbol").with_attrs({"op_pattern": 8, "tirx.is_scheduled": True})
            gv = self.kernels[key] = self.builder_.add_func(func, self._unique(name))
        return gv

    def _block_channels(self, data, pad, block):
        """NCHW ``data`` zero-padded by ``pad`` (top, left, bottom, right) as NCHW[block]c: what a blocked kernel
        reads when its producer writes NCHW."""
        n, c, h, w = static_shape(data)
        top, left, bottom, right = pad
        if any(pad):
            data = self.builder_.emit(relax.op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right]))
        data = self.builder_.emit(relax.op.reshape(data, (n, c // block, block, h + top + bottom, w + left + right)))
        return self.builder_.emit(relax.op.permute_dims(data, (0, 1, 3, 4, 2)))

    def _emit_winograd(self, binding, layer, data):
        spec = layer.spec
        layout = winograd_layout(spec, layer.layout, layer.sparse_weight.vector_width, self.info.vector_width)
        if layer.layout.input_block == 1:  # NCHW (padded or not) -> padded NCHW[b]c, what the input transform reads
            data = self._block_channels(data, (0, 0, 0, 0) if layer.layout.input_prepadded else spec.padding,
                                        layout.input_block)
        conv = winograd_conv2d(layer.weight, spec, layout, tile=layer.winograd, bias=layer.bias, slope=layer.slope,
                               target=self.info)
        geom = conv.geometry
        stage_in = self._function(("winograd_input", geom.tile, geom.batch, geom.in_blocks, geom.input_block,
                                   geom.buffer_height, geom.buffer_width, geom.origin, geom.tiles_high,
                                   geom.tiles_wide), lambda: conv.input_func)
        gemm = self._function((conv.gemm.geometry, conv.gemm.schedule, False, None), lambda: conv.gemm.func)
        stage_out = self._function(("winograd_output", geom, layout.bias, layout.activation),
                                   lambda: conv.output_func)
        layer.report_row.symbol = stage_out.name_hint
        v = self.builder_.emit(relax.call_tir(stage_in, [data], relax.TensorType(geom.transformed_input_shape,
                                                                                   "float32")))
        mv = self.builder_.emit(relax.call_tir(gemm, [v] + [relax.const(a) for a in conv.gemm.packed.arrays()],
                                               relax.TensorType(geom.gemm_output_shape, "float32")))
        args = [mv, relax.const(conv.bias)]
        if layer.residual is not None:
            args.append(self.visit_expr(layer.residual))
        call = relax.call_tir(stage_out, args, relax.TensorType(geom.output_shape, "float32"))
        self.set_var_remap(binding.var, emit_as(self.builder_, call, binding.var))
        return None

    def _emit_max_pool(self, binding, layer, data):
        attrs = layer.call.attrs
        n, c, h, w = static_shape(layer.call.args[0])
        _, _, ho, wo = static_shape(layer.call)
        v = layer.layout.out_block
        geom = PoolGeometry(n, c // v, v, h, w, tuple(int(k) for k in attrs.pool_size),
                            tuple(int(k) for k in attrs.strides), tuple(int(k) for k in attrs.dilation),
                            tuple(int(k) for k in attrs.padding), ho, wo, layer.layout.output_pad,
                            layer.layout.input_border or (0, 0, 0, 0))
        kh, kw = geom.kernel
        gv = self._function(("maxpool", geom), lambda: max_pool_nchwc_template(geom),
                            f"alcs_maxpool_k{kh}x{kw}s{geom.stride[0]}_v{v}")
        call = relax.call_tir(gv, [data], relax.TensorType(geom.output_shape, "float32"))
        self.set_var_remap(binding.var, emit_as(self.builder_, call, binding.var))
        return None

    def _emit_expand_depthwise(self, binding, layer, data):
        """The expand conv ``layer.expand`` and the depthwise ``layer`` as one kernel on the expand's input."""
        expand = layer.expand
        kernel = expand_depthwise_kernel(expand.sparse_weight, expand.spec, expand.layout, layer.depthwise_conv,
                                         bias=expand.bias, slope=expand.slope, out_block=layer.layout.out_block,
                                         output_pad=layer.layout.output_pad, target=self.info)
        gv = self._function(("expand_depthwise", kernel.geometry, expand.layout.activation, layer.activation,
                             expand.layout.activation == "prelu"), lambda: kernel.func)
        layer.report_row.symbol = expand.report_row.symbol = gv.name_hint
        call = relax.call_tir(gv, [data] + [relax.const(a) for a in kernel.arrays],
                              relax.TensorType(kernel.output_shape, "float32"))
        return self._emit_depthwise_output(binding, layer, call, kernel.output_shape)

    def _emit_depthwise(self, binding, layer, data):
        geom, consts, out_shape = _blocked_depthwise(layer)
        if layer.block_input:  # NCHW -> padded NCHW[V]c
            data = self._block_channels(data, layer.depthwise_conv.padding, geom.vector_width)
        kh, kw = geom.kernel
        gv = self._function((geom, layer.activation),
                            lambda: depthwise_nchwc_template(geom, activation=layer.activation),
                            f"alcs_dwconv_k{kh}x{kw}s{geom.stride[0]}_v{geom.vector_width}" +
                            (f"_{layer.activation}" if layer.activation else ""))
        layer.report_row.symbol = gv.name_hint
        call = relax.call_tir(gv, [data] + [relax.const(a) for a in consts], relax.TensorType(out_shape, "float32"))
        return self._emit_depthwise_output(binding, layer, call, out_shape)

    def _emit_depthwise_output(self, binding, layer, call, out_shape):
        if layer.unblock_output:  # NCHW[V]c -> NCHW
            n, cb, ho, wo, v = out_shape
            blocked = self.builder_.emit(call)
            call = relax.op.reshape(self.builder_.emit(relax.op.permute_dims(blocked, (0, 1, 4, 2, 3))),
                                    (n, cb * v, ho, wo))
        new_var = emit_as(self.builder_, call, binding.var)
        self.set_var_remap(binding.var, new_var)
        return None
