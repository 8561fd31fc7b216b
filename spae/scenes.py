"""Colour scenes whose words are known: the many-concepts-per-image stand-in for CLIP-scored photos.

Each scene is an RGB image ``[S, S, 3]`` (``S`` = ``SceneConfig.size``, 64 by default, at most 256) of
1-4 objects on a textured background. An object is a shape (``SHAPES``), a colour (``COLOURS``), a size
(``SIZES``) and a region (``REGIONS``: each object sits in its own region, so objects never touch). The
scene's words (``Scene.words``) are its key words, the dominant object's colour and shape (``KEY_WORDS``),
then the object count (``COUNTS``: "one" .. "four"), then every object's colour, shape, size and region, in
drawing order, each word once. Every word is a single token of the MiniLM WordPiece vocabulary
(``tests/test_scenes.py`` checks it).

The dominant object (``Scene.dominant``) is the scene's one large object: exactly one object is large,
drawn in a random place of the drawing order; the others are small. A word's
salience (``Scene.salience``, in (0, 1]) ranks what the scene is about: the dominant object's colour and
shape 1, its size and region and the count ``ATTRIBUTE_SALIENCE`` (0.9), every other object's words
``DETAIL_SALIENCE`` (0.8); a word of several objects takes the largest. The word probe learns these as soft
targets, so eq. 4's thresholds select the key words for the top layers (rho >= 0.95) and every word for a
finer one (rho ~0.75).

Determinism: scene ``i`` of a split depends only on ``(seed, split, i)`` and ``size``. The layout (the
objects) is drawn from its own generator, before and apart from the background texture, so a scene's
words are known without drawing it (``scene_layout``). Shapes are drawn at 4x resolution and
box-filtered down (antialiased edges), then composited over the background with that coverage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("train", "valid", "test")
SPLIT_SIZES = {"train": 100_000, "valid": 10_000, "test": 10_000}  # scenes a split lists without a limit
_SPLIT_SEED = {name: i for i, name in enumerate(SPLITS)}

SHAPES = ("circle", "square", "triangle", "star", "heart", "ring", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
SIZES = {"small": 0.075, "large": 0.13}  # object radius as a fraction of S
# region centre (x, y) as fractions of S; 0.3 S apart at least, more than two large radii plus jitter
REGIONS: dict[str, tuple[float, float]] = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
COUNTS = ("one", "two", "three", "four")
MAX_OBJECTS = len(COUNTS)
JITTER = 0.01  # centre jitter, a fraction of S on each axis
WORDS = (*COUNTS, *COLOURS, *SHAPES, *SIZES, *REGIONS)  # every word a scene can carry, in a fixed order
SUPERSAMPLE = 4
KEY_WORDS = 2  # a scene's first words: the dominant object's colour and shape
ATTRIBUTE_SALIENCE = 0.9  # the dominant object's size and region, and the count
DETAIL_SALIENCE = 0.8  # the other objects' words


@dataclass(frozen=True)
class SceneConfig:
    size: int = 64  # S: the image side
    seed: int = 0
    min_objects: int = 1
    max_objects: int = MAX_OBJECTS

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 256:
            raise ValueError(f"scenes: size={self.size} must lie in 16..256")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"scenes: need 1 <= min_objects ({self.min_objects}) <= max_objects ({self.max_objects}) "
                f"<= {MAX_OBJECTS}"
            )


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    region: str
    centre: tuple[float, float]  # (x, y) in pixels
    radius: float  # pixels

    @property
    def words(self) -> tuple[str, str, str, str]:
        return (self.colour, self.shape, self.size, self.region)


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]

    @property
    def count(self) -> str:
        return COUNTS[len(self.objects) - 1]

    @property
    def dominant(self) -> SceneObject:
        """The largest object (the one large object of a generated scene)."""
        return max(self.objects, key=lambda o: SIZES[o.size])  # max keeps the first of equal keys

    @property
    def words(self) -> tuple[str, ...]:
        """The dominant object's colour and shape, the count, then each object's colour, shape, size and
        region, each word once."""
        key = (self.dominant.colour, self.dominant.shape)
        return tuple(dict.fromkeys((*key, self.count, *(w for o in self.objects for w in o.words))))

    @property
    def salience(self) -> dict[str, float]:
        """Each of ``words``' salience in (0, 1] (module docstring), in ``words``' order."""
        out = dict.fromkeys(self.words, DETAIL_SALIENCE)
        for word in (self.count, self.dominant.size, self.dominant.region):
            out[word] = ATTRIBUTE_SALIENCE
        out[self.dominant.colour] = out[self.dominant.shape] = 1.0
        return out


def _rng(cfg: SceneConfig, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, _SPLIT_SEED[split], index, stream])


def scene_layout(split: str, index: int, cfg: SceneConfig | None = None) -> Scene:
    """The objects of scene ``index`` of ``split`` (no drawing)."""
    cfg = cfg or SceneConfig()
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
    rng = _rng(cfg, split, index, 0)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    regions = [tuple(REGIONS)[r] for r in rng.choice(len(REGIONS), size=n, replace=False)]
    objects = []
    large = int(rng.integers(n))  # the dominant object: the one large object
    for k, region in enumerate(regions):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = "large" if k == large else "small"
        jx, jy = rng.uniform(-JITTER, JITTER, size=2)
        cx, cy = REGIONS[region]
        centre = ((cx + jx) * cfg.size, (cy + jy) * cfg.size)
        objects.append(SceneObject(shape, colour, size, region, centre, SIZES[size] * cfg.size))
    return Scene(tuple(objects))


# ----------------------------------------------------------------------------- drawing


@cache
def _outline(shape: str) -> tuple[tuple[float, float], ...]:
    """A filled shape's polygon in unit coordinates (x right, y down), within the radius-1 disc's box."""
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    if shape == "square":
        return ((-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8))
    if shape == "diamond":
        return ((0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0))
    if shape == "triangle":  # equilateral, pointing up, its vertices on the unit circle
        a = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return tuple(zip(np.cos(a), np.sin(a) + 0.25, strict=True))  # lowered: its box is centred
    if shape == "star":  # five points, inner radius 0.45
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return tuple(zip(r * np.cos(a), r * np.sin(a) + 0.1, strict=True))
    if shape == "heart":  # the classic parametric heart, scaled into [-1, 1]
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        x, y = x / np.abs(x).max(), (y - (y.max() + y.min()) / 2) / ((y.max() - y.min()) / 2)
        return tuple(zip(x, y, strict=True))
    if shape == "cross":  # a plus sign, arms 0.8 wide
        w = 0.4
        return (
            (-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
            (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
        )  # fmt: skip
    raise ValueError(f"no outline for shape {shape!r}")


def coverage(obj: SceneObject, size: int) -> np.ndarray:
    """float32 ``[S, S]`` in [0, 1]: the share of each pixel the object covers (antialiased)."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = obj.centre[0] * k, obj.centre[1] * k, obj.radius * k
    if obj.shape in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if obj.shape == "ring":
            q = 0.55 * r
            draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in _outline(obj.shape)], fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 ``[S, S, 3]``: a muted grey of a slight tint, striped and grained; far from every colour of
    ``COLOURS`` (its channels stay within about 40..215 and close to each other)."""
    grey = rng.uniform(85, 165)
    tint = rng.uniform(-12, 12, size=3)
    angle, cycles, amp = rng.uniform(0, np.pi), rng.uniform(2, 6), rng.uniform(6, 14)
    yy, xx = np.mgrid[0:size, 0:size] / size
    stripes = amp * np.sin(2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)))  # [S, S]
    grain = rng.normal(0, 4, size=(size, size, 1)).clip(-10, 10)  # [S, S, 1], the same in each channel
    return (grey + tint + stripes[..., None] + grain).astype(np.float32)


def render_scene(scene: Scene, split: str, index: int, cfg: SceneConfig | None = None) -> np.ndarray:
    """uint8 ``[S, S, 3]``: the scene's objects, in order, over its background."""
    cfg = cfg or SceneConfig()
    image = background(_rng(cfg, split, index, 1), cfg.size)  # [S, S, 3]
    for obj in scene.objects:
        alpha = coverage(obj, cfg.size)[..., None]  # [S, S, 1]
        image = image * (1 - alpha) + np.asarray(COLOURS[obj.colour], np.float32) * alpha
    return image.clip(0, 255).round().astype(np.uint8)


