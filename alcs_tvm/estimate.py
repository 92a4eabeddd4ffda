"""Estimating the sparse conv kernel on a core we do not have: its machine code through LLVM's pipeline model.

For one kernel (:func:`~alcs_tvm.kernels.sparse_conv2d_kernel`), :func:`estimate_kernel`:

1. compiles it for its target and takes the generated assembly (``inspect_source("asm")``);
2. finds the innermost loops that hold the FMAs - one per run length and register tile of the template
   (:mod:`alcs_tvm.schedules.sparse_conv2d_cpu`) - from the control-flow graph of the kernel's parallel body;
3. runs ``llvm-mca -mcpu=CORE`` on each loop body for its steady-state cycles per iteration, and on the code
   around them (accumulator set-up, epilogue and stores) for the cycles per register tile;
4. multiplies each by its trip count, read from the packed weight: a segment loop runs once per run of kept
   taps of its length, per register tile of the output block (``indptr``).

The result is single-core cycles for warm caches: cache misses, TLB misses, branch mispredictions, thread
fork/join and the loops' entry latency are not modelled. Beside it, :attr:`KernelEstimate.mem_cycles` is a
bandwidth bound (compulsory bytes - input, weights, output, shortcut - over the core's stated DRAM bandwidth);
a layer whose bound exceeds its pipeline estimate is flagged memory-bound.

The peak a core is measured against is what its own LLVM scheduling model allows: ``llvm-mca`` on a block of
independent FMAs of the kernel's kind (:func:`peak_flops_per_cycle`), so the percentage says how close the loop
comes to the model's FMA throughput.
"""
from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import tvm

from . import frontend
from .compiler import ModelLayer, model_layers
from .kernels import SparseConv2dKernel, sparse_conv2d_kernel
from .schedules import SparseConvSchedule, registers_per_group
from .sparse_format import BlockSparseWeight
from .target import TargetInfo, resolve_target
from .toolchain import ensure_llvm_mca

__all__ = ["Core", "CORES", "host_core", "EstimateError", "LoopEstimate", "KernelEstimate", "kernel_asm",
           "find_fma_loops", "run_mca", "peak_flops_per_cycle", "estimate_kernel", "useful_flops",
           "compulsory_bytes", "instruction_mix", "epilogue_cycles_per_vector", "LayerEstimate", "estimate_layer",
           "estimate_model"]


@dataclass(frozen=True)
class Core:
    """A core as ``llvm-mca`` models it, with the clock and bandwidth used to turn cycles into time and to bound
    memory traffic (assumptions, stated in :data:`CORES`)."""

    mcpu: str
    triple: str  # "aarch64" or "x86_64"
    ghz: float
    bandwidth_gbs: float  # sustained single-core DRAM bandwidth
    fma_lanes: int  # fp32 lanes of the kernel's FMA instruction on this core
    about: str = ""

    @property
    def isa(self) -> str:
        return "aarch64" if self.triple.startswith("aarch64") else "x86"


#: the phone cores: clocks of a Snapdragon 855-class SoC (Cortex-A76 prime core 2.84 GHz, Cortex-A55 1.8 GHz);
#: bandwidths are what one core of such a phone sustains from LPDDR4X (about half the 34 GB/s peak for a big
#: core, a third of that for a little one) - round figures for the bound, not measurements
CORES = {
    "neoverse-n1": Core("neoverse-n1", "aarch64", 2.84, 15.0, 4,
                        "Neoverse N1 model = the Cortex-A76 design (big core); 2.84 GHz, 15 GB/s assumed"),
    "cortex-a55": Core("cortex-a55", "aarch64", 1.8, 5.0, 4,
                       "Cortex-A55 model (in-order little core); 1.8 GHz, 5 GB/s assumed"),
}


def host_core(ghz: float, bandwidth_gbs: float = 20.0, mcpu: str | None = None) -> Core:
    """This x86 host as ``llvm-mca`` knows it (``-mcpu`` = LLVM's name of the host CPU, or ``mcpu``), at a
    clock the caller measured (``ghz``)."""
    from tvm.target import codegen

    mcpu = mcpu or codegen.llvm_get_system_cpu()
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    lanes = 16 if codegen.llvm_cpu_has_features(["avx512f"], target) else 8
    return Core(mcpu, "x86_64", float(ghz), float(bandwidth_gbs), lanes, f"this host ({mcpu}), {ghz:.2f} GHz")


