"""Video readers: clip bytes -> uint8 frames ``[T, H, W, 3]``, one error reason per failing clip.

A clip arrives as the bytes of one row (``pipeline.inputs.sources``: a video file of a folder, a Parquet
cell, or a generated Moving MNIST clip) and is recognised by its content:

- ``.npy`` bytes (``numpy.save``) of a uint8 frame tensor ``[T, H, W]`` (grey) or ``[T, H, W, 3]``:
  Moving MNIST clips and Parquet shards of frame tensors;
- a frame list packed by ``pack_frames`` (Parquet ``list<binary>`` cells: one image file per frame);
- an animated GIF (decoded with PIL);
- anything else (mp4, webm, mkv, mov, avi, ...) is handed to PyAV (``pip install av``), imported
  lazily: without it those rows become errors saying so.

``decode_clip`` keeps the FIRST ``frames`` frames (stride 1) of its ``DecodeOptions`` and fits each
one to ``size x size`` with ``pipeline.inputs.image_file.fit_square`` (the image policy). A clip with fewer
frames
is an error row (``too short: N frames < T``), as are zero-byte, undecodable and truncated files.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageSequence

from pipeline.inputs.image_file import DecodeError, DecodeOptions, decode_image, fit_square, to_rgb
from spae.metrics import psnr
from spae.report import (
    SHADE_FREQUENCY,
    PyramidPanel,
    Reconstruction,
    frame_strip,
    frequency_shade,
    layer_grid,
)
from spae.video import frames_as_images

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".npy")
NPY_MAGIC = b"\x93NUMPY"
FRAMES_MAGIC = b"SPAEFRAMES1\n"


def pack_frames(frames: list[bytes]) -> bytes:
    """Image-file bytes of each frame -> one blob (``FRAMES_MAGIC``, count, lengths, data)."""
    head = FRAMES_MAGIC + struct.pack("<I", len(frames)) + struct.pack(f"<{len(frames)}Q", *map(len, frames))
    return head + b"".join(frames)


def unpack_frames(data: bytes) -> list[bytes]:
    """Inverse of ``pack_frames``; raises ``DecodeError`` when the blob is cut short."""
    off = len(FRAMES_MAGIC)
    try:
        (n,) = struct.unpack_from("<I", data, off)
        sizes = struct.unpack_from(f"<{n}Q", data, off + 4)
    except struct.error as e:
        raise DecodeError(f"truncated: frame list header: {e}") from e
    off += 4 + 8 * n
    if off + sum(sizes) > len(data):
        raise DecodeError(f"truncated: frame list holds {len(data) - off} of {sum(sizes)} bytes")
    out = []
    for s in sizes:
        out.append(data[off : off + s])
        off += s
    return out


def clip_npy(frames: np.ndarray) -> bytes:
    """uint8 ``[T, H, W]`` or ``[T, H, W, 3]`` -> ``.npy`` bytes (how Moving MNIST rows are stored)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(frames, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


def decode_clip(data: bytes | None, decode: DecodeOptions) -> np.ndarray:
    """Clip bytes -> uint8 ``[frames, size, size, 3]``; raises ``DecodeError`` with the reason."""
    if decode.frames < 1:
        raise ValueError(f"decode_clip: DecodeOptions.frames must be >= 1 for a clip, got {decode.frames}")
    if data is None or len(data) == 0:
        raise DecodeError("zero-byte file")
    data, frames = bytes(data), decode.frames
    if data.startswith(NPY_MAGIC):
        images = _npy_frames(data, frames)
    elif data.startswith(FRAMES_MAGIC):
        parts = unpack_frames(data)
        _check_length(len(parts), frames)
        return np.stack([decode_image(p, decode) for p in parts[:frames]])
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        images = _gif_frames(data, frames, decode.max_pixels)
    else:
        images = _av_frames(data, frames, decode.max_pixels)
    _check_length(len(images), frames)
    return np.stack([fit_square(im, decode.size, decode.fit) for im in images[:frames]])  # [T, S, S, 3]


def _check_length(n: int, frames: int) -> None:
    if n < frames:
        raise DecodeError(f"too short: {n} frames < {frames}")


def _npy_frames(data: bytes, frames: int) -> list[Image.Image]:
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        text = f"{type(e).__name__}: {e}"
        raise DecodeError(
            f"truncated: {text}" if "size" in str(e) or "EOF" in text else f"undecodable: {text}"
        ) from e
    if a.dtype != np.uint8 or a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[-1] != 3):
        raise DecodeError(
            f"unsupported frame tensor: {a.dtype} {list(a.shape)}; expected uint8 [T, H, W(, 3)]"
        )
    _check_length(a.shape[0], frames)
    return [Image.fromarray(f).convert("RGB") for f in a[:frames]]


