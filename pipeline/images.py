"""Decode image bytes into fixed-size RGB pixels, one error reason per failing row.

``decode_batch`` runs inside ``map_batches`` (the jobs never use ``ray.data.read_images``). Every
mode becomes RGB: grey and palette images are expanded, CMYK converted, 16-bit and float images
rescaled to 8 bits, alpha composited over white; EXIF orientation is applied; multi-frame files
use their first frame.

Resizing to ``size x size`` (``fit``):

- ``auto`` (default): an image that nearly fits (both sides <= ``size``, the longer >= 3/4 of it)
  is centre-padded with black, no resampling (MNIST 28 -> 32 gets 2 px on each side, like
  ``spae.data.mnist_images``); any other is resized so its shorter side is ``size`` and
  centre-cropped (MNIST 28 -> 224 is upsampled, not padded);
- ``crop``: always shorter side to ``size`` then centre-crop (up- or down-sampling);
- ``pad``: always longer side to ``size`` then centre-pad with black.

A row that cannot be decoded keeps its id, gets zero pixels and a reason in ``error``: ``zero-byte
file``, ``undecodable: ...``, ``truncated: ...``, ``too large: WxH > max_pixels``, ``unsupported
mode: ...``. Nothing raises per row.

What to decode is one ``DecodeOptions`` (size, frames, fit, max_pixels), built once by a job from
its config and passed down unchanged. Clips (video SPAE): ``frames = T > 0`` decodes every row as a
clip of ``T`` frames of ``size x size`` (``pipeline.video.decode_clip``; ``pixels`` ``[n, T, S, S, 3]``),
adding ``too short: ...`` to the reasons; an image job becomes a clip job by its options alone.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.schemas import error_mask

if TYPE_CHECKING:
    from pipeline.sources import SourceConfig

FIT_MODES = ("auto", "crop", "pad")
FitMode = Literal["auto", "crop", "pad"]
FIT: FitMode = "auto"  # the default resize policy of every job
MAX_PIXELS = 50_000_000  # the default pixel limit of every job: larger images become error rows
DECODE_STAGE = "decode"


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


def decode_table(table: Any, decode: DecodeOptions) -> dict[str, np.ndarray]:
    """A read shard (a ``pyarrow.Table`` of ``read_shard``'s columns) as object rows through
    ``decode_batch``: its columns plus ``pixels`` and ``error``."""
    rows = {name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    return decode_batch(rows, decode)


def decode_batch(batch: dict[str, np.ndarray], decode: DecodeOptions) -> dict[str, np.ndarray]:
    """``batch["image_bytes"]`` -> adds ``pixels`` uint8 ``[n, size, size, 3]`` (clips
    ``[n, T, size, size, 3]``), ``error``, ``error_stage``. Rows that arrive with an ``error`` (e.g.
    unreadable files) keep it and are not decoded.
    """
    if decode.frames:
        from pipeline.video import decode_clip as decode_one
    else:
        decode_one = decode_image
    data = batch["image_bytes"]
    n = len(data)
    prior = error_mask(batch["error"]) if "error" in batch else np.zeros(n, dtype=bool)
    prior_stage = batch.get("error_stage")
    pixels = np.zeros(decode.pixels_shape(n), dtype=np.uint8)  # [n, H, W, 3] or [n, T, H, W, 3]
    errors = np.empty(n, dtype=object)
    stages = np.empty(n, dtype=object)
    for i in range(n):
        if prior[i]:
            errors[i] = batch["error"][i]
            stages[i] = (
                prior_stage[i] if prior_stage is not None and isinstance(prior_stage[i], str) else "read"
            )
            continue
        try:
            pixels[i] = decode_one(data[i], decode)
        except DecodeError as e:
            errors[i], stages[i] = str(e), DECODE_STAGE
    return {**batch, "pixels": pixels, "error": errors, "error_stage": stages}


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


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[n, H, W, 3]`` -> float32 ``[n, 3, H, W]`` in ``[0, 1]`` (the library's image layout);
    clips ``[n, T, H, W, 3]`` -> ``[n, 3, T, H, W]``."""
    axes = (0, 4, 1, 2, 3) if pixels.ndim == 5 else (0, 3, 1, 2)
    return np.ascontiguousarray(pixels.transpose(axes), dtype=np.float32) / 255.0


_UNIT = np.arange(256, dtype=np.float32) / 255.0  # [256]: exactly the values to_float gives each byte
_LOOKUP: dict[str, Any] = {}  # device -> _UNIT as a tensor there


def pixels_to_device(pixels: np.ndarray, device: Any) -> Any:
    """uint8 ``[n, H, W, 3]`` -> float32 ``[n, 3, H, W]`` in ``[0, 1]`` on ``device`` (a torch tensor);
    clips ``[n, T, H, W, 3]`` -> ``[n, 3, T, H, W]``. Bit-identical to ``torch.from_numpy(to_float(p))``.

    On CUDA the uint8 bytes cross (through pinned memory, without blocking the host), a quarter of
    what ``to_float``'s float32 copy would move, and the layout change and the conversion run there
    (``unit_floats``). On the CPU it is ``to_float``, the fastest there.
    """
    import torch

    if pixels.dtype != np.uint8 or pixels.ndim not in (4, 5):
        raise ValueError(
            f"pixels: expected uint8 [n, H, W, 3] or [n, T, H, W, 3], got {pixels.dtype} {pixels.shape}"
        )
    device = torch.device(device)
    if device.type != "cuda":
        return torch.from_numpy(to_float(pixels)).to(device)
    host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
    host.numpy()[...] = pixels  # the one host copy, into page-locked memory
    return unit_floats(host.to(device, non_blocking=True))


def unit_floats(x: Any) -> Any:
    """uint8 tensor ``[n, H, W, 3]`` (clips ``[n, T, H, W, 3]``) -> float32 ``[n, 3, (T,) H, W]`` in
    ``[0, 1]`` on its device, contiguous. A lookup of the 256 values ``to_float`` computes, so the
    result is bit-identical to it (a GPU divides by a scalar as a multiply by its reciprocal, which
    can differ in the last bit)."""
    import torch

    axes = (0, 4, 1, 2, 3) if x.dim() == 5 else (0, 3, 1, 2)
    x = x.permute(axes).contiguous()  # [n, 3, (T,) H, W] uint8: the layout change at 1 byte a value
    key = str(x.device)
    if key not in _LOOKUP:
        _LOOKUP[key] = torch.from_numpy(_UNIT).to(x.device)
    return _LOOKUP[key][x.long()]  # [n, 3, (T,) H, W] float32


@dataclass(frozen=True)
class DecodedImages:
    """A whole (small) source decoded in this process: the rows that decoded, and why others did not."""

    image_ids: list[str]
    labels: np.ndarray  # int64 [n], -1 = no label
    pixels: np.ndarray  # uint8 [n, size, size, 3] (clips: [n, T, size, size, 3])
    errors: dict[str, str]  # image_id -> reason, for rows left out


def decode_source(cfg: SourceConfig, decode: DecodeOptions) -> DecodedImages:
    """Every image (clip, for ``decode.frames > 0``) of a source, without Ray (probe training, evaluation
    sets)."""
    from pipeline.sources import list_shards, read_shard

    ids, labels, pixels, errors = [], [], [], {}
    for shard in list_shards(cfg):
        out = decode_table(read_shard(shard), decode)
        bad = error_mask(out["error"])
        errors.update({out["image_id"][i]: out["error"][i] for i in np.flatnonzero(bad)})
        ids += [str(x) for x in out["image_id"][~bad]]
        labels.append(np.array([-1 if x is None else x for x in out["label"][~bad]], dtype=np.int64))
        pixels.append(out["pixels"][~bad])
    return DecodedImages(ids, np.concatenate(labels), np.concatenate(pixels), errors)
