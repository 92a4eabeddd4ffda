"""The layouts rewritten convs share with their neighbours, planned once the per-layer decisions are made.

A rewritten conv whose every user is a rewritten conv writes what those convs read best: NCHW[V]c (one vector
store per pixel instead of a lane transpose) with the widest zero border its readers need already in place (no
pad copy in them). Its users may read it as their data input (each with its own padding) or as the shortcut fused
into their epilogue (a residual block's add), so ResNet's and MobileNetV2's blocks stay channel-blocked from one
conv to the next. A depthwise conv next to a rewritten conv (MobileNetV2's expand -> depthwise -> project) runs
the channel-blocked depthwise kernel in the same layout, or in NCHW[V/2]c or NCHW[V/4]c where its channels are no
multiple of V (see :func:`_chain_depthwise` for the other cases; MobileNetV3's squeeze-excitation after it stays
in its layout); where the conv before it is a 1x1 (or strided) conv it alone reads, the two run as one kernel
(:mod:`alcs_tvm.expand_depthwise`, whose rule on shapes decides), so the wide tensor between them is never
written; a max pool between rewritten convs (ResNet's stem -> pool -> first block) the blocked pool
kernel, and a channel concat of rewritten convs' outputs read by rewritten convs or such pools (SqueezeNet's fire
modules, Inception's blocks) joins their blocked outputs along the channel-block axis: N, C/V, H, W, V with the
border its readers need, which every input carries too (see :func:`_blocked_joins`).

Everything here edits the :class:`~alcs_tvm.layer.KernelLayout` of the matched layers, pools and concats, the
depthwise layers' ``block_input``/``unblock_output``, the report rows and the plans (the layers, pools, concats,
and squeeze-excitation means and scales emitted blocked); it emits no IR.
"""
from __future__ import annotations

from dataclasses import replace

from ..expand_depthwise import fusion_blocker
from ..frontend import layer_node_name

__all__ = ["plan_layouts"]


