"""Training-time shifts of a batch: the families of ``spae.shifts``, vectorised in torch and seeded per step.

A share ``p`` of each batch is augmented; an augmented image gets ONE family, drawn uniformly from
``families`` (as each image of ``mnist-shifted://`` carries one shift), with its strength drawn from the
family's range. ``spae.shifts``'s ``font`` has the ``typeset`` family as a near twin in other fonts.

- ``scale``: zoom about the centre by ``scale`` (1.3: the digit 30% larger, its edges cut by the frame);
- ``translate``: moved on each axis by a fraction of the side in the range ``translate``, either sign;
- ``rotate``: turned by ``rotate`` degrees (a range), either way (at most 45: a 6 turned by 180 is a 9);
- ``thin`` / ``thick``: strokes eroded by half a pixel a side (a 3 x 3 min at twice the resolution) /
  dilated by a 3 x 3 window;
- ``blur``: a Gaussian blur of standard deviation ``blur`` pixels;
- ``lowres``: downsampled to a side of ``lowres`` times the side (antialiased), then back up (bilinear);
- ``contrast``: ink times ``ink``, plus a background ``ground``;
- ``typeset``: not the hand-written digit but its label typeset in one of ``TYPESET_FONTS`` (never DejaVu
  Sans, the font of ``mnist-shifted://``'s ``font`` shift, which stays held out), scaled by
  ``typeset_scale``, turned by up to ``typeset_turn`` degrees, moved by up to ``typeset_move`` of the side;
  it needs the batch's labels (an image without one, label -1, is left as it is).

Every family keeps the class: no flips, bounded rotation, and a digit scaled or moved stays mostly in frame.
The semantic loss's pools are precomputed per training image; with the label-probe scorer a pool is the
class's, so the augmented image keeps its source's pool (docs/ARCHITECTURE.md).

The draws come from one CPU ``torch.Generator`` seeded by ``(seed, rank, step)`` (``step_generator``), so a
step's augmentation is the same in every run and after a resume; the ops run where the batch is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

FAMILIES = ("scale", "translate", "rotate", "thin", "thick", "blur", "lowres", "contrast", "typeset")
# system and matplotlib fonts with digits unlike MNIST's hand; not DejaVu Sans (mnist-shifted's font shift)
TYPESET_FONTS = ("DejaVu Serif", "DejaVu Sans Mono", "STIXGeneral", "cmr10", "cmss10", "cmtt10")
MAX_ROTATE = 45.0  # degrees: well short of the half turn that makes a 6 a 9


@dataclass(frozen=True)
class AugmentConfig:
    """The train job's ``augment.*``: which shifts, how often, how strong. ``p = 0`` is off."""

    p: float = 0.0  # share of the images of a batch augmented (each by one family); 0 = off
    families: tuple[str, ...] = FAMILIES
    scale: tuple[float, float] = (0.6, 1.35)  # zoom factor
    translate: tuple[float, float] = (0.09, 0.22)  # move per axis, a fraction of the side, either sign
    rotate: tuple[float, float] = (10.0, 35.0)  # turn, degrees, either way
    blur: tuple[float, float] = (0.6, 1.6)  # Gaussian standard deviation, pixels
    lowres: tuple[float, float] = (0.3, 0.5)  # intermediate side, a fraction of the side
    ink: tuple[float, float] = (0.35, 0.9)  # contrast: ink scaled by
    ground: tuple[float, float] = (0.0, 0.2)  # contrast: background added (images in [0, 1])
    typeset_scale: tuple[float, float] = (0.65, 1.0)  # typeset: glyph height, times 0.75 of the side
    typeset_turn: float = 15.0  # typeset: largest turn, degrees either way
    typeset_move: float = 0.1  # typeset: largest move per axis, a fraction of the side

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"augment.p: must be in [0, 1], got {self.p}")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"augment.families: {unknown or '[]'}; choose from {', '.join(FAMILIES)}")
        if not (self.rotate[1] <= MAX_ROTATE and 0.0 <= self.typeset_turn <= MAX_ROTATE):
            turn = max(self.rotate[1], self.typeset_turn)
            raise ValueError(
                f"augment.rotate / typeset_turn: {turn} degrees; at most {MAX_ROTATE} (6 and 9 apart)"
            )
        for key in ("scale", "translate", "rotate", "blur", "lowres", "ink", "ground", "typeset_scale"):
            lo, hi = getattr(self, key)
            if not 0.0 <= lo <= hi or (key not in ("ground", "translate", "rotate") and lo <= 0.0):
                raise ValueError(f"augment.{key}: ({lo}, {hi}) must be a range 0 < lo <= hi")
        if not (self.translate[1] < 0.5 and 0.0 <= self.typeset_move < 0.5) or self.lowres[1] > 1.0:
            raise ValueError(
                "augment.translate and typeset_move must be in [0, 0.5), augment.lowres at most 1"
            )

    @property
    def enabled(self) -> bool:
        return self.p > 0.0


