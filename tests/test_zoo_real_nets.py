"""The zoo's realistic networks (YOLOv8n-, U-Net- and MobileNetV3-Small-style) through `alcs_tvm.compiler.compile`
for x86, against ONNX Runtime, at small inputs."""
import functools

import helpers
import numpy as np
import onnx
import pytest
from helpers import run_onnxruntime, run_vm

from alcs_tvm import zoo
from alcs_tvm.compiler import compile as alcs_compile

RTOL = 1e-4

assert_close = functools.partial(helpers.assert_close, rtol=RTOL)  # atol: RTOL * max |expected|

# the input each net is tested at (yolo_style's side must be a multiple of 32, unet_style's of 16), and the ONNX
# ops it is in the zoo for: the export has to still contain them
CASES = {
    "yolo_style": ((1, 3, 96, 96), {"Sigmoid", "Mul", "Split", "Concat", "MaxPool", "Resize", "Add"}),
    "unet_style": ((1, 3, 64, 64), {"ConvTranspose", "MaxPool", "Concat"}),
    "mobilenet_v3_style": ((1, 3, 64, 64), {"HardSwish", "HardSigmoid", "GlobalAveragePool", "Mul", "Gemm"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_real_net_compiles_and_matches_onnx_runtime(tmp_path, name):
    shape, ops = CASES[name]
    path = zoo.export_onnx(zoo.get_model(name), tmp_path / f"{name}.onnx", shape)
    exported = {node.op_type for node in onnx.load(path).graph.node}
    assert ops <= exported, f"{name} exports no {sorted(ops - exported)}"
    x = np.random.default_rng(helpers.stable_seed(name)).standard_normal(shape).astype(np.float32)
    executable, _ = alcs_compile(path, "x86")
    assert_close(run_vm(executable, x), run_onnxruntime(path, x))
