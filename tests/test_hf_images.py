"""Parquet written by Hugging Face ``datasets``: the image column is the struct
``{"bytes": binary, "path": string}``. Bytes are read; a row without bytes reads its path beside the
Parquet file, or is an error row naming the path; a corrupt image is a decode error row; the whole
file tokenizes end to end (rows in = rows out + errors)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_tokenize_job import NO_MLFLOW, make_tokenizer

from pipeline.inputs.images import DecodeOptions, decode_table
from pipeline.inputs.sources import SourceConfig, list_shards, read_shard
from pipeline.outputs.corpus import read_corpus
from pipeline.outputs.shards import read_errors
from pipeline.steps.tokenize import TokenizeJobConfig, run_tokenize_job

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image's storage type


def png(value: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.full((16, 16, 3), value, np.uint8)
    pixels[::2] = 255 - value
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def hf_parquet(tmp_path) -> Path:
    """``data/train.parquet`` as datasets writes it, with ``data/imgs/2.png`` beside it."""
    folder = tmp_path / "data"
    (folder / "imgs").mkdir(parents=True)
    (folder / "imgs" / "2.png").write_bytes(png(90))
    images = pa.array(
        [
            {"bytes": png(10), "path": "0.png"},
            {"bytes": b"\x89PNG\r\n\x1a\n not really", "path": "1.png"},  # corrupt: a decode error
            {"bytes": None, "path": "imgs/2.png"},  # bytes null: the file beside the Parquet
            {"bytes": None, "path": "imgs/gone.png"},  # bytes null, no such file: an error naming it
            {"bytes": None, "path": None},
            None,
            {"bytes": png(200), "path": None},
        ],
        IMAGE_STRUCT,
    )
    features = {"image": {"_type": "Image"}, "label": {"_type": "Value", "dtype": "int64"}}
    table = pa.table({"image": images, "label": [0, 1, 2, 3, 4, 5, 6]})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, folder / "train.parquet", row_group_size=3)
    return folder / "train.parquet"


def test_image_struct_rows_bytes_paths_and_errors(hf_parquet):
    shards = list_shards(SourceConfig(uri=str(hf_parquet), shard_size=4))
    assert [s.kind for s in shards] == ["parquet", "parquet"]
    table = read_shard(shards[0]).to_pylist() + read_shard(shards[1]).to_pylist()
    assert [r["image_id"] for r in table] == [f"train-{i}" for i in range(7)]
    assert [r["label"] for r in table] == list(range(7))
    assert table[0]["image_bytes"] == png(10) and table[6]["image_bytes"] == png(200)
    assert table[2]["image_bytes"] == png(90) and table[2]["error"] is None  # read beside the Parquet
    assert table[3]["image_bytes"] == b""
    assert table[3]["error"].startswith(
        "missing image bytes (null) and its path 'imgs/gone.png' is unreadable"
    )
    assert [r["error"] for r in table[4:6]] == ["missing image bytes (null)"] * 2
    assert all(r["error_stage"] == "read" for r in table[3:6])
    decoded = decode_table(read_shard(shards[0]), DecodeOptions(size=16))
    assert decoded["error"][1].startswith("undecodable") and decoded["error_stage"][1] == "decode"
    assert decoded["error"][0] is None and decoded["error"][2] is None


def test_a_struct_without_bytes_is_not_an_image_column(tmp_path):
    wrong = pa.array(
        [{"bytes": "text", "path": "a.png"}], pa.struct([("bytes", pa.string()), ("path", pa.string())])
    )
    pq.write_table(pa.table({"image": wrong}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="column 'image' is struct<bytes: string, path: string>; expected"):
        list_shards(SourceConfig(uri=str(tmp_path / "a.parquet")))


def test_tokenize_a_hugging_face_parquet_file(hf_parquet, tmp_path):
    out = tmp_path / "corpus"
    cfg = TokenizeJobConfig(
        source=SourceConfig(uri=str(hf_parquet), shard_size=4),
        tokenizer=str(make_tokenizer(tmp_path / "tok")),
        output=str(out),
        layers=(1, 2),
        max_error_fraction=1.0,  # 4 of 7 rows are bad on purpose
        mlflow=NO_MLFLOW,
        progress=False,
        in_process=True,
    )
    m = run_tokenize_job(cfg).manifest
    assert (m["rows_in"], m["rows_written"], m["errors"]) == (7, 3, 4)
    corpus = read_corpus(str(out))
    assert corpus.column("image_id").to_pylist() == ["train-0", "train-2", "train-6"]
    assert corpus.column("label").to_pylist() == [0, 2, 6]
    errors = {r["image_id"]: (r["stage"], r["reason"]) for r in read_errors(str(out)).to_pylist()}
    assert sorted(errors) == ["train-1", "train-3", "train-4", "train-5"]
    assert errors["train-1"][0] == "decode" and "imgs/gone.png" in errors["train-3"][1]
