"""The layouts rewritten convs share with their neighbours, planned once the per-layer decisions are made.

A rewritten conv whose every user is a rewritten conv writes what those convs read best: NCHW[V]c (one vector
store per pixel instead of a lane transpose) with the widest zero border its readers need already in place (no
pad copy in them). Its users may read it as their data input (each with its own padding) or as the shortcut fused
into their epilogue (a residual block's add), so ResNet's and MobileNetV2's blocks stay channel-blocked from one
conv to the next. A depthwise conv next to a rewritten conv (MobileNetV2's expand -> depthwise -> project) runs
the channel-blocked depthwise kernel in the same layout (see :func:`_chain_depthwise` for the other cases), and a
max pool between rewritten convs (ResNet's stem -> pool -> first block) the blocked pool kernel.

Everything here edits the :class:`~alcs_tvm.layer.KernelLayout` of the matched layers and pools, the depthwise
layers' ``block_input``/``unblock_output`` and the report rows; it emits no IR.
"""
from __future__ import annotations

from dataclasses import replace

from ..layer import conv_output_size

__all__ = ["plan_layouts"]


def plan_layouts(layers: list, depthwise: list, users: dict, single_user, vector_width: int, plans: dict,
                 pools: list = ()):
    """Chain ``layers`` (matched convs with a spec, decided), the ``depthwise`` convs and the max ``pools`` between
    them.

    ``users``: var -> the vars of its users (``None`` for a function output); ``single_user(var)``: its one user or
    None; ``vector_width``: the target's V, the block of the channel-blocked layout (each conv's group width is a
    multiple of it); ``plans``: var -> layer emitted there (chained depthwise convs are added)."""
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

    _chain_depthwise(convs, depthwise, single_user, only_conv_consumer, vector_width, plans)
    v = vector_width

    def readers_of(var):
        """``(readers, shortcut readers)`` when every user of ``var`` is a rewritten conv reading it as its data
        input or as its fused shortcut, else None."""
        readers, shortcut_readers = by_input.get(var, []), by_residual.get(var, [])
        uses = users.get(var, [])
        expected = [c.conv_var for c in readers] + [c.residual_binding for c in shortcut_readers]
        if not uses or any(u is None for u in uses) or len(uses) != len(expected) or \
                any(not any(u.same_as(e) for e in expected) for u in uses):
            return None
        return readers, shortcut_readers

    def read_blocked(readers, shortcut_readers, border):
        for c in readers:
            c.layout = replace(c.layout, input_prepadded=True, input_block=v,
                               input_border=border if border != tuple(c.spec.padding) else None)
        for c in shortcut_readers:
            c.layout = replace(c.layout, residual="blocked", residual_pad=border)

    _chain_pools(convs, pools, single_user, readers_of, read_blocked, v, plans)
    for producer in convs:
        if producer.layout.output_blocked:
            continue
        found = readers_of(producer.last_var)
        if found is None:
            continue  # some user is not a rewritten conv: keep NCHW
        readers, shortcut_readers = found
        border = tuple(max(c.spec.padding[i] for c in readers) if readers else 0 for i in range(4))
        blocked = producer.spec.out_channels % v == 0 and \
            all(c.sparse_weight.vector_width % v == 0 for c in readers + shortcut_readers)
        if not blocked and shortcut_readers:
            continue  # shortcuts are read NCHW unpadded or blocked with a border
        producer.layout = replace(producer.layout, output_pad=border, output_blocked=blocked)
        if blocked:
            read_blocked(readers, shortcut_readers, border)
        else:
            for c in readers:
                c.layout = replace(c.layout, input_prepadded=True, input_block=1,
                                   input_border=border if border != tuple(c.spec.padding) else None)
        layout = f"NCHW{v}c" if blocked else "NCHW"
        names = ", ".join(c.report_row.name for c in readers + shortcut_readers)
        producer.report_row.implementation += f"; writes {layout} padded for {names}"
    for layer in convs:  # a group wider than V is written as several V-channel blocks of the shared layout
        if layer.sparse_weight.vector_width != v:
            layer.layout = replace(layer.layout, out_block=v)


