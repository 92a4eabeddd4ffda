"""The ``--input-shapes`` text (``"input:1x3x224x224,other:1x10"``), parsed without ONNX or TVM: ``alcs`` checks it
before it loads them."""
from __future__ import annotations

import re

__all__ = ["parse_input_shapes"]

_SHAPE_ITEM = re.compile(r"^\s*([^:,\s][^:,]*?)\s*:\s*(\d+(?:\s*[xX]\s*\d+)*)\s*$")


def parse_input_shapes(text: str) -> dict:
    """``"name:1x3x224x224,other:1x10"`` -> ``{"name": (1, 3, 224, 224), "other": (1, 10)}``.

    A name may contain anything except ``:`` and ``,``; dimensions are positive integers joined by ``x``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty input-shape text {text!r}; expected e.g. 'input:1x3x224x224'")
    shapes: dict = {}
    for item in text.split(","):
        m = _SHAPE_ITEM.match(item)
        if not m:
            raise ValueError(f"malformed input shape {item.strip()!r} in {text!r}; expected NAME:D1xD2x... "
                             f"with positive integer dims, e.g. 'input:1x3x224x224'")
        name = m.group(1)
        dims = tuple(int(d) for d in re.split(r"\s*[xX]\s*", m.group(2)))
        if any(d <= 0 for d in dims):
            raise ValueError(f"input shape {item.strip()!r} has a non-positive dimension")
        if name in shapes:
            raise ValueError(f"input {name!r} is given twice in {text!r}")
        shapes[name] = dims
    return shapes
