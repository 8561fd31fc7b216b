"""Sources: deterministic listing and shards for MNIST, image folders and Parquet; unreadable files."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.inputs.sources import Shard, SourceConfig, list_shards, read_shard
from spae.data import load_mnist


def png(value: int, size=(8, 8), mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root, layout: dict[str, bytes]) -> None:
    for rel, data in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_mnist_shards_are_deterministic_and_match_the_asset():
    cfg = SourceConfig(uri="mnist://test?limit=25", shard_size=10)
    shards = list_shards(cfg)
    assert [s.shard_id for s in shards] == ["00000", "00001", "00002"]
    assert [s.num_rows for s in shards] == [10, 10, 5]
    assert [s.digest for s in shards] == [s.digest for s in list_shards(cfg)]
    assert len({s.digest for s in shards}) == 3
    table = read_shard(Shard.from_json(shards[1].to_json()))  # survives the trip through Ray items
    assert table.column("image_id").to_pylist()[0] == "mnist-test-000010"
    images, labels = load_mnist("test")
    assert table.column("label").to_pylist() == labels[10:20].tolist()
    decoded = np.asarray(Image.open(io.BytesIO(table.column("image_bytes")[3].as_py())))
    np.testing.assert_array_equal(decoded, images[13])
    # the config's limit and the URI's limit: the smaller wins
    assert sum(s.num_rows for s in list_shards(SourceConfig(uri="mnist://valid?limit=25", limit=7))) == 7
    with pytest.raises(ValueError, match="unknown MNIST split 'dev'"):
        list_shards(SourceConfig(uri="mnist://dev"))


def test_folder_listing_labels_and_unreadable_files(tmp_path):
    make_folder(
        tmp_path,
        {
            "cat/b.png": png(10),
            "cat/a.jpg": png(20),
            "dog/sub/c.webp": png(30),
            "loose.png": png(40),
            "notes.txt": b"not an image",
            ".hidden/x.png": png(50),
            "dog/empty.png": b"",
        },
    )
    shards = list_shards(SourceConfig(uri=str(tmp_path), shard_size=2))
    ids = [i[0] for s in shards for i in s.items]
    assert ids == ["cat/a.jpg", "cat/b.png", "dog/empty.png", "dog/sub/c.webp", "loose.png"]
    assert shards[0].classes == ("cat", "dog")
    table = pa.concat_tables([read_shard(s) for s in shards])
    assert table.column("label").to_pylist() == [0, 0, 1, 1, None]
    assert table.column("image_bytes")[2].as_py() == b""  # zero-byte: decode records the reason
    assert table.column("error").null_count == 5
    # a file that vanished after listing: an error row, not an exception
    os.remove(tmp_path / "cat" / "b.png")
    table = read_shard(shards[0])
    assert table.column("error").to_pylist()[0] is None
    assert table.column("error").to_pylist()[1].startswith("unreadable: ")
    # a changed input changes the digest of its shard only
    (tmp_path / "cat" / "b.png").write_bytes(png(10))
    (tmp_path / "loose.png").write_bytes(png(41) + b"appended bytes")
    again = list_shards(SourceConfig(uri=str(tmp_path), shard_size=2))
    assert [a.digest == b.digest for a, b in zip(shards, again, strict=True)] == [True, True, False]


def test_parquet_binary_and_struct_columns(tmp_path):
    blobs = [png(v) for v in range(7)]
    pq.write_table(
        pa.table({"image": blobs[:4], "label": [0, 1, 2, 3]}), tmp_path / "a.parquet", row_group_size=3
    )
    struct = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs[4:])])
    pq.write_table(
        pa.table({"image": struct, "label": [4, 5, 6], "key": ["x", "y", "z"]}), tmp_path / "b.parquet"
    )
    shards = list_shards(SourceConfig(uri=str(tmp_path), shard_size=3))
    assert [s.num_rows for s in shards] == [3, 3, 1]
    table = pa.concat_tables([read_shard(s) for s in shards])
    assert table.column("image_id").to_pylist() == ["a-0", "a-1", "a-2", "a-3", "b-0", "b-1", "b-2"]
    assert table.column("label").to_pylist() == list(range(7))
    assert table.column("image_bytes").to_pylist() == blobs
    # a single file, ids from a column
    one = list_shards(SourceConfig(uri=str(tmp_path / "b.parquet"), id_column="key"))
    assert read_shard(one[0]).column("image_id").to_pylist() == ["x", "y", "z"]
    with pytest.raises(ValueError, match="no image column 'img'"):
        list_shards(SourceConfig(uri=str(tmp_path), image_column="img"))


def test_parquet_captions_when_asked(tmp_path):
    blobs = [png(v) for v in range(3)]
    pq.write_table(pa.table({"image": blobs, "text": ["one", None, "three"]}), tmp_path / "a.parquet")
    assert "caption" not in read_shard(list_shards(SourceConfig(uri=str(tmp_path)))[0]).column_names
    table = read_shard(list_shards(SourceConfig(uri=str(tmp_path), caption_column="text"))[0])
    assert table.column("caption").to_pylist() == ["one", None, "three"]
    assert table.column("error").null_count == 3  # a null caption is not an error
    with pytest.raises(ValueError, match="no caption column 'caption'; columns: image, text"):
        list_shards(SourceConfig(uri=str(tmp_path), caption_column="caption"))
    with pytest.raises(ValueError, match="caption column 'image' is binary; expected strings"):
        list_shards(SourceConfig(uri=str(tmp_path), caption_column="image"))
    # sources without captions say so rather than give null captions
    make_folder(tmp_path / "f", {"a.png": png(1)})
    with pytest.raises(ValueError, match="folder sources have no captions"):
        list_shards(SourceConfig(uri=str(tmp_path / "f"), caption_column="caption"))
    with pytest.raises(ValueError, match="mnist sources have no captions"):
        list_shards(SourceConfig(uri="mnist://test?limit=2", caption_column="caption"))


def test_s3_folder_source(s3_prefix):
    from pipeline.runtime.storage import resolve

    root = resolve(s3_prefix)
    root.join("b", "2.png").write_bytes(png(2))
    root.join("a", "1.png").write_bytes(png(1))
    shards = list_shards(SourceConfig(uri=s3_prefix))
    table = read_shard(shards[0])
    assert table.column("image_id").to_pylist() == ["a/1.png", "b/2.png"]
    assert table.column("label").to_pylist() == [0, 1]
    assert table.column("path").to_pylist()[0] == f"{s3_prefix}/a/1.png"


def test_class_words_of_folders_by_label_words():
    from pipeline.inputs.sources import class_words

    assert class_words("mnist", ()) == class_words("folder", tuple("0123456789"), "mnist")
    assert class_words("mnist", ())[7] == ["seven", "7"]
    assert class_words("folder", ("3", "7")) == [["3"], ["7"]]  # names: the folder name alone
    assert class_words("folder", ("3", "Seven"), "mnist") == [["three", "3"], ["seven", "7"]]
    assert class_words("folder", ()) is None and class_words("parquet", (), "mnist") is None
    with pytest.raises(ValueError, match=r"label_words=mnist: class folders \['cat'\]"):
        class_words("folder", ("7", "cat"), "mnist")
    with pytest.raises(ValueError, match="label_words: 'digits' is not one of names, mnist"):
        SourceConfig(uri="x", label_words="digits")
