"""Clip helpers and the built-in Moving MNIST generator (digits of the MNIST asset bouncing in a frame).

Legend: ``n`` clips, ``T`` frames, ``H W`` frame size, ``C`` channels. The library's clip layout is
float ``[n, C, T, H, W]`` in ``[0, 1]``; files and tables hold uint8 ``[n, T, H, W, 3]`` (or grey
``[n, T, H, W]``).

Moving MNIST (Srivastava et al. 2015's recipe, seeded and offline): each clip draws ``digits`` MNIST
digits of the chosen split, scales them to ``digit_size`` pixels, starts each at a random position
with a random direction and a speed, moves it every frame and bounces it off the frame's borders;
overlapping digits combine by maximum. Clip ``i`` depends only on ``(seed, split, i)`` and the
parameters, so any range of clips can be generated on its own (shards) and always gives the same
pixels. Labels are the digits shown, in drawing order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from spae.data import SPLITS, load_mnist

_SPLIT_SEED = {name: i for i, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class MovingMnistConfig:
    frames: int = 16  # T
    size: int = 32  # H = W
    digits: int = 1  # digits per clip
    digit_size: int = 0  # side of a digit in pixels; 0 = round(28 * size / 64), the classic 64px ratio
    seed: int = 0

    def __post_init__(self) -> None:
        if self.frames < 1 or self.size < 4 or self.digits < 1:
            raise ValueError(
                f"moving mnist: frames ({self.frames}) >= 1, size ({self.size}) >= 4 and digits "
                f"({self.digits}) >= 1 are required"
            )
        if not 0 <= self.digit_size <= self.size:
            raise ValueError(f"moving mnist: digit_size={self.digit_size} must lie in 0..size ({self.size})")

    @property
    def side(self) -> int:
        """The digit side actually drawn."""
        return self.digit_size or max(4, round(28 * self.size / 64))


@dataclass(frozen=True)
class MovingMnistClips:
    clips: np.ndarray  # uint8 [n, T, H, W] (grey)
    labels: np.ndarray  # int64 [n, digits]: the digits shown
    mnist_index: np.ndarray  # int64 [n, digits]: rows of the MNIST split they come from


@lru_cache(maxsize=4096)
def _scaled_digit(split: str, k: int, side: int) -> np.ndarray:
    """uint8 [side, side]: MNIST digit ``k`` of ``split`` scaled to ``side`` (bilinear, antialiased)."""
    x = torch.tensor(load_mnist(split)[0][k], dtype=torch.float32)[None, None]  # [1, 1, 28, 28]
    if side != 28:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=side < 28, align_corners=False)
    out = x[0, 0].clamp(0, 255).round().to(torch.uint8).numpy()
    out.flags.writeable = False
    return out


def moving_mnist(split: str, start: int, stop: int, cfg: MovingMnistConfig | None = None) -> MovingMnistClips:
    """Clips ``start..stop-1`` of the Moving MNIST set drawn from MNIST ``split``."""
    cfg = cfg or MovingMnistConfig()
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
    if not 0 <= start <= stop:
        raise ValueError(f"clip range {start}..{stop} is empty or negative")
    labels_all = load_mnist(split)[1]
    n, t, size, side = stop - start, cfg.frames, cfg.size, cfg.side
    clips = np.zeros((n, t, size, size), np.uint8)
    labels = np.zeros((n, cfg.digits), np.int64)
    index = np.zeros((n, cfg.digits), np.int64)
    room = size - side  # positions 0..room keep the digit inside the frame
    for row, i in enumerate(range(start, stop)):
        rng = np.random.default_rng([cfg.seed, _SPLIT_SEED[split], i])
        for d in range(cfg.digits):
            k = int(rng.integers(len(labels_all)))
            digit = _scaled_digit(split, k, side)  # [s, s]
            index[row, d], labels[row, d] = k, labels_all[k]
            pos = rng.uniform(0, room, size=2)  # (y, x)
            angle = rng.uniform(0, 2 * np.pi)
            speed = rng.uniform(0.5, 1.0) * max(1.0, room / 4)  # pixels per frame
            vel = speed * np.array([np.sin(angle), np.cos(angle)])
            for f in range(t):
                y, x = (int(round(v)) for v in pos)
                patch = clips[row, f, y : y + side, x : x + side]
                np.maximum(patch, digit, out=patch)
                pos = pos + vel
                for a in range(2):  # bounce off the borders
                    if pos[a] < 0 or pos[a] > room:
                        vel[a] = -vel[a]
                        pos[a] = min(max(-pos[a], 0.0), room) if pos[a] < 0 else max(2 * room - pos[a], 0.0)
    return MovingMnistClips(clips, labels, index)


# ----------------------------------------------------------------------------- clip layout helpers


def clips_to_float(clips: np.ndarray | Tensor) -> Tensor:
    """uint8 ``[n, T, H, W]`` (grey) or ``[n, T, H, W, 3]`` -> float ``[n, 3, T, H, W]`` in [0, 1]."""
    x = torch.as_tensor(np.asarray(clips))
    if x.dim() == 4:
        x = x[..., None].expand(*x.shape, 3)  # grey -> RGB
    if x.dim() != 5 or x.shape[-1] != 3:
        raise ValueError(f"expected clips [n, T, H, W] or [n, T, H, W, 3], got {tuple(x.shape)}")
    return x.permute(0, 4, 1, 2, 3).float().div(255.0).contiguous()  # [n, 3, T, H, W]


def clips_to_uint8(clips: Tensor) -> np.ndarray:
    """float ``[n, C, T, H, W]`` in [0, 1] -> uint8 ``[n, T, H, W, 3]`` (grey repeated to 3 channels)."""
    if clips.dim() != 5:
        raise ValueError(f"expected clips [n, C, T, H, W], got {tuple(clips.shape)}")
    x = clips.detach().cpu().float().clamp(0, 1).mul(255.0).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1, -1)
    return x.permute(0, 2, 3, 4, 1).contiguous().numpy()


def sample_frame_indices(num_frames: int, k: int) -> list[int]:
    """``k`` frame indices spread evenly over ``num_frames`` (centres of k equal segments)."""
    if num_frames < 1 or k < 1:
        raise ValueError(f"num_frames ({num_frames}) and k ({k}) must be >= 1")
    k = min(k, num_frames)
    return [int((2 * j + 1) * num_frames // (2 * k)) for j in range(k)]


def frames_as_images(clips: Tensor) -> Tensor:
    """``[n, C, T, H, W]`` -> ``[n * T, C, H, W]`` (frame-major within a clip), for per-frame metrics."""
    n, c, t, h, w = clips.shape
    return clips.transpose(1, 2).reshape(n * t, c, h, w)
