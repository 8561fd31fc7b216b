"""Decode a batch of image bytes into fixed-size RGB pixels, one error reason per failing row.

``decode_batch`` runs inside ``map_batches`` (the jobs never use ``ray.data.read_images``). One image
is decoded by ``pipeline.inputs.image_file.decode_image`` (modes, EXIF orientation, the ``fit`` resize
policy: ``auto``, ``crop``, ``pad``); ``DecodeOptions``, ``DecodeError``, ``decode_image`` and the
``FIT`` / ``MAX_PIXELS`` defaults are importable from here too.

A row that cannot be decoded keeps its id, gets zero pixels and a reason in ``error``: ``zero-byte
file``, ``undecodable: ...``, ``truncated: ...``, ``too large: WxH > max_pixels``, ``unsupported
mode: ...``. Nothing raises per row.

What to decode is one ``DecodeOptions`` (size, frames, fit, max_pixels), built once by a job from
its config and passed down unchanged. Clips (video SPAE): ``frames = T > 0`` decodes every row as a
clip of ``T`` frames of ``size x size`` (``pipeline.inputs.video.decode_clip``; ``pixels`` ``[n, T, S, S,
3]``),
adding ``too short: ...`` to the reasons; an image job becomes a clip job by its options alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.inputs.image_file import FIT as FIT
from pipeline.inputs.image_file import FIT_MODES as FIT_MODES
from pipeline.inputs.image_file import MAX_PIXELS as MAX_PIXELS
from pipeline.inputs.image_file import DecodeError, DecodeOptions, decode_image
from pipeline.inputs.image_file import FitMode as FitMode
from pipeline.inputs.video import decode_clip
from pipeline.outputs.schemas import error_mask

DECODE_STAGE = "decode"


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
    decode_one = decode_clip if decode.frames else decode_image
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