def _chain_depthwise(convs, depthwise, single_user, only_conv_consumer, v, plans):
    """Depthwise convs run the channel-blocked kernel where a neighbour shares its layout: between two rewritten
    convs (the producer writes the border, the consumer reads blocked), after a rewritten conv whose output only
    it reads (its output converted back to NCHW for the other ops: MobileNetV3's squeeze-excitation), or before a
    rewritten conv (its input converted from NCHW). With neither neighbour (ShuffleNet's, after a channel
    shuffle) it still does when its output is at most :data:`NARROW_OUTPUT` pixels wide: the NCHW schedule
    vectorizes along a row, which then fills few lanes, and the two conversions cost less."""
    planned = {layer.last_var: layer for layer in convs}
    for dw in depthwise:
        if dw.depthwise[0][1] % v or dw.residual is not None:  # the depthwise kernel adds no shortcut
            continue
        producer = planned.get(dw.call.args[0])
        if producer is not None and (single_user(producer.last_var) is None or
                                     not single_user(producer.last_var).same_as(dw.conv_var) or
                                     producer.sparse_weight.vector_width % v):
            producer = None
        consumer = only_conv_consumer(dw.last_var)
        if consumer is not None and consumer.sparse_weight.vector_width % v:
            consumer = None
        if producer is None and consumer is None and _output_width(dw) > NARROW_OUTPUT:
            continue
        padding = dw.depthwise[2]
        if producer is not None:
            producer.layout = replace(producer.layout, output_blocked=True, output_pad=tuple(padding))
            producer.report_row.implementation += f"; writes NCHW{v}c padded for {dw.report_row.name}"
        else:
            dw.block_input = True
        if consumer is not None:
            consumer.layout = replace(consumer.layout, input_prepadded=True, input_block=v)
            dw.layout = replace(dw.layout, output_blocked=True, output_pad=tuple(consumer.spec.padding), out_block=v)
        else:
            dw.layout = replace(dw.layout, output_blocked=True, output_pad=(0, 0, 0, 0), out_block=v)
            dw.unblock_output = True
        neighbours = [f"after {producer.report_row.name}"] if producer is not None else ["from NCHW"]
        neighbours += [f"before {consumer.report_row.name}"] if consumer is not None else ["back to NCHW"]
        dw.report_row.reason = "depthwise conv (no channel reduction for SIMD blocks to skip), run " \
                               "channel-blocked"
        dw.report_row.implementation = f"alcs depthwise NCHW{v}c kernel ({', '.join(neighbours)})"
        plans[dw.last_var] = dw
        for var in dw.fused_vars:
            plans[var] = None


def _chain_pools(convs, pools, single_user, readers_of, read_blocked, v, plans):
    """A max pool runs the channel-blocked kernel where a rewritten conv writes its input (and nothing else reads
    that) and rewritten convs read all of its output, as data or as a shortcut (ResNet's stem -> pool -> first
    block): the conv before writes NCHW[V]c without a border, the pool writes it with the border its readers need."""
    planned = {layer.last_var: layer for layer in convs}
    for pool in pools:
        producer = planned.get(pool.call.args[0])
        channels = producer.spec.out_channels if producer is not None else 0
        if producer is None or channels % v or producer.layout.output_blocked or \
                single_user(producer.last_var) is None or not single_user(producer.last_var).same_as(pool.conv_var) \
                or producer.sparse_weight.vector_width % v:
            continue
        found = readers_of(pool.last_var)
        if found is None or not found[0] or any(c.sparse_weight.vector_width % v for c in found[0] + found[1]):
            continue
        readers, shortcut_readers = found
        border = tuple(max(c.spec.padding[i] for c in readers) for i in range(4))
        producer.layout = replace(producer.layout, output_blocked=True, output_pad=(0, 0, 0, 0))
        pool.layout = replace(pool.layout, output_blocked=True, output_pad=border, out_block=v)
        read_blocked(readers, shortcut_readers, border)
        names = ", ".join(c.report_row.name for c in readers + shortcut_readers)
        producer.report_row.implementation += f"; writes NCHW{v}c for the max pool before {names}"
        plans[pool.last_var] = pool


#: a depthwise conv with no rewritten conv beside it runs the blocked kernel when its output is at most this wide
NARROW_OUTPUT = 32


def _output_width(dw) -> int:
    in_shape, w_shape, padding, strides, dilation = dw.depthwise
    return conv_output_size(in_shape[3] + padding[1] + padding[3], w_shape[3], strides[1], dilation[1])