class EstimateError(RuntimeError):
    """The generated code does not have the loops the template should give (or ``llvm-mca`` failed)."""


# ----------------------------------------------------------------------------------------------- assembly
def kernel_asm(func, target) -> str:
    """The assembly TVM generates for a PrimFunc (cross targets included: nothing is run)."""
    return tvm.compile(func, target=target).mod.inspect_source("asm")


_FMA = {"aarch64": re.compile(r"^fmla\s+v\d+\.4s,"), "x86": re.compile(r"^vfmadd\d+ps\b")}
_COMMENT = {"aarch64": "//", "x86": "#"}


@dataclass
class _Block:
    labels: list
    lines: list = field(default_factory=list)
    succ: list = field(default_factory=list)  # label names, or None for fall-through


def _branch(isa: str, line: str):
    """``(kind, target label)`` of a control transfer: kind ``"jump"`` (unconditional), ``"cond"``, ``"ret"``;
    ``None`` for other instructions."""
    mnemonic, _, operands = line.partition("\t") if "\t" in line else line.partition(" ")
    mnemonic, operands = mnemonic.strip(), operands.strip()
    last = operands.rsplit(",", 1)[-1].strip()
    if isa == "aarch64":
        if mnemonic == "b":
            return "jump", last
        if mnemonic.startswith("b.") or mnemonic in ("cbz", "cbnz", "tbz", "tbnz"):
            return "cond", last
        if mnemonic in ("ret", "br"):
            return "ret", None
        return None
    if mnemonic in ("jmp", "jmpq"):
        return ("jump", last) if not last.startswith("*") else ("ret", None)
    if mnemonic.startswith("j"):
        return "cond", last
    if mnemonic in ("ret", "retq", "ud2"):
        return "ret", None
    return None


def _functions(asm: str, isa: str) -> dict:
    """Function name -> its instruction and label lines (directives and comments dropped)."""
    funcs, current, name = {}, None, None
    comment = _COMMENT[isa]
    declared = set(re.findall(r"\.type\s+([^,\s]+),\s*@function", asm))
    for raw in asm.splitlines():
        line = raw.split(comment, 1)[0].rstrip() if comment in raw else raw.rstrip()
        label = re.match(r"^([.\w$]+):", line)
        if label and label.group(1) in declared:
            name, current = label.group(1), []
            funcs[name] = current
            continue
        if current is None or not line.strip():
            continue
        if re.match(r"^\s*\.size\s", line):
            current, name = None, None
            continue
        if label:
            current.append(label.group(1) + ":")
        elif not line.strip().startswith("."):
            current.append(line.strip())
    return funcs


def _blocks(lines: list, isa: str) -> list:
    blocks = [_Block([])]
    for line in lines:
        if line.endswith(":") and " " not in line and "\t" not in line:
            if blocks[-1].lines:
                blocks[-1].succ.append(None)
                blocks.append(_Block([]))
            blocks[-1].labels.append(line[:-1])
            continue
        blocks[-1].lines.append(line)
        branch = _branch(isa, line)
        if branch is not None:
            kind, target = branch
            if kind != "ret":
                blocks[-1].succ.append(target)
            if kind == "cond":
                blocks[-1].succ.append(None)
            blocks.append(_Block([]))
    return [b for b in blocks if b.lines or b.labels]


def _cfg(blocks: list) -> list:
    """Successor indices of each block."""
    at = {label: i for i, b in enumerate(blocks) for label in b.labels}
    succ = []
    for i, b in enumerate(blocks):
        out = []
        for s in b.succ:  # None: falls through; a block ending in a return has none
            j = i + 1 if s is None else at.get(s)
            if j is not None and j < len(blocks) and j not in out:
                out.append(j)
        succ.append(out)
    return succ


