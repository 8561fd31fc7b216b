"""Decoding: every mode to RGB, the resize policy, and one reason per broken image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.inputs.images import DecodeOptions, decode_batch, decode_image
from pipeline.inputs.sources import SourceConfig, decode_source
from spae.data import load_mnist, mnist_images


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def noise(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_broken_images_get_reasons_and_the_rest_decodes():
    jpeg = encode(noise(64, 64), "JPEG")
    batch = {
        "image_id": np.array(["ok", "zero", "corrupt", "truncated", "huge", "unreadable"], dtype=object),
        "image_bytes": np.array(
            [
                encode(noise(24, 24)),
                b"",
                b"\x89PNG not really" * 20,
                jpeg[: len(jpeg) // 2],
                encode(Image.new("L", (400, 300))),
                b"",
            ],
            dtype=object,
        ),
        "error": np.array([None, None, None, None, None, "unreadable: PermissionError"], dtype=object),
        "error_stage": np.array([None, None, None, None, None, "read"], dtype=object),
    }
    out = decode_batch(batch, DecodeOptions(24, max_pixels=100_000))
    assert out["pixels"].shape == (6, 24, 24, 3) and out["pixels"].dtype == np.uint8
    np.testing.assert_array_equal(out["pixels"][0], np.asarray(noise(24, 24)))
    assert out["error"][0] is None
    assert out["error"][1] == "zero-byte file"
    assert out["error"][2].startswith("undecodable: ")
    assert out["error"][3].startswith("truncated: ")
    assert out["error"][4] == "too large: 400x300 > max_pixels 100000"
    assert out["error"][5] == "unreadable: PermissionError" and out["error_stage"][5] == "read"
    assert list(out["error_stage"][:5]) == [None, "decode", "decode", "decode", "decode"]
    assert not out["pixels"][1:].any()  # failed rows carry zero pixels
    assert list(out["image_id"]) == list(batch["image_id"])


@pytest.mark.parametrize(
    "image, rgb",
    [
        (Image.new("L", (16, 16), 77), (77, 77, 77)),
        (Image.new("RGBA", (16, 16), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("RGBA", (16, 16), (10, 20, 30, 0)), (255, 255, 255)),  # transparent -> white
        (Image.new("LA", (16, 16), (90, 255)), (90, 90, 90)),
        (Image.new("RGB", (16, 16), (0, 0, 255)).convert("P"), (0, 0, 255)),
        (Image.new("1", (16, 16), 1), (255, 255, 255)),
        (Image.fromarray(np.full((16, 16), 257 * 200, np.uint16)), (200, 200, 200)),  # 16-bit
    ],
    ids=["L", "RGBA", "RGBA-transparent", "LA", "P", "1", "I;16"],
)
def test_modes_become_rgb(image, rgb):
    pixels = decode_image(encode(image), DecodeOptions(16))
    assert pixels.shape == (16, 16, 3)
    np.testing.assert_array_equal(pixels[8, 8], rgb)


def test_cmyk_jpeg_and_tiff():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    for fmt in ("JPEG", "TIFF"):
        pixel = decode_image(encode(cmyk, fmt), DecodeOptions(16))[8, 8].astype(int)
        assert pixel[0] > 240 and pixel[1] < 15 and pixel[2] < 15, (fmt, pixel)


def test_mnist_pads_like_the_library_and_large_images_are_cropped():
    images, _ = load_mnist("test")
    images = images[:1].copy()
    pixels = decode_image(encode(Image.fromarray(images[0], mode="L")), DecodeOptions(32))
    expected = (mnist_images(images[:1], 32)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(pixels, expected)
    # 28 -> 224 upsamples instead of padding a tiny digit
    big = decode_image(encode(Image.fromarray(images[0], mode="L")), DecodeOptions(224))
    rows = np.flatnonzero(big.any(axis=(1, 2)))
    assert rows[-1] - rows[0] > 112
    # a wide image: shorter side to size, centre crop keeps the middle
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40] = 255
    out = decode_image(encode(Image.fromarray(wide)), DecodeOptions(20))
    assert out[:, 2:18].min() == 255 and out[:, 0].max() == 255
    assert (
        decode_image(encode(Image.fromarray(wide)), DecodeOptions(30, fit="pad"))[:5].max() == 0
    )  # bars top/bottom


def test_decode_source_keeps_good_rows_and_reports_the_rest(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(encode(Image.new("L", (32, 32), 9)))
    (tmp_path / "a" / "2.png").write_bytes(b"")
    (tmp_path / "3.png").write_bytes(encode(Image.new("RGB", (32, 32), (1, 2, 3))))
    data = decode_source(SourceConfig(uri=str(tmp_path)), DecodeOptions(32))
    assert data.image_ids == ["3.png", "a/1.png"]
    assert data.labels.tolist() == [-1, 0]
    assert data.pixels[0, 0, 0].tolist() == [1, 2, 3] and data.pixels[1, 0, 0].tolist() == [9, 9, 9]
    assert data.errors == {"a/2.png": "zero-byte file"}


def test_pixels_to_device_is_to_float_bit_for_bit():
    import torch

    from pipeline.inputs.images import pixels_to_device, to_float, unit_floats

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)  # [n, H, W, 3]
    images[0, 0, :, 0] = [0, 1, 127, 128, 254, 255, 3]  # the ends and the middle of the byte range
    clips = rng.integers(0, 256, (2, 4, 5, 6, 3), dtype=np.uint8)  # [n, T, H, W, 3]
    for pixels in (images, clips):
        want = torch.from_numpy(to_float(pixels))  # [n, 3, (T,) H, W]
        got = pixels_to_device(pixels, "cpu")
        assert got.dtype == torch.float32 and got.shape == want.shape and torch.equal(got, want)
        # the CUDA path's conversion (a lookup of to_float's 256 values), run here on the CPU
        on_device = unit_floats(torch.from_numpy(pixels))
        assert on_device.is_contiguous() and torch.equal(on_device, want)
    read_only = images.copy()
    read_only.flags.writeable = False  # Ray hands batches over read-only
    assert torch.equal(pixels_to_device(read_only, "cpu"), torch.from_numpy(to_float(images)))
    with pytest.raises(ValueError, match="uint8"):
        pixels_to_device(images.astype(np.float32), "cpu")


def test_decode_options_define_the_defaults_once_and_check_their_fields():
    from pipeline.inputs.video import clip_npy
    from spae.model import preset

    opts = DecodeOptions(32)
    assert (opts.frames, opts.fit, opts.max_pixels) == (0, "auto", 50_000_000)
    assert opts.pixels_shape(5) == (5, 32, 32, 3)
    assert DecodeOptions(16, frames=4).pixels_shape(2) == (2, 4, 16, 16, 3)
    for bad, message in (
        ({"fit": "stretch"}, "fit: 'stretch' is not one of auto, crop, pad"),
        ({"size": 0}, "size: must be >= 1"),
        ({"frames": -1}, "frames: must be >= 0"),
        ({"max_pixels": 0}, "max_pixels: must be >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            DecodeOptions(**{"size": 8, **bad})
    # a model's inputs: images for an image model, clips of its frames for a video model
    assert DecodeOptions.for_model(preset("mnist")) == DecodeOptions(32)
    video = DecodeOptions.for_model(preset("tiny3d"), fit="pad", max_pixels=1000)
    assert video == DecodeOptions(16, frames=4, fit="pad", max_pixels=1000)
    # the options alone make a batch of images or of clips
    clip = clip_npy(np.zeros((4, 8, 8), np.uint8))
    out = decode_batch({"image_bytes": np.array([clip], dtype=object)}, video)
    assert out["pixels"].shape == (1, 4, 16, 16, 3) and out["error"][0] is None
    still = decode_batch({"image_bytes": np.array([clip], dtype=object)}, DecodeOptions(16))
    assert still["error"][0].startswith("undecodable")  # an npy clip is not an image file