def augment_preset(name: str) -> AugmentConfig:
    """Per-preset defaults: on for ``mnist`` (half of each batch), off for the others."""
    return AugmentConfig(p=0.5) if name == "mnist" else AugmentConfig()


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A CPU generator for one training step of one worker: the same draws in every run and after a resume."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64).mul(hi - lo).add(lo)  # [n]


def _sign(n: int, g: torch.Generator) -> Tensor:
    return torch.randint(2, (n,), generator=g).to(torch.float64).mul(2).sub(1)  # [n] of -1, +1


def _affine(x: Tensor, zoom: Tensor, angle: Tensor, shift: Tensor) -> Tensor:
    """x [n, C, H, W]; zoom [n], angle [n] radians, shift [n, 2] (x, y), fractions of the side -> same.

    An output pixel at p (normalised to [-1, 1]) samples the input at R(-angle) (p - 2 shift) / zoom."""
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # [n]
    t = -2.0 * shift  # [n, 2]
    theta = torch.stack(
        [
            torch.stack([cos, sin, cos * t[:, 0] + sin * t[:, 1]], dim=1),
            torch.stack([-sin, cos, -sin * t[:, 0] + cos * t[:, 1]], dim=1),
        ],
        dim=1,
    )  # [n, 2, 3]
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)  # [n, H, W, 2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _scale(x: Tensor, cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    n = x.shape[0]
    return _affine(x, _uniform(n, *cfg.scale, g), torch.zeros(n, dtype=torch.float64), torch.zeros(n, 2))


def _translate(x: Tensor, cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    n = x.shape[0]
    shift = (_uniform(2 * n, *cfg.translate, g) * _sign(2 * n, g)).view(n, 2)
    return _affine(x, torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), shift)


