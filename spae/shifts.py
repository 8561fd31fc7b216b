"""Named distribution shifts of a 28 x 28 digit, seeded: the held-out sets a tokenizer should hold on.

Each shift maps one uint8 ``[28, 28]`` digit (white on black, as MNIST) to another, drawing its strength
from ``rng`` (a ``numpy.random.Generator``), so the same seed gives the same image in every process:

- ``scale``: the digit resized by 0.6-1.35 about the centre (MNIST's digit fills ~20 of 28 pixels);
- ``translate``: moved by 3-6 pixels on each axis (either sign), the frame cut where it leaves;
- ``rotate``: turned by 15-35 degrees either way;
- ``thin`` / ``thick``: strokes eroded by half a pixel a side / dilated by a 3 x 3 window;
- ``blur``: a Gaussian blur of radius 0.8-1.6;
- ``lowres``: downsampled to 9-14 pixels, then back up (bilinear);
- ``contrast``: ink at 35-65% of full, on a background of 0-50;
- ``font``: not MNIST's digit but the label typeset in a system font (DejaVu Sans), 14-22 px,
  turned by up to 15 degrees and moved by up to 3 pixels: the same class, another hand.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIDE = 28


def _image(digit: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(digit, dtype=np.uint8), mode="L")


def _scale(digit: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
    s = rng.uniform(0.6, 1.35)
    n = max(4, round(SIDE * s))
    big = np.asarray(_image(digit).resize((n, n), Image.Resampling.BILINEAR))  # [n, n]
    out = np.zeros((SIDE, SIDE), np.uint8)
    if n <= SIDE:
        o = (SIDE - n) // 2
        out[o : o + n, o : o + n] = big
    else:
        o = (n - SIDE) // 2
        out[:] = big[o : o + SIDE, o : o + SIDE]
    return out


def _translate(digit: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
    dy, dx = (int(rng.integers(3, 7)) * int(rng.choice((-1, 1))) for _ in range(2))
    out = np.zeros_like(digit)
    ys, yd = (slice(0, SIDE - dy), slice(dy, SIDE)) if dy >= 0 else (slice(-dy, SIDE), slice(0, SIDE + dy))
    xs, xd = (slice(0, SIDE - dx), slice(dx, SIDE)) if dx >= 0 else (slice(-dx, SIDE), slice(0, SIDE + dx))
    out[yd, xd] = digit[ys, xs]
    return out


def _rotate(digit: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(15, 35) * rng.choice((-1, 1))
    return np.asarray(_image(digit).rotate(angle, resample=Image.Resampling.BILINEAR))


def _thin(digit: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
    # eroded at twice the resolution: half a pixel off each side of a stroke (a 3 x 3 erosion at 28 px
    # wipes out MNIST's 2-3 px strokes)
    big = (
        _image(digit).resize((2 * SIDE, 2 * SIDE), Image.Resampling.BILINEAR).filter(ImageFilter.MinFilter(3))
    )
    return np.asarray(big.resize((SIDE, SIDE), Image.Resampling.BILINEAR))


def _thick(digit: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(_image(digit).filter(ImageFilter.MaxFilter(3)))


def _blur(digit: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(_image(digit).filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.6))))


def _lowres(digit: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
    n = int(rng.integers(9, 15))
    small = _image(digit).resize((n, n), Image.Resampling.BILINEAR)
    return np.asarray(small.resize((SIDE, SIDE), Image.Resampling.BILINEAR))


def _contrast(digit: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
    ink, ground = rng.uniform(0.35, 0.65), rng.uniform(0, 50)
    return np.clip(digit.astype(np.float32) * ink + ground, 0, 255).round().astype(np.uint8)


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _typeset(digit: np.ndarray, label: int, rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("L", (SIDE, SIDE), 0)
    draw = ImageDraw.Draw(canvas)
    font = _font(int(rng.integers(14, 23)))
    left, top, right, bottom = draw.textbbox((0, 0), str(label), font=font)
    x = (SIDE - (right - left)) / 2 - left + rng.integers(-3, 4)
    y = (SIDE - (bottom - top)) / 2 - top + rng.integers(-3, 4)
    draw.text((x, y), str(label), fill=255, font=font)
    return np.asarray(canvas.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR))


SHIFTS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "scale": _scale,
    "translate": _translate,
    "rotate": _rotate,
    "thin": _thin,
    "thick": _thick,
    "blur": _blur,
    "lowres": _lowres,
    "contrast": _contrast,
    "font": _typeset,
}


def shift_digit(digit: np.ndarray, label: int, shift: str, seed: int, index: int) -> np.ndarray:
    """uint8 ``[28, 28]`` -> the ``shift`` of it, drawn from ``(seed, index)`` (the same in every process)."""
    if shift not in SHIFTS:
        raise ValueError(f"shift {shift!r} is not one of {', '.join(SHIFTS)}")
    out = SHIFTS[shift](np.asarray(digit, dtype=np.uint8), int(label), np.random.default_rng([seed, index]))
    assert out.shape == (SIDE, SIDE) and out.dtype == np.uint8, (shift, out.shape, out.dtype)
    return out
