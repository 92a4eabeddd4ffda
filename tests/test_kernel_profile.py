"""``alcs run --profile``: every kernel of one inference timed on its own, named after the layers it runs."""
import subprocess
import sys

import pytest

from alcs_tvm import compiler, zoo
from alcs_tvm.kernel_profile import format_profile, kernel_kind, profile_library
from alcs_tvm.run import write_sidecar


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A pruned ResNet (residual adds fused, blocked layouts) compiled with its sidecar and report."""
    work = tmp_path_factory.mktemp("profile")
    model = zoo.simd_prune_(zoo.resnet_tiny(), 16, 0.7, rng=3)
    onnx_path = zoo.export_onnx(model, work / "resnet_tiny.onnx", (1, 3, 32, 32))
    executable, report = compiler.compile(onnx_path, "x86")
    lib = str(work / "resnet_tiny.so")
    compiler.export(executable, lib, "x86")
    write_sidecar(lib, report.relax_module)
    report.write(lib + ".report.json")
    return lib, report


def test_every_rewritten_layer_is_a_timed_row(compiled):
    lib, report = compiled
    rows, whole_ms = profile_library(lib, repeat=5)
    assert whole_ms > 0 and all(r.ms > 0 and r.calls >= 1 for r in rows)
    rewritten = [layer.name for layer in report.layers if layer.symbol]
    assert len(rewritten) == 12  # resnet_tiny's convs, all rewritten
    profiled = [name for r in rows for name in r.layers]
    assert sorted(profiled) == sorted(rewritten)  # each layer once, under the kernel that runs it
    for r in rows:
        for name in r.layers:
            assert next(layer.symbol for layer in report.layers if layer.name == name) == r.symbol
        assert r.kind == kernel_kind(r.symbol)
    assert [r.total_ms for r in rows] == sorted((r.total_ms for r in rows), reverse=True)
    assert {r.kind for r in rows} >= {"alcs conv", "matmul"}
    table = format_profile(rows, whole_ms)
    assert rewritten[0] in table and "whole inference" in table


def test_cli_profile_and_its_errors(compiled, tmp_path):
    lib, _ = compiled
    run = [sys.executable, "-m", "alcs_tvm.cli", "run", lib]
    result = subprocess.run(run + ["--profile", "--repeat", "3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "alcs_spconv_" in result.stdout and "% of total" in result.stdout
    result = subprocess.run(run + ["--profile", "--rpc", "127.0.0.1:9"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "alcs run: error: --profile runs on this host only" in result.stderr