def _gif_frames(data: bytes, frames: int, max_pixels: int) -> list[Image.Image]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            gif = Image.open(io.BytesIO(data))
        w, h = gif.size
        if w * h > max_pixels:
            raise DecodeError(f"too large: {w}x{h} > max_pixels {max_pixels}")
        out = []
        for frame in ImageSequence.Iterator(gif):
            out.append(to_rgb(frame.copy()))
            if len(out) >= frames:
                break
        return out
    except DecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = f"{type(e).__name__}: {e}"
        kind = "truncated" if "truncated" in text.lower() or isinstance(e, EOFError) else "undecodable"
        raise DecodeError(f"{kind}: {text}") from e


def _av_frames(data: bytes, frames: int, max_pixels: int) -> list[Image.Image]:
    try:
        import av
    except ImportError as e:
        raise DecodeError(
            "undecodable: not an npy/GIF clip, and decoding mp4/webm needs PyAV (pip install av)"
        ) from e
    out: list[Image.Image] = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise DecodeError("undecodable: no video stream")
            stream = container.streams.video[0]
            if stream.width * stream.height > max_pixels:
                raise DecodeError(f"too large: {stream.width}x{stream.height} > max_pixels {max_pixels}")
            for frame in container.decode(stream):
                out.append(frame.to_image().convert("RGB"))
                if len(out) >= frames:
                    break
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV raises many kinds (av.error.*); each is a bad file
        if out:  # frames before the damage: the length check decides
            return out
        raise DecodeError(f"undecodable: {type(e).__name__}: {e}") from e
    return out


def clip_gif(frames: np.ndarray, fps: float = 8.0, scale: int = 1) -> bytes:
    """uint8 ``[T, H, W, 3]`` -> animated GIF bytes (looping). PIL merges identical consecutive frames
    into one longer frame: the animation plays the same, a reader may count fewer frames."""
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3] uint8, got {frames.shape}")
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    duration = max(20, round(1000.0 / fps))
    images[0].save(
        buf, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0, optimize=False,
        disposal=1,
    )  # fmt: skip
    return buf.getvalue()


def clip_mp4(frames: np.ndarray, fps: int = 8) -> bytes:
    """uint8 ``[T, H, W, 3]`` -> H.264 MP4 bytes with PyAV (sides rounded down to even sizes)."""
    import av

    frames = np.asarray(frames, dtype=np.uint8)
    t, h, w, _ = frames.shape
    h2, w2 = h - h % 2, w - w % 2
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w2, h2, "yuv420p"
        for f in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:h2, :w2]), format="rgb24")
            ):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def clip_panels(
    tokenizer: object,
    clips: object,
    image_ids: list[str],
    labels: list[int | None] | None = None,
    shown_layers: int = 3,
    max_frames: int = 8,
) -> list:
    """Report panels (``spae.report.PyramidPanel``) for clips ``[k, 3, T, H, W]`` in [0, 1]: the frame
    strip of each clip, its first ``shown_layers`` layers as word grids (time steps side by side,
    shaded by frequency within these clips) and the frame strips of every covering prefix's decode
    with its PSNR over frames. Render with ``spae.report.figure_png`` / ``report_html``."""
    clips = torch.as_tensor(clips, dtype=torch.float32)
    spec = tokenizer.pyramid  # type: ignore[attr-defined]
    pyramid = tokenizer.encode(clips)  # type: ignore[attr-defined]
    layers = [l for l in pyramid.layers if l <= shown_layers]
    counts = {l: Counter(pyramid.layer_ids(l).reshape(-1).tolist()) for l in layers}
    decodes = {c: tokenizer.decode(pyramid, up_to_layer=c) for c in spec.covering_layers}  # type: ignore[attr-defined]
    panels = []
    for i, iid in enumerate(image_ids):
        grids = []
        for l in layers:
            ids = pyramid.layer_ids(l)[i].reshape(-1).tolist()
            words = pyramid.words(l)[i]
            grids.append(
                layer_grid(l, words, spec.layer_size(l), frequency_shade(ids, counts[l]), SHADE_FREQUENCY)
            )
        recons = tuple(
            Reconstruction(
                prefix=c,
                tokens=spec.cumulative_counts[c - 1],
                image=frame_strip(decodes[c][i], max_frames),
                psnr=float(
                    psnr(frames_as_images(decodes[c][i : i + 1]), frames_as_images(clips[i : i + 1])).mean()
                ),
            )
            for c in spec.covering_layers
        )
        label = None if not labels or labels[i] is None else str(labels[i])
        panels.append(PyramidPanel(iid, frame_strip(clips[i], max_frames), tuple(grids), recons, label))
    return panels