def _natural_loops(succ: list) -> dict:
    """Header block -> set of blocks of its natural loop (back edges found by depth-first search)."""
    pred = [[] for _ in succ]
    for i, out in enumerate(succ):
        for j in out:
            pred[j].append(i)
    loops, state, stack = {}, {}, [(0, iter(succ[0]))] if succ else []
    state[0] = "open"
    while stack:
        node, children = stack[-1]
        nxt = next(children, None)
        if nxt is None:
            state[node] = "done"
            stack.pop()
            continue
        if state.get(nxt) == "open":  # back edge node -> nxt
            body, todo = {nxt, node}, [node] if node != nxt else []
            while todo:  # the latch's predecessors up to the header
                for p in pred[todo.pop()]:
                    if p not in body:
                        body.add(p)
                        todo.append(p)
            loops.setdefault(nxt, set()).update(body)
        elif nxt not in state:
            state[nxt] = "open"
            stack.append((nxt, iter(succ[nxt])))
    return loops


@dataclass(frozen=True)
class AsmLoop:
    """An innermost loop of FMAs: its body (instructions in address order) and what the code around it runs
    once per pass of the enclosing loop (``outer_text``, ``None`` at the top level): the blocks on the way into
    and out of the inner loops. LLVM gives a pass that skips every inner loop its own copy of the set-up (the
    accumulators' initial values moved straight into the registers the epilogue reads), which such a pass runs
    instead (``empty_text``)."""

    text: tuple
    fmas: int
    accumulators: int  # distinct FMA destination registers
    outer_id: int | None
    outer_text: tuple | None
    outer_fma_loops: int  # FMA loops inside the same enclosing loop
    # the code a pass of the enclosing loop runs when it enters none of its inner loops (a register tile of an
    # output block with no kept position); ``outer_text`` is then the code of the passes that do enter them
    empty_text: tuple | None = None


def find_fma_loops(asm: str, isa: str) -> list:
    """The innermost loops containing FMAs in the function with the most FMAs (the kernel's parallel body)."""
    fma = _FMA[isa]
    funcs = _functions(asm, isa)
    if not funcs:
        raise EstimateError("no function found in the assembly")
    name = max(funcs, key=lambda f: sum(1 for line in funcs[f] if fma.match(line)))
    blocks = _blocks(funcs[name], isa)
    succ = _cfg(blocks)
    loops = _natural_loops(succ)
    if not loops:
        raise EstimateError(f"no loop in {name}")

    def nested(inner, outer):
        return inner != outer and loops[inner] <= loops[outer]

    innermost = [h for h in loops if not any(nested(o, h) for o in loops)]
    result = []
    fma_loops = [h for h in sorted(innermost) if any(fma.match(l) for b in loops[h] for l in blocks[b].lines)]
    for h in fma_loops:
        text = tuple(line for b in sorted(loops[h]) for line in blocks[b].lines)
        dests = {line.split(",")[0].split()[-1] if isa == "aarch64" else line.rsplit(",", 1)[-1].strip()
                 for line in text if fma.match(line)}
        parents = [o for o in loops if nested(h, o)]
        outer = min(parents, key=lambda o: len(loops[o])) if parents else None
        outer_text, empty_text, siblings = None, None, 0
        if outer is not None:
            inside = set().union(*(loops[o] for o in loops if nested(o, outer)))
            taken, empty = _pass_paths(succ, outer, loops[outer] - inside, inside)
            outer_text = tuple(line for b in sorted(taken) for line in blocks[b].lines)
            empty_text = tuple(line for b in sorted(empty) for line in blocks[b].lines)
            siblings = sum(1 for o in fma_loops if nested(o, outer))
        result.append(AsmLoop(text, sum(1 for line in text if fma.match(line)), len(dests), outer, outer_text,
                              siblings, empty_text))
    return result


