"""The pyramid figure and HTML page (pure), and the decode / report jobs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from spae.report import (
    SHADE_SEMANTIC,
    PyramidPanel,
    Reconstruction,
    figure_png,
    frequency_shade,
    layer_grid,
    report_html,
    score_shade,
    to_uint8_image,
)


def _panel(image_id: str, word: str) -> PyramidPanel:
    rng = np.random.default_rng(0)
    original = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    layers = (
        layer_grid(1, [word], (1, 1), [1.0], SHADE_SEMANTIC),
        layer_grid(2, ["a", "<b>", "c", "d"], (2, 2), [0.0, 0.3, 0.6, 1.0], SHADE_SEMANTIC),
        layer_grid(3, [f"w{i}" for i in range(144)], (12, 12), [0.5] * 144, SHADE_SEMANTIC),  # histogram
    )
    recon = (Reconstruction(prefix=4, tokens=21, image=original, psnr=23.45),)
    return PyramidPanel(image_id=image_id, original=original, layers=layers, reconstructions=recon, label="7")


def test_shades_hand_computed():
    assert frequency_shade([1, 2, 3], {1: 0, 2: 1, 3: 3}) == pytest.approx([0.0, np.log(2) / np.log(4), 1.0])
    assert frequency_shade([1], {}) == [0.0]
    assert score_shade([5, 6, 7], {5: 0.9, 6: 1.7}) == [0.9, 1.0, 0.0]


def test_layer_grid_is_row_major_and_checks_size():
    grid = layer_grid(2, ["a", "b", "c", "d"], (2, 2), [0, 0, 0, 1], "frequency")
    assert grid.words == (("a", "b"), ("c", "d")) and grid.shade[1][1] == 1.0 and grid.size == (2, 2)
    with pytest.raises(ValueError, match="3 words"):
        layer_grid(2, ["a", "b", "c"], (2, 2), [0, 0, 0], "frequency")


def test_to_uint8_image_layouts():
    chw = np.zeros((3, 4, 5), dtype=np.float32)
    chw[0] = 1.0
    out = to_uint8_image(chw)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8 and out[0, 0].tolist() == [255, 0, 0]
    assert to_uint8_image(np.full((4, 4), 0.5)).shape == (4, 4, 3)
    with pytest.raises(ValueError, match="shape"):
        to_uint8_image(np.zeros(5))


def test_figure_png_is_a_png_of_the_layout():
    png = figure_png([_panel("mnist-test-000001", "seven"), _panel("mnist-test-000002", "two")], title="t")
    image = Image.open(io.BytesIO(png))
    # 5 columns (original, 3 layers, 1 reconstruction) x 2 rows at 2.3 x 2.5 inches, 100 dpi
    assert image.size[0] == pytest.approx(5 * 230, abs=2) and image.size[1] > 2 * 250


def test_report_html_lists_image_ids_words_and_escapes():
    page = report_html(
        [_panel("mnist-test-000001", "seven")], meta={"corpus": "s3://b/c"}, figure_href="pyramids.png"
    )
    assert 'data-image-id="mnist-test-000001"' in page
    assert ">seven</td>" in page and "&lt;b&gt;" in page and "<b>" not in page.split("<body>")[1]
    assert 'src="pyramids.png"' in page and "s3://b/c" in page
    assert "layers 1-4 (21 tokens), 23.4 dB" in page or "layers 1-4 (21 tokens), 23.5 dB" in page
    assert page.count("data:image/png;base64,") == 2  # original + one reconstruction
    assert '<ol class="hist">' in page  # the 12x12 layer is a histogram of its top words


# ----------------------------------------------------------------------------- the decode and report jobs


def make_tokenizer(folder, vocab: int = 48, seed: int = 0):
    """A random-weight ``tiny`` tokenizer (16px images, layers 1x1, 2x2, 4x4, 4x4) saved to ``folder``."""
    import torch

    from spae.codebook import FrozenCodebook
    from spae.model import preset
    from spae.tokenizer import SPAETokenizer

    torch.manual_seed(seed)
    cfg = preset("tiny")
    codebook = FrozenCodebook.from_tensor(
        torch.randn(vocab, cfg.network.latent_dim), words=[f"w{i}" for i in range(vocab)]
    )
    return SPAETokenizer.from_config(cfg, codebook).save_pretrained(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 24-image MNIST corpus written in-process (no Ray) with a random ``tiny`` tokenizer."""

    from pipeline.inputs.sources import SourceConfig
    from pipeline.runtime.tracking import MlflowConfig
    from pipeline.steps.tokenize import TokenizeJobConfig, run_tokenize_job

    root = tmp_path_factory.mktemp("corpus")
    tok = make_tokenizer(root / "tokenizer")
    cfg = TokenizeJobConfig(
        source=SourceConfig(uri="mnist://test?limit=24", shard_size=8),
        tokenizer=str(tok),
        output=str(root / "corpus"),
        in_process=True,
        roundtrip_sample=0,
        mlflow=MlflowConfig(enabled=False),
        progress=False,
    )
    result = run_tokenize_job(cfg)
    assert result.manifest["rows_written"] == 24 and result.shards_run == 3
    return root


