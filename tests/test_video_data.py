"""Video sources and readers: Moving MNIST rows, folders of video files, Parquet frame tensors, error rows."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.inputs.images import DecodeError, DecodeOptions, decode_batch, to_float
from pipeline.inputs.sources import SourceConfig, list_shards, read_shard
from pipeline.inputs.video import clip_gif, clip_mp4, clip_npy, decode_clip
from spae.video import MovingMnistConfig, moving_mnist


def _rows(table: pa.Table) -> dict[str, np.ndarray]:
    return {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}


def _rgb(clips: np.ndarray) -> np.ndarray:
    return np.repeat(clips[..., None], 3, axis=-1)  # [.., T, H, W] -> [.., T, H, W, 3]


def test_moving_mnist_source_rows_decode_to_the_generated_clips():
    cfg = SourceConfig(uri="moving-mnist://valid?limit=5&frames=6&digits=2&size=32", shard_size=2)
    shards = list_shards(cfg)
    assert [s.num_rows for s in shards] == [2, 2, 1] and shards[1].items == (("valid", 2, 4),)
    assert [s.digest for s in shards] == [s.digest for s in list_shards(cfg)]
    table = read_shard(shards[1])
    want = moving_mnist("valid", 2, 4, MovingMnistConfig(frames=6, digits=2, size=32))
    ids = table.column("image_id").to_pylist()
    assert ids[0] == f"mmnist-valid-000002-d{want.labels[0, 0]}{want.labels[0, 1]}"
    assert table.column("label").to_pylist() == [int(x) for x in want.labels[:, 0]]
    out = decode_batch(_rows(table), DecodeOptions(32, frames=6))
    assert out["pixels"].shape == (2, 6, 32, 32, 3) and not any(out["error"])
    assert np.array_equal(out["pixels"][..., 0], want.clips)
    assert to_float(out["pixels"]).shape == (2, 3, 6, 32, 32)
    with pytest.raises(ValueError, match="unknown query key"):
        list_shards(SourceConfig(uri="moving-mnist://train?fps=3"))
    with pytest.raises(ValueError, match="digits"):
        list_shards(SourceConfig(uri="moving-mnist://train?digits=0"))


def test_folder_of_videos_with_corrupt_and_short_files_gives_error_rows(tmp_path):
    clips = _rgb(moving_mnist("train", 0, 3, MovingMnistConfig(frames=8, size=32)).clips)  # [3, 8, 32, 32, 3]
    (tmp_path / "a.gif").write_bytes(clip_gif(clips[0]))
    (tmp_path / "b.npy").write_bytes(clip_npy(clips[1]))
    try:  # PyAV is optional: with it the mp4 decodes, without it the row says how to get it
        import av  # noqa: F401

        (tmp_path / "c.mp4").write_bytes(clip_mp4(clips[2].repeat(2, 1).repeat(2, 2)))  # 64x64 -> fit to 32
        has_av = True
    except ImportError:
        (tmp_path / "c.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(64))
        has_av = False
    (tmp_path / "d.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (tmp_path / "e.gif").write_bytes(clip_gif(clips[0][:3]))  # too short
    (tmp_path / "f.webm").write_bytes(b"")
    (tmp_path / "g.npy").write_bytes(clip_npy(clips[1])[:100])  # truncated
    (shard,) = list_shards(SourceConfig(uri=str(tmp_path)))
    out = decode_batch(_rows(read_shard(shard)), DecodeOptions(32, frames=8))
    reasons = dict(zip(out["image_id"], out["error"], strict=True))
    assert reasons["a.gif"] is None and reasons["b.npy"] is None
    assert np.array_equal(out["pixels"][0], clips[0]) and np.array_equal(out["pixels"][1], clips[1])
    if has_av:
        assert reasons["c.mp4"] is None
        assert np.abs(out["pixels"][2].astype(int) - clips[2]).mean() < 4  # lossy H.264, resized
    else:
        assert "pip install av" in reasons["c.mp4"]
    assert reasons["d.mp4"].startswith("undecodable")
    assert reasons["e.gif"] == "too short: 3 frames < 8"
    assert reasons["f.webm"] == "zero-byte file"
    assert reasons["g.npy"].startswith(("truncated", "undecodable"))
    assert set(out["error_stage"][3:]) == {"decode"}
    # the same folder read as images: a GIF gives its first frame, an mp4 is not an image
    still = decode_batch(_rows(read_shard(shard)), DecodeOptions(32))
    assert still["error"][0] is None and still["error"][2].startswith("undecodable")


def test_parquet_frame_tensors_and_frame_lists(tmp_path):
    clips = moving_mnist("test", 0, 2, MovingMnistConfig(frames=4, size=32)).clips  # [2, 4, 32, 32]

    def png(frame: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        return buf.getvalue()

    pq.write_table(
        pa.table({"clip": [clip_npy(c) for c in clips], "label": [1, 2]}), tmp_path / "tensors.parquet"
    )
    lists = pa.array([[png(f) for f in clips[0]], [png(clips[1][0])]], pa.list_(pa.binary()))
    pq.write_table(pa.table({"clip": lists}), tmp_path / "frames.parquet")
    for name, ok in (("tensors", [True, True]), ("frames", [True, False])):
        (shard,) = list_shards(SourceConfig(uri=str(tmp_path / f"{name}.parquet"), image_column="clip"))
        out = decode_batch(_rows(read_shard(shard)), DecodeOptions(32, frames=4))
        assert [e is None for e in out["error"]] == ok
        assert np.array_equal(out["pixels"][0, ..., 0], clips[0])
    assert out["error"][1] == "too short: 1 frames < 4"
    assert decode_clip(clip_npy(clips[0]), DecodeOptions(32, frames=2)).shape == (
        2,
        32,
        32,
        3,
    )  # the first T frames


def test_clip_report_panels_render_frame_strips_and_3d_grids():
    import torch
    import torch.nn.functional as F

    from pipeline.inputs.video import clip_panels
    from spae.codebook import FrozenCodebook
    from spae.model import SPAE, preset
    from spae.report import figure_png, report_html
    from spae.tokenizer import SPAETokenizer
    from spae.video import clips_to_float

    torch.manual_seed(0)
    cb = FrozenCodebook.from_tensor(F.normalize(torch.randn(16, 384), dim=1), [f"w{i}" for i in range(16)])
    tok = SPAETokenizer(SPAE(preset("tiny3d"), cb))
    gen = moving_mnist("train", 0, 2, MovingMnistConfig(frames=4, size=16, digit_size=8))
    panels = clip_panels(tok, clips_to_float(gen.clips), ["a", "b"], gen.labels[:, 0].tolist())
    p = panels[0]
    assert p.original.shape == (16, 4 * 16, 3)  # 4 frames side by side
    assert [g.size for g in p.layers] == [
        (1, 1),
        (2, 2),
        (4, 8),
    ]  # layer 3 (2x4x4): 2 time steps side by side
    words3 = tok.encode(clips_to_float(gen.clips)).words(3)[0]  # (t, y, x) order
    assert p.layers[2].words[1][4] == words3[16 + 1 * 4 + 0]  # row 1, time step 1, column 0
    assert [r.prefix for r in p.reconstructions] == [3, 4] and p.reconstructions[0].image.shape == (16, 64, 3)
    assert figure_png(panels).startswith(b"\x89PNG")
    assert 'data-layer="3"' in report_html(panels)


def test_video_files_without_pyav_become_error_rows_naming_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(DecodeError, match=r"needs PyAV \(pip install av\)"):
        decode_clip(b"\x00\x00\x00\x18ftypisom" + bytes(64), DecodeOptions(16, frames=4))
    clip = moving_mnist("train", 0, 1, MovingMnistConfig(frames=4, size=16, digit_size=8)).clips[0]
    assert decode_clip(clip_npy(clip), DecodeOptions(16, frames=4)).shape == (
        4,
        16,
        16,
        3,
    )  # npy and GIF need no PyAV
    assert decode_clip(
        clip_gif(np.repeat(clip[..., None], 3, axis=-1)), DecodeOptions(16, frames=4)
    ).shape == (4, 16, 16, 3)
