"""Hand-written CPU schedules for everything in a legalized Relax module that is not the sparse conv.

Relax's default CPU build schedules nothing: every PrimFunc produced by ``LegalizeOps`` is compiled as the naive
loop nest it was written as (scalar, single-threaded, full-size intermediates). This module gives each such
PrimFunc a fixed, untuned ``tvm.s_tir.Schedule``:

* **injective / elementwise** (add, relu, clip, residual adds, pads, reshapes, layout transforms): producers are
  inlined into consumers; the spatial loops are fused, the outer part runs in parallel and the innermost loop is
  vectorized when a whole number of lanes divides it (else left scalar for LLVM).
* **one reduction + fused elementwise epilogue** (depthwise conv2d, groups==1 conv2d fallback, max/avg pooling,
  global average pooling, matmul/linear): the "row" schedule. Producers are inlined, the epilogue chain (bias
  add, clip, residual add) is merged into one block and moved under the reduction's tile loop. The reduction's
  innermost spatial axis (output width for NCHW convs/pools, N for matmul) is vectorized with ``lanes`` (the
  whole row when it fits in a few SIMD registers; LLVM splits odd lengths such as 28 or 56 into full + partial
  registers), the reduction loops run *outside* the vector lanes so the partial sums stay in registers (a
  ``cache_write`` accumulator < 1 KB: stack, promoted by LLVM), small kernel-window loops are unrolled, outer
  spatial loops are fused and run in parallel.

  - **window reductions with a pad** (depthwise conv, pooling): the pad is *not* inlined (its ``if_then_else``
    makes TVM's vectorizer scalarize the inner loop, 3-5x slower). It is materialised per (batch, channel) plane
    inside the parallel loop, split by ``decompose_padding`` into a constant fill + an in-bounds copy (both
    vectorized). For stride 2 the plane is stored column-deinterleaved (``w -> (w % 2, w // 2)``), so the
    window's vector loads are contiguous; the copy runs one loop per phase (``loop_partition``).
  - **batch-1 matmul** (classifier head): k outer, each parallel chunk of N accumulates in place while
    streaming W row by row (instead of one 4 KB-strided column block per k).
  - **groups==1 conv fallback**: as the row schedule; for short output rows (<= 2 SIMD widths: 7/14/28) an
    output-channel register tile (up to 8 channels) reuses each input vector. Only meant to be correct and not
    absurdly slow: the sparse operator takes these convs.
  - no wide spatial axis (global average pooling): parallel over channels, scalar sum over the small window.
* anything else (several reductions, e.g. softmax): only the outer spatial loops are parallelised.

Use it after fusion and before ``tvm.compile``::

    seq = tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        DenseCPUSchedule(target),            # this module
    ])
    mod = seq(mod)
    ex = tvm.compile(mod, target=target)     # default relax pipeline: LegalizeOps is a no-op on call_tir,
                                             # nothing re-schedules PrimFuncs; TIR pipeline only lowers.

or simply ``build_dense(mod, target)`` which does exactly that. PrimFuncs carrying ``tirx.is_scheduled`` (e.g.
the sparse operator, or anything scheduled by dlight/meta-schedule) are left untouched; every function this pass
schedules gets ``tirx.is_scheduled = True``.
"""
from __future__ import annotations

import logging
import math

import tvm
from tvm import relax, s_tir, tirx
from tvm.ir import IRModule
from tvm.tirx.function import IndexMap

from ..target import TargetInfo, resolve_target

__all__ = ["DenseCPUSchedule", "apply_dense_cpu_schedules", "schedule_prim_func", "dense_build_passes",
           "build_dense"]

log = logging.getLogger(__name__)

#: what schedule primitives raise when a transformation does not apply (ScheduleError is a RuntimeError)
_SCHED_ERRORS = (RuntimeError, ValueError, TypeError, AssertionError, tvm.error.InternalError)

_SPATIAL = 0  # tirx.IterVar.DataPar
_REDUCE = 2   # tirx.IterVar.CommReduce

#: below this many output elements x reduction extent, a parallel loop costs more than it saves
_PARALLEL_MIN_WORK = 1 << 14
#: unroll a reduction loop completely when its extent is at most this (3x3 / 7x7 windows, not channel sums)
_UNROLL_MAX = 8
#: at most this many window positions are unrolled
_UNROLL_BODY_MAX = 16
#: largest output-channel register tile of the groups==1 conv fallback
_OC_TILE_MAX = 8
#: vector accumulators the groups==1 conv fallback may keep live (oc_tile x vectors per row)
_ACC_REGS = 12