def _pass_paths(succ: list, header: int, region: set, inner: set) -> tuple:
    """``(taken, empty)``: the blocks of an enclosing loop's own code (``region``, its blocks outside the
    ``inner`` loops) that a pass entering an inner loop can run - those that lead into one or come after one -
    and those a pass entering none runs (on a path from the ``header`` back to it that avoids them all)."""
    pred = {b: [] for b in region}
    for b in region:
        for s in succ[b]:
            if s in region and s != header:
                pred[s].append(b)

    def walk(start, step):
        seen, todo = set(start), list(start)
        while todo:
            for nxt in step(todo.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def forward(b):
        return [s for s in succ[b] if s in region and s != header]

    into = walk({b for b in region if any(s in inner for s in succ[b])}, lambda b: pred[b])
    after = walk({s for b in inner for s in succ[b] if s in region and s != header}, forward)
    taken = into | after
    from_header = walk({header}, forward)
    to_latch = walk({b for b in from_header if header in succ[b]}, lambda b: [p for p in pred[b] if p in from_header])
    return taken, from_header & to_latch


def instruction_mix(text, isa: str) -> dict:
    """Counts of FMAs, loads, stores, spills (stack loads/stores), address arithmetic (integer ops), branches
    and other vector ops in a loop body."""
    fma = _FMA[isa]
    mix = dict.fromkeys(("fma", "load", "store", "spill", "addr", "branch", "other"), 0)
    for line in text:
        mnemonic = line.split()[0]
        if _branch(isa, line) is not None:
            mix["branch"] += 1
            continue
        if isa == "aarch64":
            memory = mnemonic.startswith(("ld", "st", "prfm"))  # "[" also marks a by-element lane: v1.s[0]
            store = mnemonic.startswith("st")
            spill = memory and ("[sp" in line)
            vector = bool(re.search(r"\b[vqsd]\d+\b", line.split("[")[0])) and not mnemonic.startswith("ld")
        else:
            memory = "(" in line
            store = memory and mnemonic.startswith(("vmov", "mov")) and line.rstrip().endswith(")")
            spill = memory and "%rsp" in line
            vector = "%xmm" in line or "%ymm" in line or "%zmm" in line
        if fma.match(line):
            mix["fma"] += 1
            if memory:  # a broadcast operand folded into the FMA is a load too
                mix["load"] += 1
        elif spill:
            mix["spill"] += 1
        elif memory:
            mix["store" if store else "load"] += 1
        elif vector:
            mix["other"] += 1
        else:
            mix["addr"] += 1
    return mix


# ----------------------------------------------------------------------------------------------- llvm-mca
_MCA_ITERATIONS = 200


@functools.lru_cache(maxsize=4096)
def run_mca(text: tuple, mcpu: str, triple: str) -> float:
    """Steady-state cycles per iteration of ``text`` (instruction lines) on ``mcpu``, by ``llvm-mca``."""
    mca = ensure_llvm_mca(verbose=False)
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(text) + "\n")
        path = f.name
    try:
        res = subprocess.run([mca, f"-mtriple={triple}", f"-mcpu={mcpu}", f"-iterations={_MCA_ITERATIONS}", path],
                             capture_output=True, text=True)
    finally:
        Path(path).unlink(missing_ok=True)
    total = re.search(r"^Total Cycles:\s+(\d+)", res.stdout, re.M)
    iterations = re.search(r"^Iterations:\s+(\d+)", res.stdout, re.M)
    if res.returncode != 0 or not total or not iterations:
        raise EstimateError(f"llvm-mca -mcpu={mcpu} failed: {res.stderr.strip()[-800:]}")
    return int(total.group(1)) / int(iterations.group(1))


def _peak_block(core: Core) -> tuple:
    if core.isa == "aarch64":
        return tuple(f"fmla v{i}.4s, v28.4s, v29.s[{i % 4}]" for i in range(24))
    reg = "zmm" if core.fma_lanes == 16 else "ymm"
    return tuple(f"vfmadd231ps %{reg}14, %{reg}15, %{reg}{i}" for i in range(14))


def peak_flops_per_cycle(core: Core) -> float:
    """fp32 FLOP per cycle of the core's FMA pipes as its LLVM model has them: ``llvm-mca`` on independent
    FMAs of the kernel's kind (by-element ``fmla .4s`` on aarch64, ``vfmadd231ps`` on x86)."""
    block = _peak_block(core)
    return 2 * core.fma_lanes * len(block) / run_mca(block, core.mcpu, core.triple)


