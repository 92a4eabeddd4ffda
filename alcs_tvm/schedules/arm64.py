"""aarch64 NEON knobs for the sparse conv template (4 fp32 lanes per q register, 32 q registers; a group of
V = 8 channels takes two).

The inner statement compiles to ``ldp q`` of the weight vectors, scalar input loads into vector lanes and
by-element FMAs ``fmla vA.4s, vW.4s, vX.s[0]``. Budgets are in q registers, less two per extra tap of a run (its
weight vectors), the rest holding the input lanes a tile reads.

Chosen by ``llvm-mca`` estimates of the generated code on the Neoverse N1 (Cortex-A76) and Cortex-A55 models
(``python tools/estimate_arm64.py --sweep``: the geometric mean of the estimated % of FMA peak over both cores at
0/50/90 % sparsity, docs/arm64.md), not by measurement on a phone:

* V = 8: 28 registers, 14 output pixels (1x14, 2x7 on 7-wide layers) where each tap is its own run (1x1 and
  strided convs): 10-19 % above 8 pixels on MobileNetV2's 1x1 layers, the input lane of each scalar load
  feeding two FMAs; 3x3 stride-1 convs keep three weight pairs live per run and get 12 (1x8, 1x7), within 1-5 %
  of the best tile on every ResNet-18 layer;
* V = 4 (layers whose Cout is not a multiple of 8): 20 registers, 16 in a row (1x14 on 56-wide 3x3 layers:
  two FMA pipes busy behind the 4-cycle FMA latency, where the earlier 14-register budget's 1x8 was not).
"""


def register_budget(family: str, vector_width: int) -> tuple:
    """``(max_accumulators, max_cols)`` for the register tile, in q registers."""
    if vector_width >= 8:
        return 28, 28
    return 20, 16



def loads_bias_per_accumulator(out_width: int, tile_cols: int, activation, tile_tasks: bool = False) -> bool:
    """Whether each accumulator starts from its own copy of the bias in memory (a ``ldr q`` on a load pipe)
    instead of a register copy of one loaded bias (a ``mov`` on the vector pipes that the FMAs, the clamp and the
    q-register stores share): where no column-tile loop surrounds the tile (it spans the output row, or each tile
    is its own task: LLVM would hoist the loads out of that loop and spill them) and the epilogue clamps (ReLU,
    ReLU6: its vector pipes are the tile code's bottleneck). The copies sit 32 bytes apart, so that LLVM does not
    pair them into ``ldp q``, which the Cortex-A55 model issues slower than two ``ldr q``."""
    return (tile_tasks or tile_cols >= out_width) and activation in ("relu", "relu6")


def splits_tasks_per_tile(pointwise: bool, out_height: int, out_width: int, tile_rows: int, tile_cols: int,
                          activation) -> bool:
    """Whether each register tile is its own parallel task (no column-tile loop, so that its accumulators can
    load their own bias copies): 1x1 convs with a clamping epilogue whose rows split into several whole tiles
    (MobileNetV2's expand convs at 28-112 pixels wide), where the tile code is a large share of the time. 3x3
    convs keep the column loop: their runs make the tile code a small share, and the Cortex-A55 model runs the
    per-tile task arithmetic slower."""
    return (pointwise and activation in ("relu", "relu6") and out_width > tile_cols and out_width % tile_cols == 0
            and out_height % tile_rows == 0)

