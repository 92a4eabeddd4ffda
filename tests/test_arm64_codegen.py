"""The sparse conv cross-compiled for aarch64 NEON: V=4, exported with the Debian cross compiler, and the
object code's inner loop is by-element vector FMAs on .4s registers. (Running it is tests/test_device_rpc.py.)"""
import re
import shutil
import subprocess

import numpy as np
import pytest
from helpers import assert_aarch64_elf

from alcs_tvm.kernels import sparse_conv2d_kernel
from alcs_tvm.layer import Conv2dSpec, KernelLayout
from alcs_tvm.sparse_format import BlockSparseWeight, random_block_sparse
from alcs_tvm.target import resolve_target


@pytest.mark.parametrize("kernel, stride, output_blocked", [(3, 1, True), (1, 1, False), (3, 2, True)])
def test_arm64_library_has_neon_fmla(tmp_path, cross_cxx, kernel, stride, output_blocked):
    import tvm
    from tvm.support import cc

    info = resolve_target("arm64")
    assert info.vector_width == 4 and info.is_cross
    rng = np.random.default_rng(0)
    weight = random_block_sparse(rng.standard_normal((32, 16, kernel, kernel)).astype(np.float32), 4, 0.5, rng)
    spec = Conv2dSpec.create((1, 16, 14, 14), weight.shape, stride, kernel // 2, 1)
    sparse = BlockSparseWeight.from_dense(weight, info.vector_width)
    layout = KernelLayout(bias=True, activation="relu", output_blocked=output_blocked)
    op = sparse_conv2d_kernel(sparse, spec, layout, target=info, bias=np.ones(32, np.float32))
    executable = tvm.compile(op.func, target=info.target)
    library = tmp_path / "sparse_conv_arm64.so"
    executable.export_library(str(library), fcompile=cc.cross_compiler(cross_cxx))
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    assert objdump, "binutils-aarch64-linux-gnu must come with the cross toolchain"
    assert_aarch64_elf(library)  # the ELF header itself, whether or not `file` is installed
    if shutil.which("file"):
        file_type = subprocess.run(["file", str(library)], capture_output=True, text=True, check=True).stdout
        assert "aarch64" in file_type.lower() or "arm" in file_type.lower(), file_type
    disassembly = subprocess.run([objdump, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    fmla = re.findall(r"\bfmla\s+v\d+\.4s, v\d+\.4s, v\d+\.s\[\d\]", disassembly)
    tile = op.schedule.tile_rows * op.schedule.tile_cols
    # the unrolled register tile: one by-element FMA per output pixel of the tile, per kept weight vector
    assert len(fmla) >= tile, f"expected >= {tile} NEON by-element fmla, found {len(fmla)}"
