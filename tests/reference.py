"""Reference results the tests compare against (imported by test modules; pytest puts tests/ on sys.path)."""
import torch


def torch_conv(x, weight, bias, stride, padding, dilation, activation):
    """``torch.nn.functional.conv2d`` (+ relu / relu6) on numpy arrays; ``padding`` may be (top, left, bottom,
    right)."""
    xt = torch.from_numpy(x)
    if isinstance(padding, tuple) and len(padding) == 4:
        top, left, bottom, right = padding
        xt = torch.nn.functional.pad(xt, (left, right, top, bottom))
        padding = 0
    out = torch.nn.functional.conv2d(xt, torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias),
                                     stride, padding, dilation)
    if activation == "relu":
        out = out.relu()
    elif activation == "relu6":
        out = out.clamp(0, 6)
    return out.numpy()
