"""``alcs tune``: per-conv schedule search on a device, records, and ``alcs compile --tuning``."""
import json

import numpy as np
import pytest
from helpers import assert_close, run_cli, run_onnxruntime, run_vm

from alcs_tvm import zoo
from alcs_tvm.autotune import candidate_schedules, tune_model
from alcs_tvm.tuning_records import TuningRecords
from alcs_tvm.compiler import compile as alcs_compile
from alcs_tvm.files import TableMismatchError
from alcs_tvm.kernels import max_run_length
from alcs_tvm.layer import Conv2dSpec
from alcs_tvm.schedules import default_sparse_conv_schedule
from alcs_tvm.schedules.arm64 import register_budget as arm64_register_budget
from alcs_tvm.schedules.x86 import register_budget


def assert_picks_the_measured_fastest(entry, candidates):
    """A tuning record chose the candidate its own measurements found fastest: its schedule is the argmin of the
    ``candidates`` times (which differ: a real choice was made), ``tuned_ms`` is that minimum and ``default_ms``
    the first candidate's (the default schedule's) time."""
    measured = entry["candidates"]
    times = [c["ms"] for c in measured]
    assert len(measured) == candidates and all(t > 0 for t in times), measured
    assert len(set(times)) > 1, f"all {candidates} candidates timed the same: no choice was tested ({times})"
    fastest = min(range(len(times)), key=times.__getitem__)
    assert TuningRecords.schedule_of(entry).describe() == measured[fastest]["schedule"], measured
    assert entry["tuned_ms"] == times[fastest] == min(times)
    assert entry["default_ms"] == times[0]
    assert TuningRecords.schedule_of(dict(entry, schedule=entry["default_schedule"])).describe() == \
        measured[0]["schedule"]


@pytest.fixture(scope="module")
def pruned_resnet(tmp_path_factory):
    model = zoo.get_model("resnet_tiny").eval()
    zoo.simd_prune_(model, 16, 0.7, rng=1)
    path = tmp_path_factory.mktemp("tune") / "resnet_tiny.onnx"
    zoo.export_onnx(model, path, (1, 3, 32, 32))
    return path


@pytest.mark.parametrize("height,width,kernel,family,v", [(56, 56, 3, "x86-avx512", 16), (7, 7, 1, "x86-avx512", 16),
                                                          (14, 14, 3, "x86-avx512", 32), (28, 28, 3, "arm64", 4)])
