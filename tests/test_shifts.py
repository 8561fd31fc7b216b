"""The shifted MNIST evaluation set: named shifts, seeded, as a built-in source kind (``mnist-shifted://``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.inputs.sources import SourceConfig, class_words, list_shards, read_shard, shift_of
from spae.data import load_mnist
from spae.shifts import SHIFTS, shift_digit


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_each_shift_changes_the_digit_the_same_way_for_the_same_seed(shift):
    images, labels = load_mnist("test")
    digit, label = images[3], int(labels[3])
    a = shift_digit(digit, label, shift, seed=0, index=3)
    assert a.shape == (28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, shift_digit(digit, label, shift, seed=0, index=3))  # deterministic
    assert not np.array_equal(a, digit)  # a real shift
    assert 0 < a.mean() < 255  # ink on a ground, not a blank frame
    if shift not in ("thin", "thick"):  # the others draw their strength from the seed
        others = [shift_digit(digit, label, shift, seed=s, index=3) for s in (1, 2, 3)]
        assert any(not np.array_equal(a, o) for o in others)


def test_thin_and_thick_move_the_ink_in_opposite_directions():
    images, labels = load_mnist("test")
    ink = images[:20].astype(float).sum()
    thin = sum(shift_digit(images[i], int(labels[i]), "thin", 0, i).astype(float).sum() for i in range(20))
    thick = sum(shift_digit(images[i], int(labels[i]), "thick", 0, i).astype(float).sum() for i in range(20))
    assert 0.2 * ink < thin < 0.9 * ink and thick > 1.3 * ink


def test_an_unknown_shift_is_refused_by_name():
    with pytest.raises(ValueError, match="shift 'warp' is not one of"):
        shift_digit(np.zeros((28, 28), np.uint8), 0, "warp", 0, 0)
    with pytest.raises(ValueError, match="shift='warp'"):
        list_shards(SourceConfig(uri="mnist-shifted://test?shift=warp"))


def test_the_shifted_source_cycles_every_shift_over_the_split_with_mnist_labels_and_words():
    shards = list_shards(SourceConfig(uri="mnist-shifted://test?limit=18", shard_size=9))
    assert [(s.kind, s.num_rows) for s in shards] == [("mnist-shifted", 9), ("mnist-shifted", 9)]
    rows = read_shard(shards[1]).to_pylist()
    names = [shift_of("all", i) for i in range(9, 18)]
    assert [r["image_id"] for r in rows] == [
        f"mnist-shifted-test-{n}-{i:06d}" for n, i in zip(names, range(9, 18), strict=True)
    ]
    images, labels = load_mnist("test")
    assert [r["label"] for r in rows] == labels[9:18].tolist()
    for r, i, n in zip(rows, range(9, 18), names, strict=True):
        assert np.array_equal(_pixels(r["image_bytes"]), shift_digit(images[i], int(labels[i]), n, 0, i))
    assert class_words(shards[0].kind, shards[0].classes)[7] == ["seven", "7"]


def test_one_named_shift_and_the_seed_change_the_rows_and_the_digest():
    one = list_shards(SourceConfig(uri="mnist-shifted://test?limit=4&shift=rotate"))[0]
    assert all("-rotate-" in i for i in read_shard(one).column("image_id").to_pylist())
    other_seed = list_shards(SourceConfig(uri="mnist-shifted://test?limit=4&shift=rotate&seed=1"))[0]
    assert one.digest != other_seed.digest
    assert read_shard(one).column("image_bytes") != read_shard(other_seed).column("image_bytes")