_EPILOGUE_VECTORS = 24  # independent output vectors in the block llvm-mca times


def _epilogue_block(core: Core, activation: str | None) -> tuple:
    """Independent output vectors, each clamped as ``activation`` (ReLU: a max; ReLU6: a max and a min; any other
    activation counted as none) and stored once."""
    clamps = {"relu": 1, "relu6": 2}.get(activation, 0)
    block = []
    for i in range(_EPILOGUE_VECTORS):
        if core.isa == "aarch64":
            block += [f"fmax v{i}.4s, v{i}.4s, v30.4s", f"fmin v{i}.4s, v{i}.4s, v31.4s"][:clamps]
            block.append(f"str q{i}, [x0, #{16 * i}]")
        else:
            reg = "zmm" if core.fma_lanes == 16 else "ymm"
            block += [f"vmaxps %{reg}30, %{reg}{i}, %{reg}{i}", f"vminps %{reg}31, %{reg}{i}, %{reg}{i}"][:clamps]
            block.append(f"vmovups %{reg}{i}, {4 * core.fma_lanes * i}(%rdi)")
    return tuple(block)


def epilogue_cycles_per_vector(core: Core, activation: str | None) -> float:
    """The least cycles the core's model needs to finish one output vector: its activation and one store
    (``llvm-mca`` on independent ones). On the Neoverse N1 model a q-register store takes a vector pipe, like an
    FMA."""
    block = _epilogue_block(core, activation)
    return run_mca(block, core.mcpu, core.triple) / _EPILOGUE_VECTORS


# ----------------------------------------------------------------------------------------------- estimate
@dataclass
class LoopEstimate:
    """One segment loop (register tile ``accumulators``, run length ``run``) of the kernel."""

    accumulators: int
    run: int
    iterations: int  # over the whole kernel, all copies of the loop together
    cycles_per_iteration: float
    mix: dict
    copies: int = 1

    @property
    def cycles(self) -> float:
        return self.iterations * self.cycles_per_iteration


@dataclass
class KernelEstimate:
    """Estimated single-core cycles of one kernel call on ``core`` (see the module docstring for what is left
    out)."""

    core: Core
    loop_cycles: float
    tile_cycles: float  # the code around the loops: accumulator set-up, epilogue, stores
    flops: int  # useful FLOPs: kept weight vectors x real output channels x output pixels x 2
    peak_flops_per_cycle: float
    mem_bytes: int
    loops: list

    @property
    def cycles(self) -> float:
        return self.loop_cycles + self.tile_cycles

    @property
    def mem_cycles(self) -> float:
        return self.mem_bytes / (self.core.bandwidth_gbs * 1e9) * self.core.ghz * 1e9

    @property
    def memory_bound(self) -> bool:
        return self.mem_cycles > self.cycles

    @property
    def pct_peak(self) -> float:
        return 100.0 * self.flops / (self.cycles * self.peak_flops_per_cycle) if self.cycles else 0.0

    @property
    def microseconds(self) -> float:
        return self.cycles / (self.core.ghz * 1e3)

    def hot_loop(self) -> LoopEstimate | None:
        """The loop that takes the most cycles."""
        return max(self.loops, key=lambda l: l.cycles) if self.loops else None

    def mix_text(self) -> str:
        """The hot loop's instruction mix, e.g. ``"r3 1x8: 24 fma, 9 ld, 4 addr, 0 spill / 12.1 cyc"``."""
        loop = self.hot_loop()
        if loop is None:
            return "-"
        m = loop.mix
        return (f"run {loop.run}, {loop.accumulators} acc: {m['fma']} fma {m['load']} ld {m['addr']} addr "
                f"{m['spill']} spill, {loop.cycles_per_iteration:.1f} cyc/it")