def test_decode_corpus_rows_and_edited_text(corpus, tmp_path, capsys):
    import json

    from jobs.decode import main
    from pipeline.outputs.corpus import read_corpus, select_rows, token_pyramid
    from pipeline.steps.tokenize import load_tokenizer

    table = select_rows(read_corpus(str(corpus / "corpus")), image_ids=["mnist-test-000003"])
    text = table.column("text")[0].as_py()
    words = text.split()
    assert words[0] == "[L1]" and words[2] == "[L2]"
    edited = " ".join(["[L1]", "w5x", *words[2:]])  # a hand-edited answer with a typo in layer 1
    out = tmp_path / "decoded"
    argv = [
        f"corpus={corpus / 'corpus'}",
        "image_ids=[mnist-test-000003]",
        "--text",
        edited,
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (out / "mnist-test-000003.png").is_file() and (out / "text-000.png").is_file()
    report = json.loads((out / "decode_report.json").read_text())
    by_origin = {d["origin"]: d for d in report["images"]}
    unknown = by_origin["text:0"]["report"]["unknown_words"]
    assert [w for w, _ in unknown] == ["w5x"] and "'w5x' ->" in printed
    assert by_origin["corpus:mnist-test-000003"]["prefix"] == 4
    # the corpus row decodes to exactly what the library decodes from its ids
    tokenizer = load_tokenizer(str(corpus / "tokenizer"))
    ref = tokenizer.decode(token_pyramid(table, tokenizer))[0]
    png = np.asarray(Image.open(out / "mnist-test-000003.png"))
    np.testing.assert_array_equal(png, to_uint8_image(ref))
    # the edited text decodes like the original text once its typo is mapped back
    mapped = unknown[0][1]
    fixed, _ = tokenizer.from_text(" ".join(["[L1]", mapped, *words[2:]]))
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "text-000.png")), to_uint8_image(tokenizer.decode(fixed)[0])
    )


def test_decode_rejects_nothing_and_foreign_tokenizer(corpus, tmp_path):

    from jobs.decode import DecodeConfig, run_decode

    with pytest.raises(ValueError, match="nothing to decode"):
        run_decode(DecodeConfig(corpus=str(corpus / "corpus"), output=str(tmp_path)))
    other = make_tokenizer(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="not the one that wrote"):
        run_decode(
            DecodeConfig(corpus=str(corpus / "corpus"), rows=(0,), tokenizer=str(other), output=str(tmp_path))
        )


def test_report_page_and_png_name_the_images(corpus, tmp_path):
    from jobs.report import main

    out = tmp_path / "report"
    ids = ["mnist-test-000009", "mnist-test-000017"]  # in the 2nd and 3rd input shards
    assert main([f"corpus={corpus / 'corpus'}", f"image_ids=[{','.join(ids)}]", f"output={out}"]) == 0
    page = (out / "index.html").read_text()
    assert [s for s in ids if f'data-image-id="{s}"' in page] == ids
    assert page.count('data-image-id="') == 2 and 'src="pyramids.png"' in page
    assert page.count('data-layer="') == 2 * 4  # layers 1-4 per image
    assert "layers 1-3 (21 tokens)" in page and "layers 1-4 (37 tokens)" in page  # covering prefixes
    assert "shaded by frequency" in page
    png = Image.open(out / "pyramids.png")
    assert png.size[0] > png.size[1] > 0