def plan_layouts(layers: list, depthwise: list, users: dict, single_user, vector_width: int, plans: dict,
                 pools: list = (), concats: list = (), excitations: list = ()):
    """Chain ``layers`` (matched convs with a spec, decided), the ``depthwise`` convs, and the max ``pools`` and
    channel ``concats`` between them.

    ``users``: var -> the vars of its users (``None`` for a function output); ``single_user(var)``: its one user or
    None; ``vector_width``: the target's V, the block of the channel-blocked layout (each conv's group width is a
    multiple of it); ``plans``: var -> layer emitted there (chained depthwise convs, pools and concats are added).
    Each concat's report row says how it runs. ``excitations``: the global means and channel scales a depthwise
    conv's squeeze-excitation may consist of (see :func:`_squeeze_excitation`)."""
    convs = [layer for layer in layers if layer.kind == "conv2d"]
    by_input, by_residual = {}, {}
    for layer in convs:
        by_input.setdefault(layer.call.args[0], []).append(layer)
        if layer.residual is not None:
            by_residual.setdefault(layer.residual, []).append(layer)

    def only_conv_consumer(var):
        """The rewritten conv that is ``var``'s one and only user, reading it as its data input."""
        user = single_user(var)
        matches = [] if user is None else [c for c in by_input.get(var, []) if c.conv_var.same_as(user)]
        return matches[0] if len(matches) == 1 else None

    def excitation(dw, b):
        return _squeeze_excitation(dw, b, users, excitations, only_conv_consumer)

    _chain_depthwise(convs, depthwise, single_user, only_conv_consumer, excitation, vector_width, plans)
    v = vector_width

    def readers_of(var, joins=None):
        """``(readers, shortcut readers, joins reading it)`` when every user of ``var`` is a rewritten conv reading
        it as its data input or as its fused shortcut, or one of ``joins`` (var -> pool or concat), else None."""
        joins = joins or {}
        readers, shortcut_readers = by_input.get(var, []), by_residual.get(var, [])
        uses = users.get(var, [])
        join_readers = [joins[u] for u in dict.fromkeys(u for u in uses if u is not None and u in joins)]
        expected = [c.conv_var for c in readers] + [c.residual_binding for c in shortcut_readers] + \
            [j.last_var for j in join_readers]
        if not uses or any(u is None for u in uses) or len(uses) != len(expected) or \
                any(not any(u.same_as(e) for e in expected) for u in uses):
            return None
        return readers, shortcut_readers, join_readers

    def read_blocked(readers, shortcut_readers, border):
        for c in readers:
            c.layout = replace(c.layout, input_prepadded=True, input_block=v,
                               input_border=border if border != tuple(c.spec.padding) else None)
        for c in shortcut_readers:
            c.layout = replace(c.layout, residual="blocked", residual_pad=border)

    joins = _blocked_joins(convs, list(pools) + list(concats), readers_of, v)

    borders = _shared_borders(joins, lambda var: [tuple(c.spec.padding) for c in by_input.get(var, [])])

    def border(var) -> tuple:
        """The zero border ``var``'s blocked tensor carries (see :func:`_shared_borders`)."""
        return borders.get(var) or \
            tuple(max((c.spec.padding[i] for c in by_input.get(var, [])), default=0) for i in range(4))

    def targets(var) -> str:
        """Who reads ``var``, for the report: conv names, the max pool before its readers, a concat's name."""
        readers, shortcut_readers, join_readers = readers_of(var, joins)
        names = [c.report_row.name for c in readers + shortcut_readers]
        for join in join_readers:
            if join.kind == "concat":
                names.append(join.report_row.name)
            elif readers_of(join.last_var, joins)[2]:  # read by another pool or a concat
                names.append(_pool_name(join))
            else:
                names.append(f"the max pool before {targets(join.last_var)}")
        return ", ".join(names)

    for var, join in joins.items():
        readers, shortcut_readers, _ = readers_of(var, joins)
        out_border = border(var)
        if join.kind == "maxpool":
            join.layout = replace(join.layout, output_blocked=True, output_pad=out_border, out_block=v,
                                  input_border=border(join.call.args[0]))
        else:
            join.layout = replace(join.layout, output_blocked=True, output_pad=out_border, out_block=v)
            inputs = ", ".join(_producer_name(i, convs, joins) for i in join.call.args[0].fields)
            padded = f" with a {_describe_border(out_border)} zero border" if any(out_border) else ""
            join.report_row.decision = "blocked"
            join.report_row.implementation = f"joins the NCHW{v}c outputs of {inputs}{padded} for {targets(var)}"
            join.report_row.reason = "every input is written channel-blocked by a rewritten conv (or a blocked " \
                                     "pool or concat) and every reader reads it so"
        read_blocked(readers, shortcut_readers, out_border)
        plans[var] = join
    for producer in convs:
        if producer.layout.output_blocked:
            continue
        found = readers_of(producer.last_var, joins)
        if found is None:
            continue  # some user is not a rewritten conv or a blocked pool or concat: keep NCHW
        readers, shortcut_readers, join_readers = found
        out_border = border(producer.last_var)
        blocked = bool(join_readers) or producer.spec.out_channels % v == 0 and \
            all(c.sparse_weight.vector_width % v == 0 for c in readers + shortcut_readers)
        if not blocked and shortcut_readers:
            continue  # shortcuts are read NCHW unpadded or blocked with a border
        producer.layout = replace(producer.layout, output_pad=out_border, output_blocked=blocked)
        if blocked:
            read_blocked(readers, shortcut_readers, out_border)
        else:
            for c in readers:
                c.layout = replace(c.layout, input_prepadded=True, input_block=1,
                                   input_border=out_border if out_border != tuple(c.spec.padding) else None)
        layout = f"NCHW{v}c" if blocked else "NCHW"
        how = "padded for" if not join_readers else "for"
        producer.report_row.implementation += f"; writes {layout} {how} {targets(producer.last_var)}"
    for layer in convs:  # a group wider than V is written as several V-channel blocks of the shared layout (or
        # a depthwise conv's narrower ones, set above)
        if layer.sparse_weight.vector_width != v and not layer.layout.out_block:
            layer.layout = replace(layer.layout, out_block=v)


def _blocked_joins(convs, candidates, readers_of, v) -> dict:
    """The max pools and channel concats (``candidates``) that run channel-blocked, as var -> pool or concat.

    One does when every input is written channel-blocked - by a rewritten conv (output channels and group width
    multiples of V, not chained to a depthwise conv) or by another such pool or concat - and every reader of its
    input and of its output reads channel-blocked: a rewritten conv (group width a multiple of V) or another such
    pool or concat. The largest such set: start from all candidates and drop those that fail until none does;
    the reason a concat stays NCHW goes into its report row."""
    planned = {layer.last_var: layer for layer in convs}
    joins = {join.last_var: join for join in candidates}
    why_not = {}

    def written_blocked(var) -> bool:
        conv = planned.get(var)
        if conv is not None:
            return conv.spec.out_channels % v == 0 and conv.sparse_weight.vector_width % v == 0 and \
                not conv.layout.output_blocked
        return var in joins

    def read_blocked(var) -> bool:
        found = readers_of(var, joins)
        return found is not None and all(c.sparse_weight.vector_width % v == 0 for c in found[0] + found[1])

    def failure(join):
        inputs = [join.call.args[0]] if join.kind == "maxpool" else list(join.call.args[0].fields)
        if not all(written_blocked(i) for i in inputs):
            return f"an input is not written channel-blocked (a rewritten conv with channels a multiple of {v}, " \
                   f"or a blocked pool or concat)"
        if not all(read_blocked(i) for i in inputs):
            return "an input has readers that read NCHW"
        if not read_blocked(join.last_var):
            return "a reader is not a rewritten conv or a blocked max pool or concat"
        return None

    changed = True
    while changed:
        changed = False
        for var, join in list(joins.items()):
            why = failure(join)
            if why is not None:
                del joins[var]
                why_not[var] = why
                changed = True
    for var, why in why_not.items():
        row = next(j for j in candidates if j.last_var.same_as(var)).report_row
        if row is not None:
            row.reason = why
    return joins