def _const(expr) -> int | None:
    return int(expr.value) if type(expr).__name__ == "IntImm" else None


def _is_scheduled(func) -> bool:
    return bool(func.attrs is not None and "tirx.is_scheduled" in func.attrs
                and int(func.attrs["tirx.is_scheduled"]) == 1)


def _iter_types(sch: s_tir.Schedule, block) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return _REDUCE in _iter_types(sch, block)


def _is_simple_nest(sch: s_tir.Schedule, block) -> bool:
    """Loops map one-to-one, in order, onto the block's iter vars (the shape every legalized op has)."""
    loops = sch.get_loops(block)
    blk = sch.get(block)
    if not loops or len(loops) != len(blk.iter_vars):
        return False
    realize = sch.get(loops[-1]).body
    if not hasattr(realize, "iter_values"):
        return False
    for loop, bind in zip(loops, realize.iter_values):
        if not (isinstance(bind, tirx.Var) and bind.same_as(sch.get(loop).loop_var)):
            return False
    return True


def _extent(sch, loop) -> int | None:
    return _const(sch.get(loop).extent)


def _choose_lanes(extent: int, vector_width: int, max_regs: int) -> int:
    """Lanes for the vectorized innermost loop: a divisor of ``extent``, a multiple of 4 when possible, at most
    ``max_regs`` registers of ``vector_width`` fp32. The whole extent when it fits (LLVM splits odd vector
    lengths such as 28 or 56 lanes into full + partial registers, which beats a scalar remainder)."""
    cap = vector_width * max_regs
    if extent <= cap:
        return extent if extent >= 4 else 1
    best = 1
    for lanes in range(cap, 3, -1):
        if extent % lanes == 0:
            if lanes % vector_width == 0:
                return lanes
            if best == 1 and lanes % 4 == 0:
                best = lanes
    return best


def _is_pad_block(sch: s_tir.Schedule, block) -> bool:
    """A spatial block computing ``if_then_else(in_bounds, load, const)`` (what LegalizeOps emits for pads)."""
    body = sch.get(block).body
    value = getattr(body, "value", None)
    op = getattr(value, "op", None)
    return (op is not None and getattr(op, "name", "").endswith("if_then_else")
            and len(value.args) == 3 and type(value.args[1]).__name__ in ("BufferLoad", "TensorLoad"))


def _feeds_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(_is_reduction(sch, c) for c in sch.get_consumers(block))


def _inline_all(sch: s_tir.Schedule) -> None:
    """Inline every spatial block into its consumer (broadcasts, copies) or, failing that, into its producer
    (epilogue chains), until nothing changes. Pads feeding a reduction are kept (see ``_schedule_reduction``):
    inlined, their ``if_then_else`` makes TVM's vectorizer scalarize the reduction's inner loop."""
    changed = True
    while changed:
        changed = False
        root = sch.get_sblock("root")
        blocks = sch.get_child_blocks(root)
        outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
        for block in blocks:
            if _is_reduction(sch, block):
                continue
            name = sch.get(block).name_hint
            if _is_pad_block(sch, block) and _feeds_reduction(sch, block):
                continue
            if name not in outputs:
                try:
                    sch.compute_inline(block)
                    changed = True
                    break
                except _SCHED_ERRORS:
                    pass
            try:
                sch.reverse_compute_inline(block)
                changed = True
                break
            except _SCHED_ERRORS:
                pass


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except _SCHED_ERRORS:
        return False


def _parallel_fuse(sch, loops, work: int):
    """Fuse ``loops`` and mark the result parallel when there is enough work. Returns the fused loop."""
    if not loops:
        return None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if work >= _PARALLEL_MIN_WORK and (_extent(sch, fused) or 0) > 1:
        sch.parallel(fused)
    return fused


def _schedule_injective(sch: s_tir.Schedule, block, tinfo: TargetInfo) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in extents):
        _parallel_fuse(sch, loops[:1], _PARALLEL_MIN_WORK)
        return
    total = 1
    for e in extents:
        total *= e
    vw = tinfo.vector_width
    inner = loops[-1]
    inner_ext = extents[-1]
    # vectorize across the innermost loop, fusing more inner loops while the run stays short
    k = len(loops) - 1
    while inner_ext < vw * 4 and k > 0:  # fusing the inner loops of a spatial block is always legal
        k -= 1
        inner_ext *= extents[k]
    outer = loops[:k]
    inner_loops = loops[k:]
    inner = sch.fuse(*inner_loops) if len(inner_loops) > 1 else inner_loops[0]
    lanes = vw if inner_ext % vw == 0 else (vw // 2 if inner_ext % (vw // 2) == 0 and vw >= 8 else
                                             (4 if inner_ext % 4 == 0 else 1))
    if lanes > 1:
        io, ii = sch.split(inner, [None, lanes])
        sch.vectorize(ii)
        outer = outer + [io]
    else:
        outer = outer + [inner]
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if total >= _PARALLEL_MIN_WORK and (_extent(sch, fused) or 0) > 1:
        sch.parallel(fused)


