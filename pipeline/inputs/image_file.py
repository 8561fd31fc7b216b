"""One image file's bytes -> fixed-size RGB pixels (``decode_image``), and what to decode
(``DecodeOptions``): the single-image helpers that ``pipeline.inputs.images`` (batches) and
``pipeline.inputs.video``
(clips, frame by frame) both build on.

Every mode becomes RGB (``to_rgb``): grey and palette images are expanded, CMYK converted, 16-bit and
float images rescaled to 8 bits, alpha composited over white; EXIF orientation is applied; multi-frame
files use their first frame.

Resizing to ``size x size`` (``fit_square``, by ``fit``):

- ``auto`` (default): an image that nearly fits (both sides <= ``size``, the longer >= 3/4 of it)
  is centre-padded with black, no resampling (MNIST 28 -> 32 gets 2 px on each side, like
  ``spae.data.mnist_images``); any other is resized so its shorter side is ``size`` and
  centre-cropped (MNIST 28 -> 224 is upsampled, not padded);
- ``crop``: always shorter side to ``size`` then centre-crop (up- or down-sampling);
- ``pad``: always longer side to ``size`` then centre-pad with black.

An image that cannot be decoded raises ``DecodeError`` with the reason stored in errors tables:
``zero-byte file``, ``undecodable: ...``, ``truncated: ...``, ``too large: WxH > max_pixels``,
``unsupported mode: ...``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FIT_MODES = ("auto", "crop", "pad")
FitMode = Literal["auto", "crop", "pad"]
FIT: FitMode = "auto"  # the default resize policy of every job
MAX_PIXELS = 50_000_000  # the default pixel limit of every job: larger images become error rows


@dataclass(frozen=True)
class DecodeOptions:
    """How a job decodes its rows: images to uint8 ``[size, size, 3]`` (``frames = 0``), or clips of
    ``frames`` frames ``[frames, size, size, 3]`` (``frames > 0``); ``fit`` is the resize policy of this
    module; an image (a clip's frame) of more than ``max_pixels`` pixels is an error row."""

    size: int
    frames: int = 0
    fit: FitMode = FIT
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.fit not in FIT_MODES:
            raise ValueError(f"fit: {self.fit!r} is not one of {', '.join(FIT_MODES)}")
        if self.size < 1:
            raise ValueError(f"size: must be >= 1 (the side images are decoded to), got {self.size}")
        if self.frames < 0:
            raise ValueError(f"frames: must be >= 0 (0 = images, else frames per clip), got {self.frames}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels: must be >= 1, got {self.max_pixels}")

    @classmethod
    def for_model(cls, model_cfg: Any, **options: Any) -> DecodeOptions:
        """The inputs of a model (``spae.model.SPAEConfig``): ``image_size`` images, or clips of its
        ``num_frames`` frames; ``options`` are the job's ``fit`` / ``max_pixels``."""
        return cls(int(model_cfg.image_size), int(model_cfg.num_frames or 0), **options)

    def pixels_shape(self, n: int) -> tuple[int, ...]:
        """``[n, size, size, 3]`` (images) or ``[n, frames, size, size, 3]`` (clips)."""
        side = (self.size, self.size, 3)
        return (n, self.frames, *side) if self.frames else (n, *side)


class DecodeError(ValueError):
    """One image cannot be turned into pixels; the message is the reason stored in errors tables."""


def decode_image(data: bytes | None, decode: DecodeOptions) -> np.ndarray:
    """Image file bytes -> uint8 ``[size, size, 3]`` RGB (``decode.frames`` unused); raises
    ``DecodeError`` with the reason."""
    if data is None or len(data) == 0:
        raise DecodeError("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)))
        w, h = image.size
        if w * h > decode.max_pixels:
            raise DecodeError(f"too large: {w}x{h} > max_pixels {decode.max_pixels}")
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = to_rgb(image)
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"too large: {e}") from e
    except UnidentifiedImageError as e:
        raise DecodeError("undecodable: not a recognised image format") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = f"{type(e).__name__}: {e}"
        if "truncated" in str(e).lower() or isinstance(e, EOFError) or "premature end" in str(e).lower():
            raise DecodeError(f"truncated: {text}") from e
        raise DecodeError(f"undecodable: {text}") from e
    except Exception as e:  # noqa: BLE001 - a decoder bug must not kill the shard
        raise DecodeError(f"undecodable: {type(e).__name__}: {e}") from e
    return fit_square(rgb, decode.size, decode.fit)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> ``RGB`` (8 bits per channel)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(image).astype(np.float64)
        if mode == "F":
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        elif mode == "I" and (not a.size or a.max() <= 255):
            pass  # 32-bit container of 8-bit values
        else:
            a = a / 257.0  # 16-bit range -> 8 bits
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return image.convert("RGB")
    raise DecodeError(f"unsupported mode: {mode}")


def fit_square(image: Image.Image, size: int, fit: str) -> np.ndarray:
    """RGB image -> uint8 ``[size, size, 3]`` by the ``fit`` policy of this module."""
    w, h = image.size
    nearly_fits = w <= size and h <= size and 4 * max(w, h) >= 3 * size
    if fit == "pad" or (fit == "auto" and nearly_fits):
        scale = size / max(w, h) if fit == "pad" else 1.0
        if scale != 1.0:
            new = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = image.resize(new, Image.Resampling.BICUBIC)
        out = np.zeros((size, size, 3), dtype=np.uint8)  # [H, W, 3]
        a = np.asarray(image)
        top, left = (size - a.shape[0]) // 2, (size - a.shape[1]) // 2
        out[top : top + a.shape[0], left : left + a.shape[1]] = a
        return out
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    image = image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