def _shared_borders(joins, paddings) -> dict:
    """var -> the zero border its blocked tensor carries, for the inputs and outputs of the blocked concats in
    ``joins``: a concat copies its inputs' blocks with their borders, so its output and its inputs (and, through an
    input read by another concat, that concat's) carry one border, the widest any of them needs: the widest
    ``paddings(var)`` (the paddings of the convs reading ``var`` as data) over the group. Max pools and shortcuts
    read any border."""
    parent = {}

    def root(var):
        while not parent.setdefault(var, var).same_as(var):
            var = parent[var]
        return var

    for var, join in joins.items():
        if join.kind == "concat":
            for part in join.call.args[0].fields:
                parent[root(part)] = root(var)
    widest = {}
    for var in parent:
        group = root(var)
        widest[group] = tuple(max(p[i] for p in [widest.get(group, (0, 0, 0, 0))] + paddings(var)) for i in range(4))
    return {var: widest[root(var)] for var in parent}


def _producer_name(var, convs, joins) -> str:
    for conv in convs:
        if conv.last_var.same_as(var):
            return conv.report_row.name
    join = joins[var]
    return join.report_row.name if join.kind == "concat" else _pool_name(join)


def _pool_name(pool) -> str:
    name = layer_node_name(pool.call)
    return f"max pool {name}" if name else "a max pool"


def _describe_border(border) -> str:
    return f"{border[0]}-pixel" if len(set(border)) == 1 else f"{border} (top, left, bottom, right)"


def _chain_depthwise(convs, depthwise, single_user, only_conv_consumer, excitation, v, plans):
    """Depthwise convs run the channel-blocked kernel where a neighbour shares its layout: between two rewritten
    convs (the producer writes the border, the consumer reads blocked), after a rewritten conv whose output only
    it reads (its output converted back to NCHW for the other ops; MobileNetV3's squeeze-excitation before a
    rewritten conv stays blocked instead, see :func:`_squeeze_excitation`), or before a rewritten conv (its input
    converted from NCHW). With neither neighbour (ShuffleNet's, after a channel shuffle) it still does when its
    output is at most :data:`NARROW_OUTPUT` pixels wide: the NCHW schedule vectorizes along a row, which then
    fills few lanes, and the two conversions cost less.

    A producer that passes :func:`~alcs_tvm.expand_depthwise.fusion_blocker` (a 1x1 or strided conv without a
    shortcut) is emitted with the depthwise conv as one kernel (``dw.expand``; the producer's binding emits
    nothing): its layout still says how its input is read, the depthwise conv's how the output is written.

    The block is :func:`depthwise_block`'s: V, or V/2 or V/4 for channels that are no multiple of V
    (MobileNetV3's 72, ShuffleNet's 136: V/2), in which its neighbours write and read it too (a group of V or 2V
    channels, even a partial last one, is stored as blocks of that width)."""
    planned = {layer.last_var: layer for layer in convs}
    for dw in depthwise:
        b = depthwise_block(dw.depthwise_conv.channels, v)
        if b is None or dw.residual is not None:  # the depthwise kernel adds no shortcut
            continue
        producer = planned.get(dw.call.args[0])
        if producer is not None and (single_user(producer.last_var) is None or
                                     not single_user(producer.last_var).same_as(dw.conv_var) or
                                     producer.sparse_weight.vector_width % b):
            producer = None
        consumer = only_conv_consumer(dw.last_var)
        if consumer is not None and consumer.sparse_weight.vector_width % b:
            consumer = None
        se = excitation(dw, b) if consumer is None else None
        if se is not None:
            mean, scale, consumer = se
            plans[mean.conv_var], plans[scale.conv_var] = mean, scale  # emitted on the blocked tensor
        if producer is None and consumer is None and dw.depthwise_conv.out_width > NARROW_OUTPUT:
            continue
        padding = dw.depthwise_conv.padding
        if producer is not None:
            producer.layout = replace(producer.layout, output_blocked=True, output_pad=tuple(padding), out_block=b)
            why_not = _fusion_blocker(producer, dw)
            if why_not is None:  # one kernel: the wide tensor between them is never written
                dw.expand, producer.fused_depthwise = producer, dw
                plans[producer.last_var] = None
                producer.report_row.implementation += f"; fused with {dw.report_row.name}: one kernel writing " \
                                                      f"its NCHW{b}c output (the expanded rows stay in a ring " \
                                                      f"per channel group)"
            else:
                producer.report_row.implementation += f"; writes NCHW{b}c padded for {dw.report_row.name} " \
                                                      f"(not fused: {why_not})"
        else:
            dw.block_input = True
        if consumer is not None:
            consumer.layout = replace(consumer.layout, input_prepadded=True, input_block=b)
            dw.layout = replace(dw.layout, output_blocked=True, output_pad=tuple(consumer.spec.padding), out_block=b)
        else:
            dw.layout = replace(dw.layout, output_blocked=True, output_pad=(0, 0, 0, 0), out_block=b)
            dw.unblock_output = True
        neighbours = [f"fused with {producer.report_row.name}" if dw.expand is not None else
                      f"after {producer.report_row.name}"] if producer is not None else ["from NCHW"]
        through = f"its squeeze-excitation NCHW{b}c, " if se is not None else ""
        neighbours += [f"{through}before {consumer.report_row.name}"] if consumer is not None else ["back to NCHW"]
        dw.report_row.reason = "depthwise conv (no channel reduction for SIMD blocks to skip), run " \
                               "channel-blocked"
        kernel = "expand + depthwise" if dw.expand is not None else "depthwise"
        dw.report_row.implementation = f"alcs {kernel} NCHW{b}c kernel ({', '.join(neighbours)})"
        plans[dw.last_var] = dw
        for var in dw.fused_vars:
            plans[var] = None