def _vectorize_inner(sch, block, max_lanes: int = 256) -> None:
    """Vectorize the innermost loop of ``block`` when its extent is constant and small enough."""
    loops = sch.get_loops(block)
    if loops:
        ext = _extent(sch, loops[-1])
        if ext is not None and 1 < ext <= max_lanes:
            try:
                sch.vectorize(loops[-1])
            except _SCHED_ERRORS:
                pass


def _deinterleave_strided_pad(sch, pad, out_width: int, kernel_width: int) -> int:
    """For a strided window (stride-2 depthwise conv / pooling) store the padded plane column-deinterleaved,
    ``[..., w] -> [..., w % s, w // s]``: the consumer's vector loads become contiguous instead of strided (which
    LLVM turns into shuffles or scalar loads). Returns the stride applied (1: layout unchanged)."""
    buf = sch.get(pad).writes[0].source
    shape = [_const(d) for d in buf.shape]
    if len(shape) < 2 or any(d is None for d in shape) or out_width < 2:
        return 1
    w_pad = shape[-1]
    stride = (w_pad - kernel_width) // (out_width - 1)
    if stride < 2 or (out_width - 1) * stride + kernel_width > w_pad or w_pad % stride:
        return 1
    nd = len(shape)

    def deinterleave(*idx):
        return (*idx[: nd - 1], idx[-1] % stride, idx[-1] // stride)

    index_map = IndexMap.from_func(deinterleave, ndim=nd)

    try:
        sch.transform_layout(pad, ("write", 0), index_map)
    except _SCHED_ERRORS:
        return 1
    return stride


def _schedule_pad_under(sch, pad, loop, stride: int = 1) -> None:
    """Materialise a pad per iteration of ``loop`` (one padded plane of a channel): a constant fill plus an
    in-bounds copy, both without ``if_then_else``, so the consumer's inner loop reads plain memory. With a
    deinterleaved layout (``stride`` > 1) the copy's column loop is split by the stride and each phase gets its
    own loop (``loop_partition``), so the phase is a constant and the stores are contiguous vectors."""
    sch.compute_at(pad, loop, preserve_unit_loops=True)
    target = sch.get(loop)
    pad_loops = list(sch.get_loops(pad))
    n_outer = next(i for i, lp in enumerate(pad_loops) if sch.get(lp).same_as(target)) + 1
    below = pad_loops[n_outer:]
    if not below:
        return
    try:
        fill = sch.decompose_padding(pad, below[0])
    except _SCHED_ERRORS:
        _vectorize_inner(sch, pad)
        return
    for blk in (fill, pad):
        if stride > 1 and _split_phases(sch, blk, stride):
            continue
        _vectorize_inner(sch, blk)


def _split_phases(sch, block, stride: int) -> bool:
    """Split the innermost (column) loop of ``block`` as ``col = j * stride + phase`` with one loop per phase
    constant, then vectorize ``j``: stores into a deinterleaved buffer become contiguous."""
    try:
        cols = sch.get_loops(block)[-1]
        if (_extent(sch, cols) or 1) % stride:
            return False
        j, phase = sch.split(cols, [None, stride])
        sch.reorder(phase, j)
        for part in sch.loop_partition(phase, [1] * (stride - 1) + [None]):
            for blk in sch.get_child_blocks(part):
                _vectorize_inner(sch, blk)
        return True
    except _SCHED_ERRORS:
        return False


def _schedule_reduction(sch: s_tir.Schedule, block, epilogue, tinfo: TargetInfo, pads=()) -> bool:
    """The row schedule for one reduction block (+ optional pads before and one epilogue block after).
    False if not applicable (the caller falls back)."""
    if not _is_simple_nest(sch, block):
        return False
    types = _iter_types(sch, block)
    loops = sch.get_loops(block)
    if any(_extent(sch, lp) is None for lp in loops):
        return False
    # legalized reductions list spatial iters first, then reduction iters
    n_sp = types.index(_REDUCE)
    if any(t != _REDUCE for t in types[n_sp:]) or any(t != _SPATIAL for t in types[:n_sp]) or n_sp == 0:
        return False
    sp, rd = loops[:n_sp], loops[n_sp:]
    sp_ext = [_extent(sch, lp) for lp in sp]
    rd_ext = [_extent(sch, lp) for lp in rd]
    work = math.prod(sp_ext + rd_ext)
    vw = tinfo.vector_width
    # a reduction over a small window only (depthwise conv, pooling) vs one over channels (conv, matmul)
    window = math.prod(rd_ext) <= 64

    if not window and not pads and math.prod(sp_ext[:-1]) == 1 and sp_ext[-1] >= 64:
        if _schedule_gemv(sch, block, epilogue, tinfo, sp, rd, sp_ext[-1], work):
            return True
    if sp_ext[-1] == 1:
        for pad in pads:
            _schedule_root_pad(sch, pad, tinfo)
        return _schedule_reduce_inner(sch, block, epilogue, tinfo, sp, rd, work)

    max_regs = 8 if vw >= 16 else 12  # AVX-512: 32 zmm; AVX2/NEON: 16 regs, keep room for inputs
    if vw <= 4:
        max_regs = 6
    lanes = _choose_lanes(sp_ext[-1], vw, max_regs)
    # the accumulator tile is lanes fp32: it must stay < 1 KB to live on the stack (promoted to registers)
    if lanes * 4 >= 1024:
        lanes = _choose_lanes(sp_ext[-1], vw, max(1, 255 // vw))
    # a channel reduction (groups==1 conv fallback): tile output channels so each loaded input vector feeds
    # several accumulators (oc_tile x lanes in registers) instead of one
    oc_tile = 1
    # (only for short rows: measured 6-10x on 7/14/28-wide outputs, but a loss on 56-wide ones)
    if not window and n_sp == 4 and sp_ext[-1] <= 2 * vw and not plane_pads_possible(pads, window, n_sp, sp_ext):
        budget = _ACC_REGS  # accumulator registers: a third of the register file or so
        lanes = _choose_lanes(sp_ext[-1], vw, 4)
        nvec = -(-lanes // vw)
        oc_tile = next((t for t in (8, 6, 4, 3, 2) if t <= _OC_TILE_MAX and sp_ext[1] % t == 0 and t * nvec <= budget
                        and t * lanes * 4 < 1024), 1)
    if lanes > 1:
        xo, xi = sch.split(sp[-1], [None, lanes])
    else:
        xo, xi = sp[-1], None
    # parallel over (batch, channel) planes when pads are materialised per plane, else over all outer loops
    plane_pads = plane_pads_possible(pads, window, n_sp, sp_ext)
    inner_rows = []
    if plane_pads:
        par, serial = sp[:-2], [sp[-2], xo]
        strides = [_deinterleave_strided_pad(sch, pad, sp_ext[-1], rd_ext[-1]) for pad in pads]
    elif oc_tile > 1:
        oco, oci = sch.split(sp[1], [None, oc_tile])
        par, serial, inner_rows = [sp[0], oco, sp[2], xo], [], [oci]
    else:
        par, serial = sp[:-1] + [xo], []
    sch.reorder(*(par + serial + rd + inner_rows + ([xi] if xi is not None else [])))
    # accumulate the tile in a small buffer, write it back (through the epilogue) once
    acc_writer = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(acc_writer, xo, preserve_unit_loops=True)
    if epilogue is not None:
        try:
            sch.compute_inline(acc_writer)  # epilogue reads the accumulator directly
            acc_writer = None
        except _SCHED_ERRORS:
            pass
        sch.reverse_compute_at(epilogue, xo, preserve_unit_loops=True)
    n_above_tile = len(par) + len(serial)
    for tail in (acc_writer, epilogue):
        if tail is None:
            continue
        below = sch.get_loops(tail)[n_above_tile:]
        if inner_rows and below and lanes > 1:  # (tile, x): vectorize x, unroll the tile
            sch.vectorize(below[-1])
            for lp in below[:-1]:
                sch.unroll(lp)
        elif below and lanes > 1:
            inner = sch.fuse(*below) if len(below) > 1 else below[0]
            sch.vectorize(inner)
    if xi is not None:
        sch.vectorize(xi)
    # parallel before decompose_reduction: afterwards the update block no longer counts as a reduction block
    fused = _parallel_fuse(sch, par, work)
    for i, pad in enumerate(pads):
        if plane_pads and fused is not None:
            _schedule_pad_under(sch, pad, fused, strides[i])
    init = sch.decompose_reduction(block, rd[0])
    if xi is not None:
        il = sch.get_loops(init)
        if sch.get(il[-1]).kind != tirx.ForKind.VECTORIZED:
            sch.vectorize(il[-1])
    # unroll the innermost window loops while the unrolled body stays small (3x3: all; 7x7: the row only):
    # a fully unrolled 7x7x3 window of strided (scalarized) vector loads takes LLVM minutes to compile
    unrolled = 1
    for lp, e in reversed(list(zip(rd, rd_ext))):
        if e > _UNROLL_MAX or unrolled * e > _UNROLL_BODY_MAX:
            break
        sch.unroll(lp)
        unrolled *= e
    for lp in inner_rows:
        sch.unroll(lp)
    for pad in pads:
        if not (plane_pads and fused is not None):
            _schedule_root_pad(sch, pad, tinfo)
    return True


def plane_pads_possible(pads, window: bool, n_sp: int, sp_ext) -> bool:
    return bool(pads) and window and n_sp >= 3 and math.prod(sp_ext[:-2]) >= 8


def _schedule_gemv(sch, block, epilogue, tinfo, sp, rd, n_ext: int, work: int) -> bool:
    """Batch-1 matmul ``y[n] = sum_k x[k] * W[k, n]`` (the classifier head): the row schedule would walk W
    column-block by column-block (a 4 KB stride per k, one page per row, no prefetch). Instead each parallel
    chunk of ``n`` streams W row by row (k outer) and accumulates its chunk (< 1 KB, on the stack) in place."""
    vw = tinfo.vector_width
    lanes = next((v for v in (vw, vw // 2, 4) if v >= 4 and n_ext % v == 0), 1)
    if lanes == 1:
        return False
    divisors = [d for d in range(lanes, n_ext + 1, lanes) if n_ext % d == 0 and d * 4 < 1024]
    if not divisors:
        return False
    chunk = max([d for d in divisors if n_ext // d >= 8] or [d for d in divisors if n_ext // d >= 2] or divisors)
    c, n = sch.split(sp[-1], [None, chunk])
    no, ni = sch.split(n, [None, lanes])
    sch.reorder(*sp[:-1], c, *rd, no, ni)
    sch.vectorize(ni)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, c, preserve_unit_loops=True)
        below = sch.get_loops(epilogue)[len(sp):]
        if below:
            inner = sch.fuse(*below) if len(below) > 1 else below[0]
            if (_extent(sch, inner) or 1) % lanes == 0:
                sch.vectorize(sch.split(inner, [None, lanes])[1])
    _parallel_fuse(sch, sp[:-1] + [c], work)
    sch.decompose_reduction(block, rd[0])
    return True


def _schedule_root_pad(sch, pad, tinfo) -> None:
    """A pad left at the root (groups==1 conv fallback): fill + copy, each as an injective stage."""
    loops = sch.get_loops(pad)
    blocks = [pad]
    try:
        blocks.insert(0, sch.decompose_padding(pad, loops[0]))
    except _SCHED_ERRORS:
        pass
    for b in blocks:
        try:
            _schedule_injective(sch, b, tinfo)
        except _SCHED_ERRORS:
            pass


def _schedule_reduce_inner(sch, block, epilogue, tinfo, sp, rd, work) -> bool:
    """Reductions whose output has no wide contiguous axis (global average pooling, GEMV with a transposed
    weight): parallel over the outputs, plain reduction inside (LLVM vectorizes contiguous sums poorly without
    reassociation, but these ops are tiny in CNNs)."""
    if epilogue is not None:
        loops = sch.get_loops(block)
        sch.reverse_compute_at(epilogue, loops[len(sp) - 1], preserve_unit_loops=True)
    _parallel_fuse(sch, sp, work)
    return True


def _reduction_layout(sch, blocks, red):
    """``blocks`` = [pads..., red, (epilogue)] -> (pads, epilogue); None for any other structure."""
    names = [sch.get(b).name_hint for b in blocks]
    idx = names.index(sch.get(red).name_hint)
    pads, tail = blocks[:idx], blocks[idx + 1:]
    if len(tail) > 1 or not all(_is_pad_block(sch, p) for p in pads):
        return None
    return pads, (tail[0] if tail else None)


def _written_shape(sch, block) -> list:
    return [_const(d) for d in sch.get(block).writes[0].source.shape]


def _schedule_fallback(sch: s_tir.Schedule, blocks) -> None:
    for block in blocks:
        loops = sch.get_loops(block)
        types = _iter_types(sch, block)
        if not _is_simple_nest(sch, block):
            continue
        lead = []
        for lp, t in zip(loops, types):
            if t != _SPATIAL or _extent(sch, lp) is None:
                break
            lead.append(lp)
        if lead:
            try:
                _parallel_fuse(sch, lead, _PARALLEL_MIN_WORK)
            except _SCHED_ERRORS:
                pass


def schedule_prim_func(func: tirx.PrimFunc, target, name: str = "?") -> tirx.PrimFunc | None:
    """Schedule one PrimFunc for ``target`` (name, dict, Target or TargetInfo). Returns the scheduled PrimFunc
    (with ``tirx.is_scheduled``) or None when it is already scheduled or has no block structure."""
    tinfo = target if isinstance(target, TargetInfo) else resolve_target(target)
    if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
        return None
    sch = s_tir.Schedule(IRModule({"main": func}))
    if not _has_root(sch):
        return None
    try:
        _inline_all(sch)
        root = sch.get_sblock("root")
        blocks = list(sch.get_child_blocks(root))
        reductions = [b for b in blocks if _is_reduction(sch, b)]
        if not reductions:
            for b in blocks:
                if _is_simple_nest(sch, b):
                    _schedule_injective(sch, b, tinfo)
        elif len(reductions) == 1 and _reduction_layout(sch, blocks, reductions[0]) is not None:
            pads, epilogue = _reduction_layout(sch, blocks, reductions[0])
            apart = None
            if epilogue is not None and _written_shape(sch, epilogue) != _written_shape(sch, reductions[0]):
                # an epilogue that writes more than the reduction (a pad for the next layer) cannot run inside
                # the reduction's loops: they would skip its border
                apart, epilogue = epilogue, None
            if not _schedule_reduction(sch, reductions[0], epilogue, tinfo, pads):
                _schedule_fallback(sch, list(sch.get_child_blocks(sch.get_sblock("root"))))
            if apart is not None and _is_simple_nest(sch, apart):
                _schedule_injective(sch, apart, tinfo)
        else:
            _schedule_fallback(sch, blocks)
    except _SCHED_ERRORS as err:  # a rule that does not fit: leave the function unscheduled but working
        log.warning("dense_cpu: could not schedule %s (left unscheduled): %s", name, str(err).splitlines()[0])
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def apply_dense_cpu_schedules(mod: IRModule, target) -> IRModule:
    """Schedule every not-yet-scheduled PrimFunc of ``mod`` (a legalized, usually fused, Relax module)."""
    tinfo = target if isinstance(target, TargetInfo) else resolve_target(target)
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
            new = schedule_prim_func(func, tinfo, gv.name_hint)
            if new is not None:
                updates[gv] = new
    if not updates:
        return mod
    mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
    for gv, func in updates.items():
        mod[gv] = func
    return mod


@tvm.transform.module_pass(opt_level=0, name="DenseCPUSchedule")
class DenseCPUSchedule:  # pylint: disable=too-few-public-methods
    """Module pass: hand-written CPU schedules for every unscheduled PrimFunc (see module docstring)."""

    def __init__(self, target):
        self.tinfo = target if isinstance(target, TargetInfo) else resolve_target(target)

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:  # noqa: D102
        return apply_dense_cpu_schedules(mod, self.tinfo)


def dense_build_passes(target, extra_passes=()) -> list:
    """The Relax passes that turn an imported model into scheduled, fused PrimFuncs. ``extra_passes`` run after
    fusion and before scheduling (for passes that work on legalised PrimFuncs; PrimFuncs carrying
    ``tirx.is_scheduled`` are left alone). The sparse-conv rewrite is not one of them: it matches
    ``R.nn.conv2d`` and runs before this list (see :mod:`alcs_tvm.compiler`)."""
    return [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        *extra_passes,
        DenseCPUSchedule(target),
    ]


def build_dense(mod: IRModule, target, extra_passes=()):
    """Fuse, schedule and compile ``mod`` for ``target``; returns the VM executable of ``tvm.compile``."""
    tinfo = target if isinstance(target, TargetInfo) else resolve_target(target)
    with tinfo.target:
        mod = tvm.transform.Sequential(dense_build_passes(tinfo, extra_passes))(mod)
    return tvm.compile(mod, target=tinfo.target)