@dataclass(frozen=True)
class Scenes:
    images: np.ndarray  # uint8 [n, S, S, 3]
    scenes: tuple[Scene, ...]


def scenes(split: str, start: int, stop: int, cfg: SceneConfig | None = None) -> Scenes:
    """Scenes ``start..stop-1`` of ``split``."""
    cfg = cfg or SceneConfig()
    if not 0 <= start <= stop:
        raise ValueError(f"scene range {start}..{stop} is empty or negative")
    layouts = tuple(scene_layout(split, i, cfg) for i in range(start, stop))
    images = np.zeros((stop - start, cfg.size, cfg.size, 3), np.uint8)
    for row, (i, scene) in enumerate(zip(range(start, stop), layouts, strict=True)):
        images[row] = render_scene(scene, split, i, cfg)
    return Scenes(images, layouts)


def word_matrix(words: Sequence[Sequence[str]] | Sequence[Mapping[str, float]]) -> np.ndarray:
    """Each image's words (0/1) or words with weights (``Scene.salience``) -> float32 ``[n, len(WORDS)]``,
    the multi-label target."""
    index = {w: i for i, w in enumerate(WORDS)}
    out = np.zeros((len(words), len(WORDS)), np.float32)
    for row, ws in enumerate(words):
        weights = ws if isinstance(ws, Mapping) else dict.fromkeys(ws, 1.0)
        for w, v in weights.items():
            out[row, index[w]] = v
    return out
