"""``spae report`` on a video corpus: frame strips, word grids over time, PSNR over frames, GIFs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence

from spae.codebook import FrozenCodebook
from spae.model import SPAE, preset
from spae.tokenizer import SPAETokenizer
from spae.video import MovingMnistConfig, clips_to_float, moving_mnist

SMALL = "frames=4&size=16&digit_size=8"  # 4 frames of 16x16: the tiny3d model's clips
CLIPS = MovingMnistConfig(frames=4, size=16, digit_size=8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 5-clip Moving MNIST corpus written in-process (no Ray) with a random ``tiny3d`` tokenizer."""
    from pipeline.inputs.sources import SourceConfig
    from pipeline.runtime.tracking import MlflowConfig
    from pipeline.steps.tokenize import TokenizeJobConfig, run_tokenize_job

    root = tmp_path_factory.mktemp("video-corpus")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cb = FrozenCodebook.from_tensor(
        F.normalize(torch.randn(16, 384, generator=g), dim=1), [f"w{i}" for i in range(16)]
    )
    model = SPAE(preset("tiny3d"), cb)
    model.match_latent_to_codebook(clips_to_float(moving_mnist("train", 0, 4, CLIPS).clips))
    SPAETokenizer(model).save_pretrained(root / "tokenizer")
    cfg = TokenizeJobConfig(
        source=SourceConfig(uri=f"moving-mnist://test?limit=5&{SMALL}", shard_size=3),
        tokenizer=str(root / "tokenizer"), output=str(root / "corpus"), in_process=True,
        roundtrip_sample=0, mlflow=MlflowConfig(enabled=False), progress=False,
    )  # fmt: skip
    assert run_tokenize_job(cfg).manifest["rows_written"] == 5
    return root


def _gif_frames(path) -> tuple[list[np.ndarray], list[int]]:
    gif = Image.open(io.BytesIO(path.read_bytes()))
    frames, durations = [], []
    for frame in ImageSequence.Iterator(gif):
        frames.append(np.asarray(frame.convert("RGB")))
        durations.append(frame.info["duration"])
    return frames, durations


def test_video_report_page_png_and_gifs(corpus, tmp_path, capsys):
    from jobs.report import main
    from pipeline.outputs.corpus import read_corpus, select_rows

    out = tmp_path / "report"
    ids = ["mmnist-test-000001", "mmnist-test-000004"]  # in the 1st and 2nd input shards
    table = read_corpus(str(corpus / "corpus"))
    full_ids = [i for i in table.column("image_id").to_pylist() if i.rsplit("-", 1)[0] in ids]
    assert len(full_ids) == 2  # the id names the digit: mmnist-test-000001-d<k>
    argv = [
        f"corpus={corpus / 'corpus'}",
        f"image_ids=[{','.join(full_ids)}]",
        f"output={out}",
        "gif_scale=4",
    ]
    assert main(argv) == 0
    assert "animations: 4 GIFs" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert [i for i in full_ids if f'data-image-id="{i}"' in page] == full_ids
    assert page.count('data-layer="') == 2 * 4  # layers 1-4 per clip
    # tiny3d: layers 1x1x1, 1x2x2, 2x4x4, 2x4x4 -> layer 3 as a 4 x (2 * 4) grid, time steps side by side
    assert "layer 3 (4x8)" in page and "layers 1-3 (37 tokens)" in page and "layers 1-4 (69 tokens)" in page
    assert " dB</figcaption>" in page and "frames of 16x16" in page
    rows = select_rows(table, image_ids=full_ids).to_pylist()
    for row in rows:  # the top-layer word of each clip is on the page, in its section
        section = page.split(f'data-image-id="{row["image_id"]}"')[1].split("</section>")[0]
        assert f">{row['words_l1'][0]}</td>" in section
        assert f'src="{row["image_id"]}-source.gif"' in section and f'src="{row["image_id"]}.gif"' in section
    png = Image.open(out / "pyramids.png")
    assert png.size[0] > png.size[1] > 0

    source = moving_mnist("test", 0, 5, CLIPS).clips  # uint8 [5, 4, 16, 16]
    for row in rows:
        k = int(row["image_id"].split("-")[2])
        for name in (f"{row['image_id']}-source.gif", f"{row['image_id']}.gif"):
            frames, durations = _gif_frames(out / name)
            assert all(f.shape == (64, 64, 3) for f in frames)  # 16 px x gif_scale 4
            # T = 4 frames at 8 fps (PIL merges identical consecutive frames into a longer one)
            assert len(frames) <= 4 and abs(sum(durations) - 4 * 125) <= 10 * len(frames)
        frames, durations = _gif_frames(out / f"{row['image_id']}-source.gif")
        np.testing.assert_array_equal(frames[0][::4, ::4, 0], source[k, 0])  # grey frames are exact
        np.testing.assert_array_equal(frames[-1][::4, ::4, 0], source[k, -1])
        changes = 1 + sum(int((source[k, t] != source[k, t - 1]).any()) for t in range(1, 4))
        assert len(frames) == changes


def test_video_report_psnr_is_over_frames_and_strips_show_every_frame(corpus, tmp_path):
    from jobs.report import ReportConfig, run_report
    from pipeline.outputs.corpus import read_corpus, select_rows, token_pyramid
    from pipeline.steps.tokenize import load_tokenizer
    from spae.metrics import psnr
    from spae.report import frame_strip
    from spae.video import frames_as_images

    table = read_corpus(str(corpus / "corpus"))
    iid = sorted(table.column("image_id").to_pylist())[2]
    result = run_report(ReportConfig(corpus=str(corpus / "corpus"), image_ids=(iid,), output=str(tmp_path)))
    assert [a.rsplit("/", 1)[-1] for a in result.animations] == [f"{iid}-source.gif", f"{iid}.gif"]
    tok = load_tokenizer(str(corpus / "tokenizer"))
    row = select_rows(table, image_ids=[iid])
    decoded = tok.decode(token_pyramid(row, tok), up_to_layer=4)  # [1, 3, 4, 16, 16]
    clip = clips_to_float(moving_mnist("test", 2, 3, CLIPS).clips)
    want = float(psnr(frames_as_images(decoded), frames_as_images(clip)).mean())
    page = (tmp_path / "index.html").read_text()
    assert f"layers 1-4 (69 tokens), {want:.1f} dB" in page
    assert frame_strip(clip[0]).shape == (16, 4 * 16, 3)  # all 4 frames side by side
    assert 'style="width: auto; height: 64px"' in page  # strips keep their aspect on the page