def _rotate(x: Tensor, cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    n = x.shape[0]
    angle = _uniform(n, *cfg.rotate, g) * _sign(n, g) * (math.pi / 180.0)
    return _affine(x, torch.ones(n, dtype=torch.float64), angle, torch.zeros(n, 2, dtype=torch.float64))


def _thin(x: Tensor, cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    big = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)  # [n, C, 2H, 2W]
    eroded = -F.max_pool2d(-big, 3, stride=1, padding=1)
    return F.avg_pool2d(eroded, 2)  # [n, C, H, W]


def _thick(x: Tensor, cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


def _blur(x: Tensor, cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    n, c, h, w = x.shape
    sigma = _uniform(n, *cfg.blur, g).to(x)  # [n]
    radius = math.ceil(3 * cfg.blur[1])
    r = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # [k]
    k1 = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)  # [n, k], separable
    rows = k1.repeat_interleave(c, 0)[:, None, None, :]  # [n C, 1, 1, k]
    cols = k1.repeat_interleave(c, 0)[:, None, :, None]  # [n C, 1, k, 1]
    y = F.conv2d(x.reshape(1, n * c, h, w), rows, padding=(0, radius), groups=n * c)
    return F.conv2d(y, cols, padding=(radius, 0), groups=n * c).view(n, c, h, w)


def _lowres(x: Tensor, cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    n, _, h, w = x.shape
    sides = (_uniform(n, *cfg.lowres, g) * h).round().clamp(min=2).long()  # [n]
    out = torch.empty_like(x)
    for side in sides.unique().tolist():  # a few distinct sides per batch
        sel = (sides == side).to(x.device)
        small = F.interpolate(x[sel], size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        out[sel] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out


def _contrast(x: Tensor, cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    n = x.shape[0]
    ink = _uniform(n, *cfg.ink, g).to(x).view(n, 1, 1, 1)
    ground = _uniform(n, *cfg.ground, g).to(x).view(n, 1, 1, 1)
    return x * ink + ground


@cache
def glyphs(side: int) -> Tensor:
    """The digits 0-9 typeset in each available font of ``TYPESET_FONTS``, white on black, centred, 0.75 of
    the side high: [fonts, 10, side, side] in [0, 1] (rendered once per process and side)."""
    bank = []
    for name in TYPESET_FONTS:
        try:
            path = font_manager.findfont(name, fallback_to_default=False)
        except ValueError:  # not installed here
            continue
        font = ImageFont.truetype(path, round(0.75 * side))
        row = []
        for digit in range(10):
            canvas = Image.new("L", (side, side), 0)
            draw = ImageDraw.Draw(canvas)
            left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
            draw.text(
                ((side - (right - left)) / 2 - left, (side - (bottom - top)) / 2 - top), str(digit), 255, font
            )
            row.append(torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0))
        bank.append(torch.stack(row))
    if not bank:
        raise RuntimeError(f"augment typeset: none of the fonts {', '.join(TYPESET_FONTS)} is installed")
    return torch.stack(bank)  # [F, 10, side, side]


def _typeset(x: Tensor, labels: Tensor, cfg: AugmentConfig, g: torch.Generator) -> Tensor:
    """x [n, C, H, W], labels [n] in 0..9 -> the labels typeset [n, C, H, W]."""
    n, c, h, w = x.shape
    bank = glyphs(h)  # [F, 10, H, H]
    font = torch.randint(bank.shape[0], (n,), generator=g)
    zoom = _uniform(n, *cfg.typeset_scale, g)
    angle = _uniform(n, -cfg.typeset_turn, cfg.typeset_turn, g) * (math.pi / 180.0)
    shift = _uniform(2 * n, -cfg.typeset_move, cfg.typeset_move, g).view(n, 2)
    digits = bank[font, labels.cpu().long()][:, None].expand(-1, c, -1, -1).to(x)  # [n, C, H, W]
    return _affine(digits, zoom, angle, shift)


SHIFTS: dict[str, Callable[[Tensor, AugmentConfig, torch.Generator], Tensor]] = {
    "scale": _scale,
    "translate": _translate,
    "rotate": _rotate,
    "thin": _thin,
    "thick": _thick,
    "blur": _blur,
    "lowres": _lowres,
    "contrast": _contrast,
}


def augment(images: Tensor, cfg: AugmentConfig, g: torch.Generator, labels: Tensor | None = None) -> Tensor:
    """images [b, C, H, W] in [0, 1] -> [b, C, H, W] in [0, 1]: a share ``cfg.p`` of them shifted, each by
    one family of ``cfg.families``; the rest unchanged. ``g``: a CPU generator (``step_generator``);
    ``labels`` [b] (0-9, -1 = none): the digits ``typeset`` draws."""
    if images.dim() != 4:
        raise ValueError(f"augment takes images [b, C, H, W], got {tuple(images.shape)} (not clips)")
    if not cfg.enabled:
        return images
    b = images.shape[0]
    chosen = torch.rand(b, generator=g) < cfg.p  # [b]
    family = torch.randint(len(cfg.families), (b,), generator=g)  # [b]
    out = images.clone()
    for i, name in enumerate(cfg.families):
        sel = chosen & (family == i)  # [b]
        if name == "typeset":
            known = labels.cpu() if labels is not None else torch.full((b,), -1)
            sel &= (known >= 0) & (known <= 9)
        if sel.any():
            idx = sel.nonzero().squeeze(1)
            if name == "typeset":
                shifted = _typeset(images[idx.to(images.device)], known[idx], cfg, g)
            else:
                shifted = SHIFTS[name](images[idx.to(images.device)], cfg, g)
            out[idx.to(images.device)] = shifted.to(images.dtype)
    return out.clamp_(0.0, 1.0)