def test_report_shades_by_pool_scores(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.report import ReportConfig, run_report
    from pipeline.outputs.corpus import read_corpus, select_rows

    row = select_rows(read_corpus(str(corpus / "corpus")), image_ids=["mnist-test-000001"]).to_pylist()[0]
    first = row["tokens_l1"][0]
    pools = tmp_path / "pools"
    pools.mkdir()
    table = pa.table(
        {
            "image_id": ["mnist-test-000001"],
            "topk_ids": pa.array([[first]], pa.list_(pa.int32())),
            "topk_scores": pa.array([[0.875]], pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, pools / "part-00000.parquet")
    result = run_report(
        ReportConfig(
            corpus=str(corpus / "corpus"),
            image_ids=("mnist-test-000001",),
            pools=str(pools),
            output=str(tmp_path / "r"),
        )
    )
    page = (tmp_path / "r" / "index.html").read_text()
    assert result.shading == "semantic score" and "shaded by semantic score" in page
    assert f'title="0.875">{row["words_l1"][0]}</td>' in page  # the layer-1 token's pool score
    assert 'title="0.000">' in page  # tokens outside the image's pool
    with pytest.raises(ValueError, match="no rows for mnist-test-000002"):
        run_report(
            ReportConfig(corpus=str(corpus / "corpus"), image_ids=("mnist-test-000002",), pools=str(pools))
        )


def test_decode_corpus_without_deep_layers_fills_them(corpus, tmp_path):
    import json

    from jobs.decode import DecodeConfig, run_decode
    from pipeline.inputs.sources import SourceConfig
    from pipeline.runtime.tracking import MlflowConfig
    from pipeline.steps.tokenize import TokenizeJobConfig, run_tokenize_job

    out = tmp_path / "corpus12"
    cfg = TokenizeJobConfig(
        source=SourceConfig(uri="mnist://test?limit=4", shard_size=4),
        tokenizer=str(corpus / "tokenizer"),
        output=str(out),
        layers=(1, 2),
        in_process=True,
        roundtrip_sample=0,
        mlflow=MlflowConfig(enabled=False),
    )
    run_tokenize_job(cfg)
    (done,) = run_decode(DecodeConfig(corpus=str(out), rows=(0,), output=str(tmp_path / "png")))
    assert done.prefix == 4 and done.report["missing_layers"] == [3, 4]
    assert (tmp_path / "png" / f"{done.name}.png").is_file()
    saved = json.loads((tmp_path / "png" / "decode_report.json").read_text())
    assert saved["images"][0]["report"]["missing_layers"] == [3, 4]


def test_decode_empty_text_like_the_api(corpus, tmp_path, capsys):
    """``spae decode --text ""`` decodes, as ``from_text("")`` does: row 0 everywhere, reported."""
    import json

    from jobs.decode import main
    from pipeline.steps.tokenize import load_tokenizer

    tok = str(corpus / "tokenizer")
    out = tmp_path / "empty"
    assert main(["--tokenizer", tok, "--text", "", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no layer in the text" in printed
    report = json.loads((out / "decode_report.json").read_text())["images"][0]["report"]
    assert report["missing_layers"] == [1, 2, 3, 4] and report["ok"] is False
    tokenizer = load_tokenizer(tok)
    pyramid, _ = tokenizer.from_text("")
    assert all(int(t.max()) == 0 for t in pyramid.ids)
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "text-000.png")), to_uint8_image(tokenizer.decode(pyramid)[0])
    )
    with pytest.raises(SystemExit) as exit_info:  # giving no text at all is still an error
        main(["--tokenizer", tok, "--output", str(out)])
    assert exit_info.value.code == 2


def test_decode_report_of_a_runaway_answer_is_bounded(corpus, tmp_path, capsys):
    from jobs.decode import main

    out = tmp_path / "runaway"
    runaway = "[L1] w1 [L2] " + " ".join(f"w{i}x" for i in range(4)) + " [L4] w7 " * 10_000
    assert main(["--tokenizer", str(corpus / "tokenizer"), "--text", runaway, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(printed) < 800, printed
    assert "ignored: 9999 tags (layers [4]), 9999 words" in printed
    assert "unknown words: 4 (4 distinct): 'w0x' -> " in printed and "L4 1->16" in printed
    assert (out / "decode_report.json").stat().st_size < 2_000
    typos = " ".join(f"w{i % 40}y" for i in range(16))  # 16 unknown words, more than the report lists
    tok = str(corpus / "tokenizer")
    assert main(["--tokenizer", tok, "--text", f"[L3] {typos}", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unknown words: 16 (16 distinct): " in printed and "... and 6 more" in printed
