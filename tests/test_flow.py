"""``alcs flow`` (the README's main job) end to end on the x86 RPC device of the session's real tracker: train,
profile, prune under the budget, compile, run, and the compiled libraries classify like PyTorch."""
import json
import shutil

import pytest
import torch

from alcs_tvm import cli, flow


@pytest.fixture(scope="module")
def flow_run(rpc_devices, tmp_path_factory):
    work = tmp_path_factory.mktemp("flow")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = flow.run_flow("small_cnn", "digits", "x86", work_dir=str(work), tracker=rpc_devices.tracker,
                               key=rpc_devices.x86_key, pretrain_epochs=6, admm_epochs=2, finetune_epochs=2,
                               batch_size=32, sparsities=(0.0, 0.5, 0.9), profile_repeat=3, run_repeat=5,
                               log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return work, result


@pytest.mark.device
def test_flow_meets_budget_and_libraries_match_torch(flow_run):
    work, r = flow_run
    assert r.dense_accuracy > 0.9
    assert r.pruned_predicted_ms <= r.budget_ms + 1e-9 < r.dense_predicted_ms
    # the compiled libraries run the same networks as PyTorch: same test images, same answers (up to ties)
    assert abs(r.dense_library_accuracy - r.dense_accuracy) <= 0.01
    assert abs(r.pruned_library_accuracy - r.pruned_accuracy) <= 0.01
    assert r.pruned_accuracy > 0.8
    assert r.sparse_layers, "the pruned convs must run sparse"
    assert any(s > 0.3 for s in r.sparsities.values())
    assert r.dense_measured_ms > 0 and r.pruned_measured_ms > 0
    summary = json.loads((work / "summary.json").read_text())
    assert summary["budget_ms"] == pytest.approx(r.budget_ms)
    for name in ("dense.onnx", "pruned.onnx", "dense.so", "pruned.so", "latency.json", "summary.png"):
        assert (work / name).is_file(), name


@pytest.mark.device
def test_flow_rerun_reuses_the_trained_model_and_table(flow_run, rpc_devices, tmp_path):
    """A rerun in a copy of the first run's work directory (the first run's files stay as that run left them, for
    the other tests) loads its dense model and measures nothing again."""
    first_work, first = flow_run
    work = tmp_path / "flow"
    shutil.copytree(first_work, work)
    table_before = json.loads((work / "latency.json").read_text())["layers"]
    logs = []
    flow.run_flow("small_cnn", "digits", "x86", work_dir=str(work), tracker=rpc_devices.tracker,
                  key=rpc_devices.x86_key, pretrain_epochs=6, admm_epochs=1, finetune_epochs=1, batch_size=32,
                  sparsities=(0.0, 0.5, 0.9), profile_repeat=3, run_repeat=3, eval_images=50,
                  budget_ms=first.budget_ms, log=logs.append)
    assert any("loaded the dense model trained by a previous run" in line for line in logs)
    assert json.loads((work / "latency.json").read_text())["layers"] == table_before  # nothing re-measured


def test_flow_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["flow", "--data", "nosuch", "--work-dir", str(tmp_path)]) == 2
    assert "unknown data set 'nosuch'" in capsys.readouterr().err
    assert cli.main(["flow", "--target", "arm64", "--work-dir", str(tmp_path)]) == 2
    assert "cannot run on this host" in capsys.readouterr().err
    assert cli.main(["flow", "--budget-fraction", "1.5", "--work-dir", str(tmp_path)]) == 2
    assert "budget fraction" in capsys.readouterr().err
    assert cli.main(["flow", "--rpc-tracker", "127.0.0.1:1", "--rpc-key", "x", "--work-dir", str(tmp_path),
                     "--device-timeout", "3"]) == 2
    err = capsys.readouterr().err
    assert "127.0.0.1:1" in err and len(err.strip().splitlines()) == 1


def test_summary_says_what_budget_to_ask_for_when_the_device_measured_over_it():
    from alcs_tvm.flow import FlowResult
    from alcs_tvm.pruning import over_budget_hint

    result = FlowResult("m", "d", "x86", budget_ms=1.0, dense_accuracy=0.9, pruned_accuracy=0.9,
                        dense_library_accuracy=0.9, pruned_library_accuracy=0.9, dense_predicted_ms=2.0,
                        pruned_predicted_ms=1.0, dense_measured_ms=2.0, pruned_measured_ms=1.1, sparsities={},
                        sparse_layers=[], dense_layers={})
    last = result.summary().splitlines()[-1]
    assert "over budget" in last and "--budget-ms 0.9091" in last and "9% low" in last
    result.pruned_measured_ms = 1.01  # within the 2% a build's timings repeat to: no hint
    assert "over budget" not in result.summary()
    assert over_budget_hint(1.0, 1.0, None) == []  # alcs prune --no-measure
