"""aarch64 NEON knobs for the sparse conv template (V=4 fp32 lanes, 32 q registers).

The inner statement compiles to ``ldr q`` of the weight vector, scalar input loads into vector lanes and
by-element FMAs ``fmla vA.4s, vW.4s, vX.s[0]``; 14 accumulators leave registers for the loaded inputs.
"""


def register_budget(family: str, vector_width: int) -> tuple:
    """``(max_accumulators, max_cols)`` for the register tile."""
    return 14, 14
