"""The colour-scene generator (``spae.scenes``) and its source kind (``scenes://``): deterministic, and every
word a scene carries is what its pixels show."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipeline.inputs.sources import SourceConfig, class_words, image_words, list_shards, read_shard
from spae.codebook import minilm_folder
from spae.scenes import (
    COLOURS,
    COUNTS,
    REGIONS,
    SHAPES,
    SIZES,
    WORDS,
    SceneConfig,
    scene_layout,
    scenes,
    word_matrix,
)

PALETTE = np.array(list(COLOURS.values()), np.float32)  # [8, 3]


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _object_pixels(image: np.ndarray) -> np.ndarray:
    """[S, S] int: the palette colour each pixel is close to (-1: none, the background or an edge)."""
    d = np.linalg.norm(image[..., None, :].astype(np.float32) - PALETTE, axis=-1)  # [S, S, 8]
    return np.where(d.min(-1) < 40, d.argmin(-1), -1)


def test_every_word_is_one_token_of_the_minilm_vocabulary():
    vocab = set((minilm_folder() / "vocab.txt").read_text().split("\n"))
    assert [w for w in WORDS if w not in vocab] == []
    assert len(set(WORDS)) == len(WORDS)


def test_scenes_are_deterministic_and_differ_by_seed_split_and_index():
    a = scenes("train", 5, 9)
    b = scenes("train", 5, 9)
    assert np.array_equal(a.images, b.images) and a.scenes == b.scenes
    assert np.array_equal(scenes("train", 7, 8).images[0], a.images[2])  # a range is cut anywhere
    assert a.images.shape == (4, 64, 64, 3) and a.images.dtype == np.uint8
    other_seed = scenes("train", 5, 9, SceneConfig(seed=1))
    assert not np.array_equal(other_seed.images, a.images)
    assert not np.array_equal(scenes("test", 5, 9).images, a.images)
    assert len({s.words for s in scenes("train", 0, 40).scenes}) > 30  # varied


@pytest.mark.parametrize("size", [64, 128])
def test_the_words_match_what_is_drawn(size):
    """Pixel checks: each object's colour at its centre, one blob of that colour per object in its region,
    the count, large blobs bigger than small ones, and the shape's fill of its box."""
    cfg = SceneConfig(size=size)
    batch = scenes("valid", 0, 24, cfg)
    fill = {"square": (0.85, 1.01), "circle": (0.65, 0.88), "triangle": (0.35, 0.65), "diamond": (0.35, 0.65)}
    checked = set()
    for image, scene in zip(batch.images, batch.scenes, strict=True):
        labels = _object_pixels(image)
        blobs, n = ndimage.label(labels >= 0, structure=np.ones((3, 3)))  # a star's points touch by corners
        assert n == len(scene.objects) and COUNTS[n - 1] in scene.words  # one blob per object: the count
        assert scene.words[:3] == (scene.dominant.colour, scene.dominant.shape, COUNTS[n - 1])
        for obj in scene.objects:
            assert {obj.colour, obj.shape, obj.size, obj.region} <= set(scene.words)
            x, y = obj.centre
            probe = (x + 0.8 * obj.radius, y) if obj.shape == "ring" else (x, y)  # a ring's centre is empty
            colour = tuple(COLOURS)[labels[int(probe[1]), int(probe[0])]]
            assert colour == obj.colour
            blob = blobs == blobs[int(probe[1]), int(probe[0])]
            ys, xs = np.nonzero(blob)
            cx, cy = xs.mean() / size, ys.mean() / size
            region = min(REGIONS, key=lambda r: (REGIONS[r][0] - cx) ** 2 + (REGIONS[r][1] - cy) ** 2)
            assert region == obj.region, (obj, cx, cy)
            area = blob.sum() / size**2
            radius = SIZES[obj.size]
            assert 0.3 * radius**2 < area < 4.2 * radius**2, (obj, area)
            if obj.shape in fill:
                box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
                lo, hi = fill[obj.shape]
                assert lo < blob.sum() / box < hi, (obj, blob.sum() / box)
                checked.add(obj.shape)
            if obj.shape == "ring":
                assert labels[int(y), int(x)] == -1  # the hole shows the background
                checked.add("ring")
    assert len(checked) >= 4  # the fill check met several shapes


def test_the_dominant_object_is_the_largest_and_the_label_is_its_shape():
    rows = read_shard(list_shards(SourceConfig(uri="scenes://test?limit=12", shard_size=12))[0]).to_pylist()
    for i, row in enumerate(rows):
        scene = scene_layout("test", i)
        assert row["label"] == SHAPES.index(scene.dominant.shape)
        assert [o.size for o in scene.objects].count("large") == 1 and scene.dominant.size == "large"
        larger_before = [o for o in scene.objects[: scene.objects.index(scene.dominant)] if o.size == "large"]
        assert not larger_before


def test_the_source_lists_reads_and_names_the_words_of_every_row():
    cfg = SourceConfig(uri="scenes://train?limit=10&size=32&seed=3", shard_size=4)
    shards = list_shards(cfg)
    assert [(s.kind, s.num_rows) for s in shards] == [("scenes", 4), ("scenes", 4), ("scenes", 2)]
    rows = read_shard(shards[1]).to_pylist()
    ids = [r["image_id"] for r in rows]
    assert ids == [f"scenes-train-{i:06d}" for i in range(4, 8)]
    batch = scenes("train", 4, 8, SceneConfig(size=32, seed=3))
    for r, image in zip(rows, batch.images, strict=True):
        assert np.array_equal(_pixels(r["image_bytes"]), image)
    assert image_words(cfg, ids) == [s.words for s in batch.scenes]
    assert image_words(SourceConfig(uri="mnist://test"), ["mnist-test-000000"]) is None
    assert class_words("scenes", shards[0].classes) == [[s] for s in SHAPES]
    # another seed or size is another listing: its digest differs
    other = list_shards(SourceConfig(uri="scenes://train?limit=10&size=32&seed=4", shard_size=4))
    assert other[0].digest != shards[0].digest
    assert word_matrix([batch.scenes[0].words]).sum() == len(batch.scenes[0].words)


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("scenes://dev", "unknown scenes split 'dev'"),
        ("scenes://train?frames=3", r"unknown query key\(s\) frames"),
        ("scenes://train?size=512", "size=512 must lie in 16..256"),
        ("scenes://train?size=big", "size='big' is not an integer"),
        ("scenes://train?max_objects=5", "max_objects"),
    ],
)
def test_a_bad_scenes_uri_is_refused_naming_the_problem(uri, match):
    with pytest.raises(ValueError, match=match):
        list_shards(SourceConfig(uri=uri))


def test_image_words_refuses_an_id_of_another_source():
    with pytest.raises(ValueError, match="is not a scene of this source"):
        image_words(SourceConfig(uri="scenes://test"), ["scenes-train-000001"])


def test_salience_ranks_the_dominant_objects_colour_and_shape_first():
    for i in range(40):
        scene = scene_layout("valid", i)
        s = scene.salience
        assert list(s) == list(scene.words)
        dom = scene.dominant
        assert s[dom.colour] == s[dom.shape] == 1.0 and s[scene.count] == 0.9
        assert s[dom.size] == s[dom.region] == 0.9
        others = set(scene.words) - {dom.colour, dom.shape, dom.size, dom.region, scene.count}
        assert all(s[w] == 0.8 for w in others)
    m = word_matrix([scene_layout("valid", 0).salience])
    assert m.max() == 1.0 and {round(float(v), 4) for v in np.unique(m)} <= {0.0, 0.8, 0.9, 1.0}
