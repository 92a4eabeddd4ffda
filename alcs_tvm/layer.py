"""What one convolution is and how its kernel is called: the one description shared by the pass, the
profiler, the tuner and the pruner (numpy only, no TVM).

* :class:`Conv2dSpec`: the geometry of an NCHW/OIHW ``groups == 1`` convolution.
* :class:`KernelLayout`: how a rewritten conv's kernel is called inside its model - its fused epilogue (bias,
  activation, a residual add) and the layouts it shares with its neighbours (pre-padded and channel-blocked
  input and output). A kernel measured for a latency table or a tuning record must be called the same way.
* :func:`layer_key`: the text identifying a conv configuration in latency tables and tuning records.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = ["Conv2dSpec", "KernelLayout", "layer_key", "without_width", "conv_output_size", "normalize_pair",
           "normalize_padding", "ACTIVATIONS"]

#: epilogue activations the kernels fuse
ACTIVATIONS = (None, "relu", "relu6", "silu", "hardswish", "hardsigmoid", "sigmoid", "prelu")


def conv_output_size(padded: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """Output pixels along one axis of a convolution (or pooling window) over ``padded`` input pixels."""
    return (padded - dilation * (kernel - 1) - 1) // stride + 1


def normalize_pair(value, name: str) -> tuple:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value}")
    return value


def normalize_padding(value) -> tuple:
    """Normalise padding to ``(top, left, bottom, right)`` (ONNX order is top, left, bottom, right)."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * 4
    value = tuple(int(v) for v in value)
    if len(value) == 2:
        return value[0], value[1], value[0], value[1]
    if len(value) == 4:
        return value
    raise ValueError(f"padding must be an int, (pad_h, pad_w) or (top, left, bottom, right), got {value}")