def useful_flops(kernel: SparseConv2dKernel) -> int:
    """FLOPs the kernel does that a dense conv would also do: kept weight vectors, real output channels only."""
    geom, packed = kernel.geometry, kernel.packed
    v = kernel.schedule.vector_width
    rmax = packed.max_run
    kept = np.diff(packed.indptr.astype(np.int64)).reshape(geom.num_blocks, rmax)  # runs per (block, length)
    lengths = rmax - np.arange(rmax)
    taps = kept @ lengths
    lanes = np.minimum(v, geom.out_channels - v * np.arange(geom.num_blocks))
    return int(2 * geom.batch * geom.out_height * geom.out_width * int(taps @ lanes))


def compulsory_bytes(kernel: SparseConv2dKernel) -> int:
    """Bytes a call must move at least once: input, output (and shortcut) activations, the kept weight vectors
    and the index arrays."""
    geom = kernel.geometry
    elements = int(np.prod(geom.input_shape)) + int(np.prod(kernel.output_shape))
    if kernel.residual_shape is not None:
        elements += int(np.prod(kernel.residual_shape))
    return 4 * elements + sum(int(a.nbytes) for a in kernel.packed.arrays())


def _tile_counts(kernel: SparseConv2dKernel) -> dict:
    """Register tiles ``(rows, cols)`` of one output block -> how many of them one output block has."""
    geom, sched = kernel.geometry, kernel.schedule
    ho, wo = geom.out_height, geom.out_width
    tr, tw = min(sched.tile_rows, ho), min(sched.tile_cols, wo)
    rows = [(tr, ho // tr)] + ([(ho % tr, 1)] if ho % tr else [])
    cols = [(tw, wo // tw)] + ([(wo % tw, 1)] if wo % tw else [])
    return {(r, c): nr * nc for r, nr in rows for c, nc in cols}


@functools.lru_cache(maxsize=256)
def _loops_of(func_key, isa: str) -> list:
    func, target = _FUNCS[func_key]
    return find_fma_loops(kernel_asm(func, target), isa)


_FUNCS = {}


def _code_key(kernel: SparseConv2dKernel, target) -> str:
    """Kernels whose code is the same apart from buffer lengths share one compile (a mask changes only the
    lengths of ``values``/``offsets``)."""
    geom = replace(kernel.geometry, nnz=1, nruns=1)
    return repr((geom, kernel.schedule, str(kernel.func.attrs["global_symbol"]), str(target)))


def estimate_kernel(kernel: SparseConv2dKernel, info: TargetInfo, core: Core) -> KernelEstimate:
    """Estimated cycles of ``kernel`` (built for ``info``) on ``core``: llvm-mca per loop body times the trip
    counts of the packed weight (module docstring)."""
    if (core.isa == "aarch64") != (info.family == "arm64"):
        raise ValueError(f"core {core.mcpu} cannot run code for {info.family}")
    key = _code_key(kernel, info.target)
    if key not in _FUNCS:
        _FUNCS[key] = (kernel.func, info.target)
    loops = _loops_of(key, core.isa)
    geom, packed = kernel.geometry, kernel.packed
    regs = registers_per_group(info.family, kernel.schedule.vector_width)
    rmax = packed.max_run
    runs = np.diff(packed.indptr.astype(np.int64)).reshape(geom.num_blocks, rmax)  # [block, k]: length rmax-k
    tiles = _tile_counts(kernel)
    n_tasks = geom.batch * geom.num_blocks

    # the template's segment loops: (accumulators, run length) -> iterations over the whole call
    expected = {}
    for (r, c), count in tiles.items():
        for k in range(rmax):
            length = rmax - k
            key_ = (r * c * regs, length)
            expected[key_] = expected.get(key_, 0) + geom.batch * count * int(runs[:, k].sum())
    found = {}
    for loop in loops:
        acc = loop.accumulators
        key_ = (acc, loop.fmas // acc if acc and loop.fmas % acc == 0 else 0)
        if key_ not in expected:  # accumulators spilled to the stack: match by the FMA count alone
            same = [k for k in expected if k[0] * k[1] == loop.fmas]
            key_ = same[0] if len(same) == 1 else key_
        found.setdefault(key_, []).append(loop)
    missing = set(expected) - set(found)
    extra = set(found) - set(expected)
    if missing or extra:
        raise EstimateError(f"loops of {kernel.func.attrs['global_symbol']} do not match the template: expected "
                            f"(accumulators, run) {sorted(expected)}, found {sorted(found)}")
    estimates = []
    for (acc, length), copies in sorted(found.items()):
        cpi = float(np.mean([run_mca(l.text, core.mcpu, core.triple) for l in copies]))
        estimates.append(LoopEstimate(acc, length, expected[(acc, length)], cpi,
                                      instruction_mix(copies[0].text, core.isa), len(copies)))
    loop_cycles = sum(e.cycles for e in estimates)

    # the code around the loops, once per pass of the enclosing loop: per register tile when that loop holds
    # one tile's segments (the column-tile loop), per task (output block x row tile) otherwise
    tile_cycles = 0.0
    seen = set()
    by_tile = {r * c * regs: count for (r, c), count in tiles.items()}
    empty_blocks = int((runs.sum(axis=1) == 0).sum())
    for loop in loops:
        if loop.outer_id is None or loop.outer_id in seen or not loop.outer_text:
            continue
        seen.add(loop.outer_id)
        same = [l for l in loops if l.outer_id == loop.outer_id]
        if len({l.accumulators for l in same}) == 1 and len(same) == loop.outer_fma_loops:
            passes = n_tasks * by_tile.get(loop.accumulators, 1)
        else:
            tile_rows = min(kernel.schedule.tile_rows, geom.out_height)
            passes = n_tasks * -(-geom.out_height // tile_rows)
        # a pass over an output block without kept positions skips the inner loops and runs its own code
        empty = passes * empty_blocks // geom.num_blocks
        tile_cycles += (passes - empty) * run_mca(loop.outer_text, core.mcpu, core.triple)
        if empty:
            tile_cycles += empty * run_mca(loop.empty_text or loop.outer_text, core.mcpu, core.triple)
    return KernelEstimate(core, loop_cycles, tile_cycles, useful_flops(kernel), peak_flops_per_cycle(core),
                          compulsory_bytes(kernel), estimates)


# ----------------------------------------------------------------------------------------------- layers
@dataclass
class LayerEstimate:
    """A conv of a model on ``core``: the sparse kernel it compiles to and our dense kernel at the same shape."""

    layer: ModelLayer
    schedule: SparseConvSchedule
    sparse: KernelEstimate
    dense: KernelEstimate

    @property
    def speedup_vs_dense(self) -> float:
        return self.dense.cycles / self.sparse.cycles if self.sparse.cycles else float("inf")

    @property
    def attainable_speedup(self) -> float:
        """The most any kernel that writes each output once can gain from this sparsity on the core's model: the
        useful FMAs at the model's peak plus, per output vector, its activation and store
        (:func:`epilogue_cycles_per_vector`), dense over sparse. Where ``1/(1-s)`` is far above it, the output
        work, not the kernel, bounds the speedup (few input channels, e.g. MobileNetV2's expand convs)."""
        core, spec = self.sparse.core, self.layer.spec
        vectors = spec.batch * spec.out_height * spec.out_width * -(-spec.out_channels // core.fma_lanes)
        epilogue = vectors * epilogue_cycles_per_vector(core, self.layer.layout.activation)
        fma = self.sparse.peak_flops_per_cycle
        return (self.dense.flops / fma + epilogue) / (self.sparse.flops / fma + epilogue)

    def row(self) -> dict:
        """A flat JSON-able record (the tool's output)."""
        spec, e = self.layer.spec, self.sparse
        density = float(self.layer.density)
        return {"layer": spec.describe(), "name": self.layer.name, "kernel": f"{spec.kernel[0]}x{spec.kernel[1]}",
                "stride": spec.stride[0], "vector_width": self.layer.vector_width, "density": round(density, 4),
                "schedule": self.schedule.describe(), "core": e.core.mcpu, "est_cycles": round(e.cycles),
                "est_us": round(e.microseconds, 3), "flops": e.flops, "pct_peak": round(e.pct_peak, 1),
                "peak_flop_per_cycle": round(e.peak_flops_per_cycle, 2), "mix": e.mix_text(),
                "loop_cycles": round(e.loop_cycles), "tile_cycles": round(e.tile_cycles),
                "dense_cycles": round(self.dense.cycles), "dense_pct_peak": round(self.dense.pct_peak, 1),
                "est_speedup_vs_dense": round(self.speedup_vs_dense, 3),
                "ideal_speedup": round(1.0 / density, 3) if density > 0 else None,
                "attainable_speedup": round(self.attainable_speedup, 3),
                "mem_bytes": e.mem_bytes, "mem_cycles": round(e.mem_cycles), "memory_bound": e.memory_bound}


def estimate_layer(layer: ModelLayer, weight: np.ndarray, info: TargetInfo, core, *, bias=None,
                   schedule: SparseConvSchedule | None = None):
    """Estimate ``layer`` with its dense OIHW ``weight`` (zeros where pruned) and our dense kernel at its shape,
    both called as in the model (``layer.layout``); ``schedule``: the knobs (default: the target's). ``core``: a
    :class:`Core` (returns a :class:`LayerEstimate`) or a list of them (returns a list; one kernel build)."""
    cores = [core] if isinstance(core, Core) else list(core)
    v = layer.vector_width
    if bias is None and layer.layout.bias:
        bias = np.zeros(layer.spec.out_channels, np.float32)
    sparse_w = BlockSparseWeight.from_dense(np.asarray(weight, np.float32), v)
    sparse = sparse_conv2d_kernel(sparse_w, layer.spec, layer.layout, bias=bias, target=info, schedule=schedule)
    out = [LayerEstimate(layer, sparse.schedule, estimate_kernel(sparse, info, c), _dense_estimate(layer, info, c))
           for c in cores]
    return out[0] if isinstance(core, Core) else out


_DENSE = {}


def _dense_estimate(layer: ModelLayer, info: TargetInfo, core: Core) -> KernelEstimate:
    """Our dense kernel (every block kept, the target's default schedule) at the layer's shape and layout: the
    same for every mask, so estimated once."""
    key = (layer.spec, layer.vector_width, layer.layout, info.key, core)
    if key not in _DENSE:
        dense_w = BlockSparseWeight.from_dense(np.ones(layer.spec.weight_shape, np.float32), layer.vector_width)
        bias = np.zeros(layer.spec.out_channels, np.float32) if layer.layout.bias else None
        dense = sparse_conv2d_kernel(dense_w, layer.spec, layer.layout, bias=bias, target=info)
        _DENSE[key] = estimate_kernel(dense, info, core)
    return _DENSE[key]


def _conv_weights(onnx_model) -> dict:
    """ONNX Conv node name -> its weight (numpy), for convs whose weight is an initializer."""
    from onnx import numpy_helper

    init = {t.name: t for t in onnx_model.graph.initializer}
    weights = {}
    for i, node in enumerate(n for n in onnx_model.graph.node if n.op_type == "Conv"):
        name = node.name or f"Conv_{i}"
        if len(node.input) > 1 and node.input[1] in init:
            weights[name] = numpy_helper.to_array(init[node.input[1]]).astype(np.float32)
    return weights


def estimate_model(model, core, target="arm64", *, input_shapes=None, vector_width=None,
                   schedules: dict | None = None) -> list:
    """:class:`LayerEstimate` of every rewritable conv of an ONNX model (path, bytes or ModelProto), with the
    weights (and so the kept positions) it holds, as the compiler would build them for ``target``; ``core``: a
    :class:`Core` or a list (then per conv one estimate per core, in that order).
    ``schedules``: conv name -> :class:`SparseConvSchedule` (e.g. tuning records) instead of the default."""
    cores = [core] if isinstance(core, Core) else list(core)
    info = resolve_target(target, vector_width)
    onnx_model = frontend.load_onnx(model)
    layers = model_layers(onnx_model, info, input_shapes=input_shapes, vector_width=vector_width)
    weights = _conv_weights(onnx_model)
    out = []
    for layer in layers:
        if layer.name not in weights:
            continue
        schedule = (schedules or {}).get(layer.name)
        out += estimate_layer(layer, weights[layer.name], info, cores, schedule=schedule)
    return out
