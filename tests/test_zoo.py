"""The PyTorch model zoo: shapes, layouts, SIMD pruning, ONNX export."""
import numpy as np
import onnx
import pytest
import torch
from helpers import assert_close, run_onnxruntime
from torch import nn

from alcs_tvm import zoo
from alcs_tvm.sparse_format import block_mask


def _convs(model, groups=None):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and (groups is None or m.groups == groups)]


@pytest.mark.parametrize("name", ["resnet_tiny", "mobilenet_v2_tiny", "small_cnn"])
def test_small_models_run(name):
    model = zoo.get_model(name)
    assert not model.training
    with torch.no_grad():
        y = model(torch.randn(*zoo.DEFAULT_INPUT_SHAPES[name]))
    assert y.shape == (1, 10) and torch.isfinite(y).all()


def test_small_cnn_digits_and_mnist_sizes():
    model = zoo.small_cnn()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert all(c.out_channels % 16 == 0 for c in _convs(model))


def test_resnet18_layout_matches_torchvision():
    model = zoo.resnet18()
    # torchvision resnet18: 11,689,512 parameters, 20 convs (17 3x3/7x7 + 3 downsample 1x1).
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    convs = _convs(model)
    assert len(convs) == 20
    assert (convs[0].kernel_size, convs[0].stride) == ((7, 7), (2, 2))
    assert model.layer4[1].conv2.out_channels == 512 and model.fc.in_features == 512
    assert "layer2.0.downsample.0.weight" in model.state_dict()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_mobilenet_v2_layout_matches_torchvision():
    model = zoo.mobilenet_v2()
    # torchvision mobilenet_v2: 3,504,872 parameters, 52 convs of which 17 depthwise.
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    convs = _convs(model)
    assert len(convs) == 52
    assert sum(c.groups > 1 and c.groups == c.in_channels for c in convs) == 17
    assert model.features[-1][0].out_channels == 1280
    assert isinstance(model.classifier[0], nn.Dropout) and model.classifier[1].in_features == 1280
    assert "features.18.0.weight" in model.state_dict()
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 35
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_pretrained_mobilenet_v2_loads_every_feature_weight():
    model = zoo.mobilenet_v2_imagenet(num_classes=10)
    state = torch.load(zoo._pretrained_weights_path(), map_location="cpu", weights_only=True)
    ours = model.features.state_dict()
    # every pretrained tensor landed somewhere, unchanged (load_state_dict(strict=True) checked the names)
    loaded = sorted(float(t.float().sum()) for t in ours.values())
    assert loaded == pytest.approx(sorted(float(t.float().sum()) for t in state.values()))
    # the inverted-residual mapping: expand conv (96 <- 16) in block 2, the project conv of block 1
    assert model.features[2].conv[0][0].weight.shape == (96, 16, 1, 1)
    assert torch.equal(model.features[2].conv[0][0].weight, state["features.2.conv.0.weight"])
    assert torch.equal(model.features[1].conv[1].weight, state["features.1.conv.3.weight"])
    assert torch.equal(model.features[17].conv[3].running_var, state["features.17.conv.7.running_var"])
    assert model.classifier[1].out_features == 10


def test_pretrained_mobilenet_v2_greyscale_stem_equals_rgb_of_the_same_image():
    rgb = zoo.mobilenet_v2_imagenet(num_classes=10, in_channels=3)
    grey = zoo.mobilenet_v2_imagenet(num_classes=10, in_channels=1)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(2, 3, 64, 64)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="3 \\(RGB\\) or 1"):
        zoo.mobilenet_v2_imagenet(in_channels=2)


def test_registry():
    assert set(zoo.MODELS) == {"resnet18", "resnet_tiny", "mobilenet_v2", "mobilenet_v2_tiny",
                               "mobilenet_v2_imagenet", "small_cnn", "yolo_style", "unet_style",
                               "mobilenet_v3_style"}
    assert set(zoo.DEFAULT_INPUT_SHAPES) == set(zoo.MODELS)
    assert zoo.get_model("small_cnn", num_classes=3, in_channels=2).fc.out_features == 3
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        zoo.get_model("vgg")


@pytest.mark.parametrize("v", [4, 8, 16])
def test_simd_prune(v):
    model = zoo.mobilenet_v2_tiny()
    dw_before = [c.weight.clone() for c in _convs(model) if c.groups > 1]
    fc_before = model.classifier[1].weight.clone()
    zoo.simd_prune_(model, v, 0.5, rng=0)
    for conv in _convs(model, groups=1):
        mask = block_mask(conv.weight.detach().numpy(), v)
        assert abs(1 - mask.mean() - 0.5) < 0.02, conv
    # Depthwise convs and the linear head are left alone by default.
    assert all(torch.equal(a, c.weight) for a, c in zip(dw_before, [c for c in _convs(model) if c.groups > 1]))
    assert torch.equal(fc_before, model.classifier[1].weight)
    zoo.simd_prune_(model, v, 0.75, rng=1, include_linear=True)
    fc = model.classifier[1].weight.detach().numpy()
    assert abs(1 - block_mask(fc, v).mean() - 0.75) < 0.05


def test_simd_prune_is_seeded():
    a = zoo.simd_prune_(zoo.small_cnn(), 8, 0.6, rng=3)
    b = zoo.simd_prune_(zoo.small_cnn(), 8, 0.6, rng=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_export_onnx(tmp_path):
    model = zoo.resnet_tiny()
    path = zoo.export_onnx(model, tmp_path / "r.onnx", (1, 3, 32, 32))
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["input"]
    ops = {n.op_type for n in proto.graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops  # eval-mode BN folded into conv by the exporter
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 32, 32]

    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert_close(run_onnxruntime(path, x), ref, rtol=1e-4)  # atol: 1e-4 * max |ref|


def test_export_keeps_training_mode(tmp_path):
    model = zoo.small_cnn().train()
    zoo.export_onnx(model, tmp_path / "s.onnx", (1, 1, 8, 8))
    assert model.training
