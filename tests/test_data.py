"""The built-in MNIST asset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spae.data import MNIST_CLASS_WORDS, load_mnist, mnist_images


def test_splits_shapes_dtypes_labels():
    sizes = {}
    for split in ("train", "valid", "test"):
        images, labels = load_mnist(split)
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
        assert labels.dtype == np.int64 and labels.shape == (images.shape[0],)
        assert labels.min() == 0 and labels.max() == 9
        sizes[split] = images.shape[0]
    assert sizes == {"train": 50000, "valid": 10000, "test": 10000}
    images, _ = load_mnist("test")
    assert images.max() == 255 and images.min() == 0 and not images.flags.writeable
    assert load_mnist("test")[0] is images  # cached
    with pytest.raises(ValueError, match="split"):
        load_mnist("val")  # type: ignore[arg-type]


def test_mnist_images_pads_and_repeats():
    raw = np.zeros((2, 28, 28), dtype=np.uint8)
    raw[0, 0, 0] = 255
    raw[1, 27, 27] = 51
    x = mnist_images(raw)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert x[0, :, 2, 2].tolist() == [1.0, 1.0, 1.0] and x[0].sum().item() == 3.0
    assert x[1, 1, 29, 29].item() == pytest.approx(0.2) and x[:, :, :2].abs().sum() == 0
    assert mnist_images(raw, size=28).shape == (2, 3, 28, 28)
    assert MNIST_CLASS_WORDS[7] == "seven" and len(MNIST_CLASS_WORDS) == 10
