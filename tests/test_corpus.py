"""Corpus rows: schema, words and text from token ids, the JSONL twin, reading back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.outputs.corpus import (
    CorpusBatch,
    build_table,
    corpus_layers,
    corpus_schema,
    format_text,
    ids_from_table,
    jsonl_bytes,
    parse_jsonl,
    read_corpus,
    select_rows,
)

VOCAB = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "caf\u00e9"]


def _batch() -> CorpusBatch:
    return CorpusBatch(
        image_ids=["a", "b"],
        sources=["mnist://test", "mnist://test"],
        labels=[7, None],
        ids={
            1: np.array([[[7]], [[2]]]),  # [b, 1, 1]
            2: np.array([[[1, 2], [3, 10]], [[0, 0], [9, 8]]]),  # [b, 2, 2] -> row-major
        },
    )


def test_format_text_layers_in_order_and_delimited():
    assert format_text([(1, ["seven"]), (2, ["a", "b", "c", "d"])]) == "[L1] seven [L2] a b c d"
    assert format_text([(3, ["x"])]) == "[L3] x"


def test_build_table_schema_words_and_text():
    table = build_table(_batch(), VOCAB)
    assert table.schema == corpus_schema([1, 2])
    assert corpus_layers(table.schema) == (1, 2)
    assert table.schema.field("tokens_l2").type == pa.list_(pa.int32())
    row = table.to_pylist()
    assert row[0]["tokens_l2"] == [1, 2, 3, 10]
    assert row[0]["words_l2"] == ["one", "two", "three", "caf\u00e9"]
    assert row[0]["text"] == "[L1] seven [L2] one two three caf\u00e9"
    assert row[1]["text"] == "[L1] two [L2] zero zero nine eight"
    assert row[1]["label"] is None and row[0]["label"] == 7
    ids = ids_from_table(table)
    np.testing.assert_array_equal(ids[2], [[1, 2, 3, 10], [0, 0, 9, 8]])


def test_build_table_uses_given_texts_and_checks_ranges():
    table = build_table(_batch(), VOCAB, texts=["t0", "t1"])
    assert table.column("text").to_pylist() == ["t0", "t1"]
    bad = CorpusBatch(["a"], ["s"], [None], {1: np.array([[11]])})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_table(bad, VOCAB)
    with pytest.raises(ValueError, match="2 image ids"):
        build_table(CorpusBatch(["a", "b"], ["s"], [None], {1: np.array([[1], [2]])}), VOCAB)


def test_jsonl_twin_equals_parquet_text():
    table = build_table(_batch(), VOCAB)
    data = jsonl_bytes(table)
    assert data.decode("utf-8").count("\n") == 2
    assert "caf\u00e9" in data.decode("utf-8")  # not \u-escaped: readable for LLM tools
    rows = parse_jsonl(data)
    assert [r["text"] for r in rows] == table.column("text").to_pylist()
    assert [r["image_id"] for r in rows] == ["a", "b"]
    assert [r["label"] for r in rows] == [7, None]


def test_read_corpus_and_select_rows(tmp_path):
    table = build_table(_batch(), VOCAB)
    pq.write_table(table.slice(0, 1), tmp_path / "part-00000.parquet")
    pq.write_table(table.slice(1, 1), tmp_path / "part-00001.parquet")
    pq.write_table(table, tmp_path / "_errors.parquet")  # not a part: ignored
    (tmp_path / "part-00002.parquet.tmp-abc").write_bytes(b"partial")  # uncommitted: ignored
    back = read_corpus(str(tmp_path))
    assert back.column("image_id").to_pylist() == ["a", "b"]
    assert select_rows(back, image_ids=["b"]).column("text").to_pylist() == [table.column("text")[1].as_py()]
    assert select_rows(back, rows=[0]).column("image_id").to_pylist() == ["a"]
    with pytest.raises(ValueError, match="not in the corpus: zz"):
        select_rows(back, image_ids=["zz"])
    with pytest.raises(ValueError, match="out of range"):
        select_rows(back, rows=[5])
    with pytest.raises(FileNotFoundError, match="no corpus shards"):
        read_corpus(str(tmp_path / "nothing"))


def test_table_from_pyramid_text_matches_format_text():
    import torch

    from pipeline.outputs.corpus import table_from_pyramid, token_pyramid
    from spae.pyramid import PyramidConfig, PyramidSpec
    from spae.tokenizer import TokenPyramid, Vocabulary

    spec = PyramidSpec(PyramidConfig(latent_size=(2, 2), layer_sizes=((1, 1), (2, 2))))
    vocab = Vocabulary(VOCAB)
    ids = [torch.tensor([[[7]], [[2]]]), torch.tensor([[[1, 2], [3, 10]], [[0, 0], [9, 8]]])]
    pyramid = TokenPyramid(ids, (1, 2), vocab, spec)
    table = table_from_pyramid(pyramid, ["a", "b"], ["mnist://test"] * 2, [7, None])
    assert table.equals(build_table(_batch(), VOCAB))  # the same rows, and to_text == format_text

    class _Tok:  # what token_pyramid needs of a tokenizer
        vocabulary = vocab

    _Tok.pyramid = spec
    back = token_pyramid(table, _Tok())
    assert back == pyramid