@dataclass(frozen=True)
class Conv2dSpec:
    """Geometry of one NCHW/OIHW ``groups == 1`` convolution."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple  # (kh, kw)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)  # (top, left, bottom, right)
    dilation: tuple = (1, 1)

    @classmethod
    def create(cls, input_shape, weight_shape, stride=1, padding=0, dilation=1) -> "Conv2dSpec":
        input_shape = tuple(int(d) for d in input_shape)
        weight_shape = tuple(int(d) for d in weight_shape)
        if len(input_shape) != 4:
            raise ValueError(f"conv input must be 4-D NCHW, got shape {input_shape}")
        if len(weight_shape) != 4:
            raise ValueError(f"conv weight must be 4-D OIHW, got shape {weight_shape}")
        if input_shape[1] != weight_shape[1]:
            if weight_shape[1] and input_shape[1] % weight_shape[1] == 0:
                raise ValueError(
                    f"grouped convolution (groups={input_shape[1] // weight_shape[1]}) is not supported by the "
                    f"sparse operator: input has {input_shape[1]} channels, weight {weight_shape[1]}")
            raise ValueError(f"input channels {input_shape[1]} do not match weight input channels "
                             f"{weight_shape[1]} (input {input_shape}, weight {weight_shape})")
        spec = cls(input_shape[0], input_shape[1], input_shape[2], input_shape[3], weight_shape[0],
                   weight_shape[2:], normalize_pair(stride, "stride"), normalize_padding(padding),
                   normalize_pair(dilation, "dilation"))
        spec.validate()
        return spec

    def validate(self):
        if min(self.batch, self.in_channels, self.height, self.width, self.out_channels, *self.kernel) < 1:
            raise ValueError(f"conv dimensions must be positive: {self}")
        if min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"invalid stride/dilation/padding: {self.stride}/{self.dilation}/{self.padding}")
        if self.out_height < 1 or self.out_width < 1:
            raise ValueError(f"conv output would be empty ({self.out_height}x{self.out_width}) for {self}")

    @property
    def padded_height(self) -> int:
        return self.height + self.padding[0] + self.padding[2]

    @property
    def padded_width(self) -> int:
        return self.width + self.padding[1] + self.padding[3]

    @property
    def out_height(self) -> int:
        return conv_output_size(self.padded_height, self.kernel[0], self.stride[0], self.dilation[0])

    @property
    def out_width(self) -> int:
        return conv_output_size(self.padded_width, self.kernel[1], self.stride[1], self.dilation[1])

    @property
    def input_shape(self) -> tuple:
        return self.batch, self.in_channels, self.height, self.width

    @property
    def weight_shape(self) -> tuple:
        return (self.out_channels, self.in_channels) + tuple(self.kernel)

    @property
    def output_shape(self) -> tuple:
        return self.batch, self.out_channels, self.out_height, self.out_width

    @property
    def dense_flops(self) -> int:
        return 2 * self.batch * self.out_channels * self.out_height * self.out_width * \
            self.in_channels * self.kernel[0] * self.kernel[1]

    def describe(self) -> str:
        kh, kw = self.kernel
        text = f"{kh}x{kw} {self.in_channels}->{self.out_channels} @{self.height}x{self.width}"
        if self.stride != (1, 1):
            text += f" s{self.stride[0]}" if self.stride[0] == self.stride[1] else f" s{self.stride}"
        if any(self.padding):
            text += f" p{self.padding[0]}" if len(set(self.padding)) == 1 else f" p{self.padding}"
        if self.dilation != (1, 1):
            text += f" d{self.dilation[0]}"
        if self.batch != 1:
            text += f" n{self.batch}"
        return text


    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Conv2dSpec":
        return cls(int(data["batch"]), int(data["in_channels"]), int(data["height"]), int(data["width"]),
                   int(data["out_channels"]), _ints(data["kernel"], 2), _ints(data["stride"], 2),
                   _ints(data["padding"], 4), _ints(data["dilation"], 2))


def _ints(values, n: int) -> tuple:
    values = tuple(int(v) for v in values)
    if len(values) != n:
        raise ValueError(f"expected {n} integers, got {values}")
    return values


@dataclass(frozen=True)
class KernelLayout:
    """How a conv's kernel is called in its model.

    ``input_prepadded``: the input already carries the conv's padding as a zero border (written so by the
    previous layer), in NCHW or, with ``input_block = b > 1``, NCHW[b]c. ``input_border``: that border when it is
    wider than this conv's padding (one tensor read by several convs, padded for the widest).
    ``output_blocked``: the output is NCHW[b]c (one vector store per pixel) with ``out_block = b`` channels per
    block (0: the conv's group width), and ``output_pad`` a zero border around it for the next conv.
    ``residual``: ``"nchw"`` or ``"blocked"`` (NCHW[b]c with a ``residual_pad`` border): a shortcut added before
    the activation (a ResNet block's add).
    """

    bias: bool = False
    activation: str | None = None
    input_prepadded: bool = False
    input_block: int = 1
    output_blocked: bool = False
    output_pad: tuple = (0, 0, 0, 0)
    input_border: tuple | None = None
    residual: str | None = None
    residual_pad: tuple = (0, 0, 0, 0)
    out_block: int = 0

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.residual not in (None, "nchw", "blocked"):
            raise ValueError(f"residual must be None, 'nchw' or 'blocked', got {self.residual!r}")
        # plain ints and tuples whatever the caller passed (lists from JSON, numpy ints), so equal layouts compare
        # and hash equal
        object.__setattr__(self, "output_pad", _ints(self.output_pad, 4))
        object.__setattr__(self, "residual_pad", _ints(self.residual_pad, 4))
        if self.input_border is not None:
            object.__setattr__(self, "input_border", _ints(self.input_border, 4))
        for name in ("bias", "input_prepadded", "output_blocked"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        object.__setattr__(self, "input_block", int(self.input_block))
        object.__setattr__(self, "out_block", int(self.out_block))

    def to_json(self) -> dict:
        data = asdict(self)
        for name in ("output_pad", "residual_pad", "input_border"):
            data[name] = None if data[name] is None else list(data[name])
        return data

    @classmethod
    def from_json(cls, data: dict) -> "KernelLayout":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown kernel layout fields {sorted(unknown)}")
        return cls(**data)


def layer_key(spec: Conv2dSpec, vector_width: int) -> str:
    """Identifies a conv configuration: identical layers (shape, stride, padding, dilation, V) share one entry."""
    kh, kw = spec.kernel
    return (f"n{spec.batch}_c{spec.in_channels}_h{spec.height}_w{spec.width}_o{spec.out_channels}_k{kh}x{kw}"
            f"_s{spec.stride[0]}x{spec.stride[1]}_p{'-'.join(map(str, spec.padding))}"
            f"_d{spec.dilation[0]}x{spec.dilation[1]}_v{vector_width}")


def without_width(key: str) -> str:
    """A :func:`layer_key` without its width: the conv's shape alone."""
    stem, _, width = key.rpartition("_v")
    return stem if width.isdigit() else key