def _fusion_blocker(producer, dw) -> str | None:
    """Why the conv ``producer`` does not run in one kernel with the depthwise conv ``dw`` it alone feeds
    (:func:`~alcs_tvm.expand_depthwise.fusion_blocker`, on shapes), or None."""
    if producer.kind != "conv2d" or producer.winograd:
        return "not a direct conv"
    return fusion_blocker(producer.spec, producer.layout, dw.depthwise_conv)


def _squeeze_excitation(dw, b, users, excitations, only_conv_consumer):
    """``(mean, scale, consumer)`` when the depthwise conv's output feeds MobileNetV3's squeeze-excitation and
    nothing else: a global mean (whose [N, C/b, 1, 1, b] result is NCHW [N, C, 1, 1] in memory, so the gate's
    convs read it as it is) and the scale ``y * gate`` whose one reader is a rewritten conv without padding
    (the mean reads no border) and that conv. The three then stay NCHW[b]c; else None."""
    var = dw.last_var
    uses = users.get(var, [])
    if len(uses) != 2 or any(u is None for u in uses):
        return None
    mean = next((m for m in excitations if m.kind == "mean" and m.call.args[0].same_as(var)), None)
    scale = next((s for s in excitations if s.kind == "scale" and not s.gate.same_as(var) and
                  any(a.same_as(var) for a in s.call.args)), None)
    if mean is None or scale is None or not all(any(u.same_as(op.conv_var) for u in uses) for op in (mean, scale)):
        return None
    consumer = only_conv_consumer(scale.conv_var)
    if consumer is None or any(consumer.spec.padding) or consumer.sparse_weight.vector_width % b:
        return None
    return mean, scale, consumer


#: a depthwise conv with no rewritten conv beside it runs the blocked kernel when its output is at most this wide
NARROW_OUTPUT = 32

#: the narrowest channel block a depthwise conv runs in, as a fraction of V: a block of V / 4 lanes still beats
#: the NCHW schedule, which vectorizes along a row and makes its neighbours convert their layouts
#: (see :func:`depthwise_block`)
NARROWEST_DEPTHWISE_BLOCK = 4

#: and in lanes: no block narrower than a 128-bit register (NEON's V = 4 is already the narrowest)
NARROWEST_DEPTHWISE_LANES = 4


def depthwise_block(channels: int, v: int) -> int | None:
    """The channel block a depthwise conv over ``channels`` runs in: the widest of V, V/2, .. down to
    V / :data:`NARROWEST_DEPTHWISE_BLOCK` and :data:`NARROWEST_DEPTHWISE_LANES` that divides them (MobileNetV3's
    72, 88 and 120 channels run in blocks of 8 on AVX-512, 100 in blocks of 4), or None (it stays NCHW). Its
    neighbours write and read that block."""
    narrowest = max(-(-v // NARROWEST_DEPTHWISE_BLOCK), min(v, NARROWEST_DEPTHWISE_LANES))
    b = v
    while b >= narrowest:
        if channels % b == 0:
            return b
        if b % 2:
            break
        b //= 2
    return None
