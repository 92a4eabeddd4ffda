"""The estimator on real kernels: real generated aarch64/x86 assembly, real llvm-mca output, trip counts read from
real packed weights (alcs_tvm/estimate.py)."""
import numpy as np
import pytest

from alcs_tvm import estimate as est
from alcs_tvm.compiler import ModelLayer
from alcs_tvm.kernels import sparse_conv2d_kernel
from alcs_tvm.layer import Conv2dSpec, KernelLayout
from alcs_tvm.schedules import SparseConvSchedule
from alcs_tvm.sparse_format import BlockSparseWeight, random_block_sparse
from alcs_tvm.target import resolve_target

LAYOUT = KernelLayout(bias=True, activation="relu", input_prepadded=True, output_blocked=True, out_block=4)


@pytest.fixture(scope="module")
def arm64():
    est.ensure_llvm_mca(verbose=False)
    return resolve_target("arm64")


def _kernel(info, sparsity, cin=32, cout=32, hw=14, k=3, v=4, seed=0, layout=LAYOUT):
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    weight = random_block_sparse(dense, v, sparsity, rng)
    spec = Conv2dSpec.create((1, cin, hw, hw), weight.shape, 1, k // 2)
    bias = np.zeros(cout, np.float32) if layout.bias else None
    return sparse_conv2d_kernel(BlockSparseWeight.from_dense(weight, v), spec, layout, bias=bias, target=info), \
        weight, spec


def test_finds_one_fma_loop_per_run_length_in_real_aarch64_code(arm64):
    kernel, _, _ = _kernel(arm64, 0.0)
    asm = est.kernel_asm(kernel.func, arm64.target)
    assert "fmla" in asm and ".4s" in asm
    loops = est.find_fma_loops(asm, "aarch64")
    tile = kernel.schedule.tile_rows * kernel.schedule.tile_cols
    # runs of 3, 2 and 1 taps of a 3x3 conv, each FMA-ing the whole register tile once per tap
    assert sorted((l.accumulators, l.fmas) for l in loops) == [(tile, tile), (tile, 2 * tile), (tile, 3 * tile)]
    for loop in loops:
        mix = est.instruction_mix(loop.text, "aarch64")
        assert mix["fma"] == loop.fmas and mix["branch"] >= 1 and mix["load"] >= 2 and mix["spill"] == 0


def test_parses_llvm_mca_on_the_loop_for_both_cores(arm64):
    kernel, _, _ = _kernel(arm64, 0.0)
    loop = max(est.find_fma_loops(est.kernel_asm(kernel.func, arm64.target), "aarch64"), key=lambda l: l.fmas)
    for name, core in est.CORES.items():
        cycles = est.run_mca(loop.text, core.mcpu, core.triple)
        peak = est.peak_flops_per_cycle(core)
        # no core does more FMAs per cycle than its model's peak; none takes 10x longer than the FMAs need
        fma_cycles = loop.fmas * 2 * 4 / peak
        assert fma_cycles <= cycles * 1.001 and cycles < 10 * fma_cycles, (name, cycles, fma_cycles)
    # Arm's Neoverse N1 guide: two 128-bit FMA pipes -> 2 x 4 lanes x 2 FLOP
    assert est.peak_flops_per_cycle(est.CORES["neoverse-n1"]) == pytest.approx(16, rel=0.02)


def test_trip_counts_follow_the_kept_positions(arm64):
    estimates = {s: est.estimate_kernel(_kernel(arm64, s)[0], arm64, est.CORES["neoverse-n1"])
                 for s in (0.0, 0.5, 0.9)}
    assert estimates[0.9].cycles < estimates[0.5].cycles < estimates[0.0].cycles
    assert estimates[0.9].loop_cycles < 0.35 * estimates[0.5].loop_cycles
    # the code around the loops runs once per register tile whatever the mask
    assert estimates[0.9].tile_cycles == pytest.approx(estimates[0.0].tile_cycles)
    flops = {s: e.flops for s, e in estimates.items()}
    assert flops[0.0] == 2 * 32 * 32 * 9 * 14 * 14
    assert flops[0.5] == pytest.approx(flops[0.0] / 2, rel=0.01)
    iterations = {s: sum(l.iterations for l in e.loops) for s, e in estimates.items()}
    assert iterations[0.9] < iterations[0.5] < iterations[0.0]


def test_an_empty_weight_costs_only_the_tiles(arm64):
    kernel, _, _ = _kernel(arm64, 1.0)
    e = est.estimate_kernel(kernel, arm64, est.CORES["cortex-a55"])
    assert e.loop_cycles == 0 and e.tile_cycles > 0 and e.flops == 0


def test_layer_estimate_row_and_memory_bound(arm64):
    kernel_1x1, weight, spec = _kernel(arm64, 0.9, cin=8, cout=64, hw=56, k=1)
    layer = ModelLayer("conv", spec, 4, 0.1, LAYOUT)
    row = est.estimate_layer(layer, weight, arm64, est.CORES["neoverse-n1"]).row()
    for key in ("layer", "kernel", "core", "est_cycles", "flops", "pct_peak", "est_speedup_vs_dense",
                "memory_bound"):
        assert key in row
    assert row["kernel"] == "1x1" and row["core"] == "neoverse-n1"
    assert 1.0 < row["est_speedup_vs_dense"] <= row["ideal_speedup"] * 1.1
    # 8 input channels at 10 %: under one FMA per output value against a 4-byte store each - bandwidth-bound
    assert row["memory_bound"] is True
    e = est.estimate_kernel(kernel_1x1, arm64, est.CORES["neoverse-n1"])
    assert e.mem_bytes >= 4 * (8 * 56 * 56 + 64 * 56 * 56)


def test_attainable_speedup_counts_the_output_work_every_kernel_does(arm64):
    """Few input channels at 90 %: the FMAs left are fewer than the clamps and stores of the output, so no kernel
    gets near 1/(1-s); the bound is the FMAs at the model's peak plus each output vector's epilogue."""
    n1 = est.CORES["neoverse-n1"]
    store, relu, relu6 = (est.epilogue_cycles_per_vector(n1, a) for a in (None, "relu", "relu6"))
    assert 0 < store <= relu < relu6  # on the N1 model a q store and each clamp take a vector pipe
    _, weight, spec = _kernel(arm64, 0.9, cin=8, cout=64, hw=56, k=1)
    estimate = est.estimate_layer(ModelLayer("conv", spec, 4, 0.1, LAYOUT), weight, arm64, n1)
    density = estimate.sparse.flops / estimate.dense.flops
    fma = 8 / 2  # cycles per output vector, dense: one by-element fmla per input channel, two per cycle
    assert estimate.attainable_speedup == pytest.approx((fma + relu) / (fma * density + relu), rel=0.02)
    assert estimate.attainable_speedup < 0.85 / density < estimate.row()["ideal_speedup"]


def test_x86_kernel_on_the_host_model():
    info = resolve_target("x86")
    if info.family != "x86-avx512":
        pytest.skip("the host has no AVX-512")
    core = est.host_core(3.0)
    kernel, _, _ = _kernel(info, 0.5, cout=64, v=info.group_width(64), layout=KernelLayout(
        input_prepadded=True, output_blocked=True))
    e = est.estimate_kernel(kernel, info, core)
    assert e.loops and all(l.mix["fma"] > 0 for l in e.loops)
    assert 0 < e.pct_peak <= 100.5


def test_tune_by_estimate_without_a_device(tmp_path):
    """`alcs tune --target arm64 --estimate CORE`: no device, the records say estimated, and `alcs compile
    --tuning` reports those schedules as estimated."""
    import subprocess
    import sys
    from pathlib import Path

    from alcs_tvm import zoo
    from alcs_tvm.tuning_records import TuningRecords

    model = zoo.get_model("small_cnn").eval()  # three distinct convs: each layer's record is what is checked
    zoo.simd_prune_(model, resolve_target("arm64"), 0.5, rng=0)
    onnx_path = zoo.export_onnx(model, tmp_path / "tiny.onnx", (1, 1, 16, 16))
    records = tmp_path / "estimated.json"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "alcs_tvm.cli", *map(str, args)], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parent.parent, timeout=900)

    r = cli("tune", onnx_path, "--target", "arm64", "--estimate", "neoverse-n1", "-o", records, "--candidates", "2",
            "--quiet")
    assert r.returncode == 0, r.stderr
    assert "ESTIMATED by llvm-mca -mcpu=neoverse-n1" in r.stdout
    tuned = TuningRecords.load(records)
    assert tuned.device_key == "llvm-mca:neoverse-n1" and tuned.settings["estimate"] == "neoverse-n1"
    assert len(tuned.layers) == 3 and all(e["estimated"] == "llvm-mca -mcpu=neoverse-n1" for e in tuned.layers.values())
    for entry in tuned.layers.values():  # the schedule kept is the candidate estimated fastest
        fastest = min(entry["candidates"], key=lambda c: c["ms"])
        assert len(entry["candidates"]) == 2 and entry["tuned_ms"] == fastest["ms"]
        assert SparseConvSchedule(**entry["schedule"]).describe() == fastest["schedule"]
    r = cli("compile", onnx_path, "--target", "arm64", "--tuning", records, "-o", tmp_path / "tiny.so")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("estimated schedule") == len(tuned.layers) and "tuned schedule" not in r.stdout
    r = cli("tune", onnx_path, "--target", "x86", "--estimate", "neoverse-n1", "-o", tmp_path / "x.json")
    assert r.returncode != 0 and "not the x86" in r.stderr
