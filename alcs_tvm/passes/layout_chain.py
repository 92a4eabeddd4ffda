"""The layouts rewritten convs share with their neighbours, planned once the per-layer decisions are made.

A rewritten conv whose every user is a rewritten conv writes what those convs read best: NCHW[V]c (one vector
store per pixel instead of a lane transpose) with the widest zero border its readers need already in place (no
pad copy in them). Its users may read it as their data input (each with its own padding) or as the shortcut fused
into their epilogue (a residual block's add), so ResNet's and MobileNetV2's blocks stay channel-blocked from one
conv to the next. A depthwise conv between two rewritten convs (MobileNetV2's expand -> depthwise -> project) runs
the channel-blocked depthwise kernel in the same layout.

Everything here edits the :class:`~alcs_tvm.layer.KernelLayout` of the matched layers and their report rows; it
emits no IR.
"""
from __future__ import annotations

from dataclasses import replace

__all__ = ["plan_layouts"]


def plan_layouts(layers: list, depthwise: list, users: dict, single_user, vector_width: int, plans: dict):
    """Chain ``layers`` (matched convs with a spec, decided) and the ``depthwise`` convs between them.

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
    for producer in convs:
        if producer.layout.output_blocked:
            continue
        var = producer.last_var
        readers, shortcut_readers = by_input.get(var, []), by_residual.get(var, [])
        uses = users.get(var, [])
        expected = [c.conv_var for c in readers] + [c.residual_binding for c in shortcut_readers]
        if not uses or any(u is None for u in uses) or len(uses) != len(expected) or \
                any(not any(u.same_as(e) for e in expected) for u in uses):
            continue  # some user is not a rewritten conv: keep NCHW
        border = tuple(max(c.spec.padding[i] for c in readers) if readers else 0 for i in range(4))
        blocked = producer.spec.out_channels % v == 0 and \
            all(c.sparse_weight.vector_width % v == 0 for c in readers + shortcut_readers)
        if not blocked and shortcut_readers:
            continue  # shortcuts are read NCHW unpadded or blocked with a border
        producer.layout = replace(producer.layout, output_pad=border, output_blocked=blocked)
        for c in readers:
            c.layout = replace(c.layout, input_prepadded=True, input_block=v if blocked else 1,
                               input_border=border if border != tuple(c.spec.padding) else None)
        for c in shortcut_readers:
            c.layout = replace(c.layout, residual="blocked", residual_pad=border)
        layout = f"NCHW{v}c" if blocked else "NCHW"
        names = ", ".join(c.report_row.name for c in readers + shortcut_readers)
        producer.report_row.implementation += f"; writes {layout} padded for {names}"
    for layer in convs:  # a group wider than V is written as several V-channel blocks of the shared layout
        if layer.sparse_weight.vector_width != v:
            layer.layout = replace(layer.layout, out_block=v)


def _chain_depthwise(convs, depthwise, single_user, only_conv_consumer, v, plans):
    """conv -> depthwise -> conv: when the depthwise conv is the producer's only consumer and feeds only a
    rewritten conv, all three run channel-blocked with the borders written by the producers."""
    planned = {layer.last_var: layer for layer in convs}
    for dw in depthwise:
        producer = planned.get(dw.call.args[0])
        if producer is None or single_user(producer.last_var) is None or \
                not single_user(producer.last_var).same_as(dw.conv_var):
            continue
        consumer = only_conv_consumer(dw.last_var)
        if consumer is None or dw.depthwise[0][1] % v or producer.sparse_weight.vector_width % v or \
                consumer.sparse_weight.vector_width % v:
            continue
        padding = dw.depthwise[2]
        producer.layout = replace(producer.layout, output_blocked=True, output_pad=tuple(padding))
        consumer.layout = replace(consumer.layout, input_prepadded=True, input_block=v)
        dw.layout = replace(dw.layout, output_blocked=True, output_pad=tuple(consumer.spec.padding), out_block=v)
        dw.report_row.reason = "depthwise conv (no channel reduction for SIMD blocks to skip), kept in its " \
                               "neighbours' blocked layout"
        dw.report_row.implementation = f"alcs depthwise NCHW{v}c kernel (between {producer.report_row.name} " \
                                       f"and {consumer.report_row.name})"
        producer.report_row.implementation += f"; writes NCHW{v}c padded for {dw.report_row.name}"
        plans[dw.last_var] = dw
        for var in dw.fused_vars:
            plans[var] = None
