"""Training-time shifts (``spae.augment``) and the train job's use of them (``augment.*``)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.steps.train import TrainJobConfig, preset_base, train_images
from spae.augment import FAMILIES, AugmentConfig, _affine, augment, augment_preset, step_generator
from spae.config import ConfigError, load_config
from spae.data import load_mnist, mnist_images


def _digits(n: int = 16) -> torch.Tensor:
    return mnist_images(load_mnist("test")[0][:n].copy())  # [n, 3, 32, 32]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_shifts_every_chosen_image_within_range_and_the_same_way_for_a_step(family):
    x = _digits()
    labels = torch.from_numpy(load_mnist("test")[1][:16].copy())  # typeset draws them
    cfg = AugmentConfig(p=1.0, families=(family,))
    y = augment(x, cfg, step_generator(0, 0, 5), labels)
    assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= 0.0 and y.max() <= 1.0
    changed = (y - x).abs().flatten(1).amax(1) > 0.05  # [n]
    assert bool(changed.all()), family
    assert torch.equal(y, augment(x, cfg, step_generator(0, 0, 5), labels))  # the same step: the same batch
    if family not in ("thin", "thick"):  # the others draw their strength
        assert not torch.equal(y, augment(x, cfg, step_generator(0, 0, 6), labels))
        assert not torch.equal(y, augment(x, cfg, step_generator(0, 1, 5), labels))  # another rank


def test_strokes_and_contrast_move_the_ink_the_way_they_say():
    x = _digits()
    ink = x.sum()
    thin = augment(x, AugmentConfig(p=1.0, families=("thin",)), step_generator(0, 0, 0)).sum()
    thick = augment(x, AugmentConfig(p=1.0, families=("thick",)), step_generator(0, 0, 0)).sum()
    assert 0.2 * ink < thin < 0.9 * ink and thick > 1.3 * ink
    dim = AugmentConfig(p=1.0, families=("contrast",), ink=(0.5, 0.5), ground=(0.1, 0.1))
    y = augment(x, dim, step_generator(0, 0, 0))
    assert torch.allclose(y, x * 0.5 + 0.1)


def test_the_affine_moves_and_turns_the_image_as_it_says():
    img = torch.zeros(1, 1, 32, 32)
    img[0, 0, 4:8, 4:8] = 1.0
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    moved = _affine(img, one, zero, torch.tensor([[0.25, -0.125]], dtype=torch.float64))
    assert torch.allclose(moved[0, 0, 0:4, 12:16], torch.ones(4, 4), atol=1e-5)  # +8 px in x, -4 px in y
    quarter = _affine(img, one, torch.tensor([math.pi / 2], dtype=torch.float64), torch.zeros(1, 2))
    assert torch.allclose(quarter[0, 0], torch.rot90(img[0, 0], -1), atol=1e-5)
    centre = torch.zeros(1, 1, 32, 32)
    centre[0, 0, 14:18, 14:18] = 1.0
    zoom = _affine(centre, 2 * one, zero, torch.zeros(1, 2))
    assert torch.equal(
        zoom[0, 0] > 0.5, torch.nn.functional.pad(torch.ones(8, 8), (12, 12, 12, 12)) > 0.5
    )  # twice the side: four times the ink


def test_a_share_p_of_the_batch_is_shifted_and_p_0_is_off():
    x = _digits(64)
    y = augment(x, AugmentConfig(p=0.5), step_generator(3, 0, 0))
    changed = int(((y - x).abs().flatten(1).amax(1) > 0).sum())
    assert 16 <= changed <= 48
    assert augment(x, AugmentConfig(), step_generator(3, 0, 0)) is x


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="augment.rotate / typeset_turn: 90.0 degrees; at most 45"):
        AugmentConfig(rotate=(10.0, 90.0))
    with pytest.raises(ValueError, match=r"augment.families: \['flip'\]"):
        AugmentConfig(families=("flip",))
    with pytest.raises(ValueError, match="augment.p"):
        AugmentConfig(p=1.5)
    with pytest.raises(ValueError, match=r"augment.blur: \(2.0, 1.0\)"):
        AugmentConfig(blur=(2.0, 1.0))
    with pytest.raises(ValueError, match="not clips"):
        augment(torch.zeros(2, 3, 4, 8, 8), AugmentConfig(p=1.0), step_generator(0, 0, 0))


def test_the_mnist_preset_trains_on_shifted_batches_and_the_others_do_not():
    assert augment_preset("mnist").enabled and not augment_preset("moving-mnist").enabled
    cfg = load_config(TrainJobConfig, base=preset_base("mnist"))
    assert cfg.augment == augment_preset("mnist")
    pixels = (
        (_digits(32)[:, 0, :, :, None].expand(-1, -1, -1, 3) * 255).round().to(torch.uint8)
    )  # [b, H, W, 3]
    a, b = train_images(pixels, cfg, 0, 7), train_images(pixels, cfg, 0, 7)
    assert torch.equal(a, b) and not torch.equal(a, pixels.movedim(-1, 1).float() / 255)
    off = load_config(TrainJobConfig, overrides=["augment.p=0"], base=preset_base("mnist"))
    assert torch.equal(train_images(pixels, off, 0, 7), pixels.movedim(-1, 1).float() / 255)
    with pytest.raises(ConfigError, match="augment.p=0.5: clips"):
        load_config(TrainJobConfig, overrides=["augment.p=0.5"], base=preset_base("moving-mnist"))


def test_typeset_draws_each_images_label_in_another_font_and_leaves_unlabelled_images():
    from spae.augment import glyphs

    x = _digits(40)
    labels = torch.from_numpy(load_mnist("test")[1][:40].copy())
    labels[:4] = -1  # no label: left as it is
    y = augment(x, AugmentConfig(p=1.0, families=("typeset",)), step_generator(0, 0, 1), labels)
    assert torch.equal(y[:4], x[:4]) and not torch.equal(y[4:], x[4:])
    still = AugmentConfig(
        p=1.0, families=("typeset",), typeset_scale=(1.0, 1.0), typeset_turn=0, typeset_move=0
    )
    y = augment(x, still, step_generator(0, 0, 1), labels)
    bank = glyphs(32)  # [fonts, 10, 32, 32]
    for i in range(4, 40):  # each image is its own label in one of the fonts
        error = (bank[:, int(labels[i])] - y[i, 0]).abs().flatten(1).amax(1)  # [fonts]
        assert float(error.min()) < 1e-4, i
    assert glyphs(32).shape[1:] == (10, 32, 32) and glyphs(32).shape[0] >= 2


def test_translate_and_rotate_draw_their_strength_from_a_range_of_magnitudes_either_sign():
    x = torch.zeros(64, 1, 32, 32)
    x[:, :, 14:18, 14:18] = 1.0  # a centred blob
    cfg = AugmentConfig(p=1.0, families=("translate",), translate=(0.125, 0.25))
    y = augment(x, cfg, step_generator(0, 0, 0))
    grid = torch.arange(32.0)
    cy = (y[:, 0].sum(2) * grid).sum(1) / y[:, 0].sum((1, 2))  # [n] centre of the ink
    cx = (y[:, 0].sum(1) * grid).sum(1) / y[:, 0].sum((1, 2))
    for c in (cy - 15.5, cx - 15.5):  # moved by 4 to 8 pixels on each axis, both ways over the batch
        assert bool((c.abs() >= 4 - 1e-3).all() and (c.abs() <= 8 + 1e-3).all())
        assert bool((c > 0).any() and (c < 0).any())


def test_the_train_jobs_rows_carry_the_labels_typeset_draws(tmp_path):
    """The worker's batch (read_joined_shards: pixels, label, pools) goes through train_images with its
    labels: on the mnist preset a typeset-only augmentation draws each row's own digit."""
    from test_evaluate import write_pools

    from pipeline.inputs.images import DecodeOptions
    from pipeline.inputs.sources import SourceConfig, list_shards
    from pipeline.steps.train import read_joined_shards
    from spae.augment import glyphs

    source = SourceConfig(uri="mnist://train?limit=12", shard_size=12)
    pools = write_pools(tmp_path / "pools", source)
    rows = read_joined_shards({"shard": [list_shards(source)[0].to_json()]}, pools, DecodeOptions(32))
    assert rows["label"].tolist() == load_mnist("train")[1][:12].tolist()
    cfg = load_config(
        TrainJobConfig,
        overrides=["augment.p=1", "augment.families=[typeset]", "augment.typeset_scale=[1,1]"]
        + ["augment.typeset_turn=0", "augment.typeset_move=0"],
        base=preset_base("mnist"),
    )
    images = train_images(torch.from_numpy(rows["pixels"]), cfg, 0, 3, torch.from_numpy(rows["label"]))
    bank = glyphs(32)  # [fonts, 10, 32, 32]
    for image, label in zip(images, rows["label"], strict=True):
        assert float((bank[:, int(label)] - image[0]).abs().flatten(1).amax(1).min()) < 1e-4


def test_augment_trains_on_every_evaluated_shift_family_but_the_held_out_font():
    """spae.augment (batched torch) and spae.shifts (per-image numpy) name the same families; the
    evaluation's `font` stays held out (training typesets in other fonts: `typeset`)."""
    from spae import augment, shifts

    assert list(augment.SHIFTS) == [name for name in shifts.SHIFTS if name != "font"]