def test_candidates_start_with_the_default_and_fit_the_register_budget(height, width, kernel, family, v):
    spec = Conv2dSpec.create((1, 32, height, width), (64, 32, kernel, kernel), 1, kernel // 2)
    candidates = candidate_schedules(family, spec, v, limit=12)
    assert candidates[0] == default_sparse_conv_schedule(family, v, spec.out_height, spec.out_width,
                                                         max_run_length(spec), pointwise=kernel == 1)
    assert candidate_schedules(family, spec, v, density=0.1)[0] == default_sparse_conv_schedule(
        family, v, spec.out_height, spec.out_width, max_run_length(spec), pointwise=kernel == 1, density=0.1)
    assert len(candidates) == len(set(candidates)) and 3 <= len(candidates) <= 12
    assert {c.row_outer for c in candidates} == {False, True}
    budget = (register_budget if family.startswith("x86") else arm64_register_budget)(family, v)[0]
    lanes = {"x86-avx512": 16, "arm64": 4}[family]
    for c in candidates:
        assert c.vector_width == v and c.tile_cols <= spec.out_width and c.tile_rows <= spec.out_height
        assert c.accumulators * max(1, v // lanes) <= budget
    assert len(candidate_schedules(family, spec, v, limit=2)) == 2


@pytest.mark.device
def test_tune_records_resume_and_compile_with_them(rpc_devices, pruned_resnet, tmp_path):
    """Tuning over the real tracker's x86 server: one record per rewritable conv whose schedule is the fastest of
    its measured candidates; a rerun measures nothing; compiling with the records builds each conv with its
    schedule (the report says which) and the model still equals ONNX Runtime - also with a record forced to an
    unusual schedule, so every candidate the tuner may pick is a correct kernel."""
    out = tmp_path / "records.json"
    kw = dict(tracker=rpc_devices.tracker, key=rpc_devices.x86_key, repeat=3, min_repeat_ms=1, max_candidates=3,
              quiet=True)
    records = tune_model(str(pruned_resnet), str(out), "x86", **kw)
    _, report = alcs_compile(str(pruned_resnet), "x86")
    convs = [d.name for d in report.layers if d.op == "conv2d"]
    assert sorted(records.layers) == sorted(convs)
    for entry in records.layers.values():
        assert_picks_the_measured_fastest(entry, 3)
    assert TuningRecords.load(str(out)).layers == records.layers
    again = tune_model(str(pruned_resnet), str(out), "x86", **kw)
    assert again.layers == records.layers

    # force one conv onto a 1-row, row-outer tile: correctness of a non-default schedule through the pass
    data = json.loads(out.read_text())
    forced = convs[1]
    data["layers"][forced]["schedule"].update({"tile_rows": 1, "tile_cols": 4, "row_outer": True})
    data["layers"][convs[2]]["key"] = "another shape"  # a stale record: ignored, and said so
    out.write_text(json.dumps(data))
    executable, report = alcs_compile(str(pruned_resnet), "x86", tuning=str(out))
    rows = {d.name: d.implementation for d in report.layers}
    assert "tuned schedule 1x4 row-outer" in rows[forced]
    assert "default schedule (tuning record is for another shape or layout)" in rows[convs[2]]
    assert all("tuned schedule" in rows[c] for c in convs if c != convs[2])
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    # |out - expected| <= 1e-4 * max |expected|, no relative term
    expected = run_onnxruntime(pruned_resnet, x)
    assert_close(run_vm(executable, x), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@pytest.mark.device
def test_records_for_another_target_or_corrupted_are_one_line_errors(rpc_devices, pruned_resnet, tmp_path):
    out = tmp_path / "records.json"
    tune_model(str(pruned_resnet), str(out), "x86", tracker=rpc_devices.tracker, key=rpc_devices.x86_key, repeat=3,
               min_repeat_ms=1, max_candidates=1, quiet=True)
    with pytest.raises(TableMismatchError, match="tuning records were measured for target"):
        alcs_compile(str(pruned_resnet), "x86-avx2", tuning=str(out))
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "alcs-tvm-tuning/1", "target": {}, "target_family": "x86", "tvm_version": "0", '
                   '"layers": {"conv": {"key": "k"}}}')
    for path, expect in ((bad, "corrupted"), (tmp_path / "none.json", "no tuning records")):
        r = run_cli("compile", pruned_resnet, "-o", tmp_path / "m.so", "--tuning", path, timeout=300)
        assert r.returncode == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # the CLI over RPC prints the per-conv table; resuming on another device key is refused
    r = run_cli("tune", pruned_resnet, "-o", out, "--rpc", "127.0.0.1:1", "--quiet", timeout=300)
    assert r.returncode == 2 and "tuned on device" in r.stderr


@pytest.mark.device
def test_tune_on_emulated_arm64_then_compile_and_run_there(rpc_devices, cross_cxx, tmp_path):
    """The phone path: `alcs tune --target arm64` over the tracker (kernels cross-compiled, timed on the emulated
    ARM64 device), `alcs compile --tuning`, and the tuned library run on the device equals PyTorch."""
    import torch

    from alcs_tvm.run import run_model

    model = zoo.get_model("resnet_tiny").eval()
    zoo.simd_prune_(model, 4, 0.8, rng=2)
    onnx_path = tmp_path / "resnet_tiny.onnx"
    zoo.export_onnx(model, onnx_path, (1, 3, 16, 16))
    records = tmp_path / "arm64.tuning.json"
    r = run_cli("tune", onnx_path, "--target", "arm64", "--rpc-tracker", rpc_devices.tracker, "--rpc-key",
                rpc_devices.arm64_key, "-o", records, "--candidates", "2", "--repeat", "3", "--min-repeat-ms", "1",
                "--quiet", timeout=900)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "default" in r.stdout
    tuned = TuningRecords.load(records)
    assert tuned.target_family == "arm64" and tuned.device_key == rpc_devices.arm64_key
    assert all(e["schedule"]["vector_width"] == 4 for e in tuned.layers.values())
    for entry in tuned.layers.values():
        assert_picks_the_measured_fastest(entry, 2)
    library = tmp_path / "tuned_arm64.so"
    r = run_cli("compile", onnx_path, "--target", "arm64", "--tuning", records, "-o", library, timeout=900)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("tuned schedule") == len(tuned.layers)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    outputs, _ = run_model(library, {"input": x}, tracker=rpc_devices.tracker, key=rpc_devices.arm64_key,
                           timeout=300)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert_close(outputs[0], expected, rtol=1e-4)  # atol: 1e-4 * max |expected|
