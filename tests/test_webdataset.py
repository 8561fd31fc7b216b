"""WebDataset tar shards as img2dataset writes them: listing, labels from sidecars, ranged reads of a
shard that starts inside a tar, shards cut into pieces read from their samples' offsets, corrupt members
and tails as error rows, the same rows from S3, and a tokenize job over them (rows in = rows out +
errors), whole shards or pieces."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_tokenize_job import NO_MLFLOW, make_tokenizer, upload

from pipeline.inputs import sources, webdataset
from pipeline.inputs.sources import Shard, SourceConfig, list_shards, read_shard
from pipeline.outputs.corpus import read_corpus
from pipeline.outputs.shards import read_errors
from pipeline.runtime import stages
from pipeline.steps.tokenize import TokenizeJobConfig, run_tokenize_job


def jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.full((20, 20, 3), value, np.uint8)
    pixels[::3] = 255 - value  # some structure, so tokens differ between images
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def sample(
    key: str, value: int, *, cls: int | None = None, label: int | None = None
) -> list[tuple[str, bytes]]:
    meta = {
        "key": key,
        "caption": f"a grey square {value}",
        **({"label": label} if label is not None else {}),
    }
    members = [
        (f"{key}.jpg", jpeg(value)),
        (f"{key}.json", json.dumps(meta).encode()),
        (f"{key}.txt", b"cap"),
    ]
    return members + ([(f"{key}.cls", str(cls).encode())] if cls is not None else [])


@pytest.fixture
def img2dataset_folder(tmp_path) -> Path:
    """Two tars of five samples; tar 1: sidecar labels of every kind and a sample without an image;
    tar 2 is cut inside its fourth sample (a truncated download); img2dataset's metadata files beside them."""
    root = tmp_path / "wds"
    first = []
    first += sample("000000000", 10, cls=3)
    first += sample("000000001", 40, label=7)  # no .cls: the JSON's label
    first += sample("000000002", 70)  # no label sidecar: unlabelled, not an error
    first += [("000000003.json", b'{"key": "000000003", "status": "failed_to_download"}')]  # no image
    first += sample("000000004", 100, cls=1)
    write_tar(root / "00000.tar", first)
    second = [m for k in range(5, 10) for m in sample(f"00000000{k}", 20 * k, cls=k)]
    write_tar(root / "00001.tar", second)
    data = (root / "00001.tar").read_bytes()
    (root / "00001.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside the third sample
    pq.write_table(pa.table({"key": ["000000000"], "status": ["success"]}), root / "00000.parquet")
    (root / "00000_stats.json").write_text('{"successes": 4}')
    return root


def test_listing_reads_samples_labels_and_errors(img2dataset_folder):
    shards = list_shards(SourceConfig(uri=str(img2dataset_folder), shard_size=3))
    assert {s.kind for s in shards} == {"webdataset"}
    assert sum(s.num_rows for s in shards) == 5 + 4  # tar 2: three whole samples, then the one it broke in
    assert [s.digest for s in shards] == [
        s.digest for s in list_shards(SourceConfig(uri=str(img2dataset_folder), shard_size=3))
    ]
    table = pa.concat_tables([read_shard(Shard.from_json(s.to_json())) for s in shards])
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert list(rows) == [
        "00000/000000000",
        "00000/000000001",
        "00000/000000002",
        "00000/000000003",
        "00000/000000004",
        "00001/000000005",
        "00001/000000006",
        "00001/000000007",
        "00001/000000008",
    ]
    assert [rows[f"00000/00000000{k}"]["label"] for k in range(5)] == [3, 7, None, None, 1]
    assert rows["00000/000000000"]["image_bytes"] == jpeg(10)
    assert rows["00001/000000006"]["image_bytes"] == jpeg(120) and rows["00001/000000006"]["label"] == 6
    assert rows["00000/000000003"]["error"] == "no image member for 000000003 (has: json)"
    broken = rows["00001/000000008"]["error"]
    assert broken.startswith("corrupt tar after 3 whole samples: the tar is cut short")
    errors = [i for i, r in rows.items() if r["error"]]
    assert errors == ["00000/000000003", "00001/000000008"]
    assert rows["00000/000000004"]["path"].endswith("00000.tar#000000004.jpg")


def test_a_shard_that_starts_inside_a_tar_reads_from_its_offset(img2dataset_folder):
    shards = list_shards(SourceConfig(uri=str(img2dataset_folder / "00000.tar"), shard_size=2))
    assert [s.num_rows for s in shards] == [2, 2, 1]
    assert shards[1].items[0][3] > 0  # the byte offset of sample 2's first header
    ids = read_shard(shards[1]).column("image_id").to_pylist()
    assert ids == ["00000/000000002", "00000/000000003"]
    # a tar rewritten after listing (same sizes, other keys) fails loudly rather than mislabelling rows
    path = img2dataset_folder / "00000.tar"
    with tarfile.open(path) as tar:
        members = [(m.name.replace("000000", "999999"), tar.extractfile(m).read()) for m in tar]
    write_tar(path, members)
    with pytest.raises(ValueError, match="changed since it was listed"):
        read_shard(shards[1])
    path.write_bytes(path.read_bytes()[:3000])  # and one cut short after listing
    with pytest.raises(ValueError, match="read 0 of 2 samples"):
        read_shard(shards[1])


def test_a_shard_is_cut_into_pieces_read_from_their_samples_offsets(img2dataset_folder):
    (shard,) = list_shards(SourceConfig(uri=str(img2dataset_folder), shard_size=9))
    pieces = stages.shard_pieces([shard], task_rows=2)
    assert [p.num_rows for p in pieces] == [2, 2, 2, 2, 1]
    assert {(p.shard_id, p.digest) for p in pieces} == {(shard.shard_id, shard.digest)}
    offsets = [sample[2] for sample in shard.listed]  # (relpath, index, offset, key, reason) per sample
    # each piece reads from its first sample's header: inside tar 1, then tar 2 from its start / inside
    assert [p.items[0][3] for p in pieces] == [0, offsets[2], offsets[4], offsets[6], -1]
    assert 0 < offsets[2] < offsets[4] and offsets[5] == 0 < offsets[6]
    assert pieces[2].items == (
        ("00000.tar", 4, 5, offsets[4], "000000004", "", ""),
        ("00001.tar", 0, 1, 0, "000000005", "", ""),
    )
    # pieces travel to the read tasks as JSON: the same rows and error rows as the whole shard
    read = [read_shard(Shard.from_json(p.to_json())) for p in pieces]
    assert pa.concat_tables(read).equals(read_shard(shard))
    assert read[-1].column("image_id").to_pylist() == ["00001/000000008"]  # the tar's broken rest alone
    assert read[-1].column("error")[0].as_py().startswith("corrupt tar after 3 whole samples")
    assert sum(t.column("error").null_count for t in read) == 9 - 2
    # a shard rebuilt from its JSON has no sample offsets to cut at: it stays one task
    again = Shard.from_json(shard.to_json())
    assert stages.shard_pieces([again], task_rows=2) == [again]
    with pytest.raises(ValueError, match="cannot cut a 'webdataset' shard"):
        stages.shard_piece(again, 0, 2)


def test_captions_from_txt_or_json_when_asked_a_missing_sidecar_is_null(tmp_path):
    root = tmp_path / "wds"
    members = [
        ("a.jpg", jpeg(1)),
        ("a.txt", b" from the txt \n"),
        ("a.json", b'{"caption": "from the json"}'),  # .txt first, as .cls before the JSON label
        ("b.jpg", jpeg(2)),
        ("b.json", b'{"caption": "from the json", "label": 4}'),
        ("c.jpg", jpeg(3)),
        ("c.json", b'{"text": "another key"}'),  # no such key: no caption, not an error
        ("d.jpg", jpeg(4)),  # no sidecar at all
        ("e.jpg", jpeg(5)),
        ("e.json", b'{"caption": 7}'),  # not a string: no caption
        ("f.txt", b"a caption without an image"),
    ]
    write_tar(root / "00000.tar", members)
    plain = read_shard(list_shards(SourceConfig(uri=str(root)))[0])
    assert "caption" not in plain.column_names  # not asked: the rows are what they were
    cfg = SourceConfig(uri=str(root), caption_column="caption", shard_size=4)
    shards = list_shards(cfg)
    table = pa.concat_tables(read_shard(p) for s in shards for p in stages.shard_pieces([s], task_rows=3))
    captions = ["from the txt", "from the json", None, None, None, "a caption without an image"]
    assert table.column("caption").to_pylist() == captions
    assert table.column("label").to_pylist() == [None, 4, None, None, None, None]
    assert table.column("error").to_pylist()[:5] == [None] * 5
    assert table.column("error")[5].as_py() == "no image member for f (has: txt)"
    assert table.drop_columns(["caption"]).equals(plain)
    # asking for captions is another input: another digest (an old output is not resumed without them)
    assert {s.digest for s in shards}.isdisjoint(
        s.digest for s in list_shards(SourceConfig(uri=str(root), shard_size=4))
    )
    assert '"caption_column": "caption"' in shards[0].to_json()
    assert Shard.from_json(shards[0].to_json()).config == cfg


def test_the_same_rows_from_s3(img2dataset_folder, s3_prefix):
    uri = upload(img2dataset_folder, f"{s3_prefix}/wds")
    local = pa.concat_tables(read_shard(s) for s in list_shards(SourceConfig(uri=str(img2dataset_folder))))
    remote = pa.concat_tables(read_shard(s) for s in list_shards(SourceConfig(uri=uri)))
    assert remote.column("image_id") == local.column("image_id")
    assert remote.column("image_bytes") == local.column("image_bytes")
    assert remote.column("label") == local.column("label")


def test_tokenize_a_webdataset_folder(ray_cluster, img2dataset_folder, tmp_path):
    out = tmp_path / "corpus"
    cfg = TokenizeJobConfig(
        source=SourceConfig(uri=str(img2dataset_folder), shard_size=3),
        tokenizer=str(make_tokenizer(tmp_path / "tok")),
        output=str(out),
        layers=(1, 2),
        max_error_fraction=0.25,  # 2 of 9 samples are bad on purpose
        mlflow=NO_MLFLOW,
        progress=False,
    )
    m = run_tokenize_job(cfg).manifest
    assert (m["rows_in"], m["rows_written"], m["errors"]) == (9, 7, 2)
    corpus = read_corpus(str(out))
    assert sorted(corpus.column("image_id").to_pylist()) == [
        "00000/000000000",
        "00000/000000001",
        "00000/000000002",
        "00000/000000004",
        "00001/000000005",
        "00001/000000006",
        "00001/000000007",
    ]
    labels = dict(zip(corpus.column("image_id").to_pylist(), corpus.column("label").to_pylist(), strict=True))
    assert labels["00000/000000001"] == 7 and labels["00001/000000007"] == 7
    reasons = {r["image_id"]: r["reason"] for r in read_errors(str(out)).to_pylist()}
    assert set(reasons) == {"00000/000000003", "00001/000000008"}


def test_tokenize_in_pieces_writes_the_corpus_of_whole_shards(
    ray_cluster, img2dataset_folder, tmp_path, monkeypatch
):
    """The Ray job cuts the shards into pieces of 2 samples; the in-process run reads whole shards:
    the same corpus, byte for byte."""
    cut, shard_pieces = [], stages.shard_pieces

    def spy(shards, task_rows):
        cut.extend(pieces := shard_pieces(shards, task_rows))
        return pieces

    monkeypatch.setattr("pipeline.steps.tokenize.TASK_ROWS", 2)
    monkeypatch.setattr("pipeline.runtime.stages.shard_pieces", spy)
    tok = str(make_tokenizer(tmp_path / "tok"))
    outputs = {}
    for in_process in (False, True):
        out = tmp_path / f"corpus-{in_process}"
        cfg = TokenizeJobConfig(
            source=SourceConfig(uri=str(img2dataset_folder), shard_size=5),
            tokenizer=tok,
            output=str(out),
            layers=(1, 2),
            batch_size=2,
            max_error_fraction=0.25,
            mlflow=NO_MLFLOW,
            progress=False,
            in_process=in_process,
        )
        m = run_tokenize_job(cfg).manifest
        assert (m["rows_in"], m["rows_written"], m["errors"]) == (9, 7, 2)
        outputs[in_process] = out
    assert [(p.shard_id, p.num_rows) for p in cut] == [("00000", 2)] * 2 + [("00000", 1)] + [("00001", 2)] * 2
    for name in ("part-00000.parquet", "part-00001.parquet", ".spae/errors.pq"):
        assert (outputs[False] / name).read_bytes() == (outputs[True] / name).read_bytes(), name


@pytest.fixture
def captioned_folder(tmp_path) -> Path:
    """Tar 1: three samples with a ``.txt`` caption but the second; tar 2: two samples, no captions."""
    root = tmp_path / "captioned"
    first = [("a.jpg", jpeg(10)), ("a.txt", b"a grey square"), ("b.jpg", jpeg(40))]
    first += [("c.jpg", jpeg(70)), ("c.txt", "un carré gris".encode())]
    write_tar(root / "00000.tar", first)
    write_tar(root / "00001.tar", [("d.jpg", jpeg(100)), ("e.jpg", jpeg(130))])
    return root


def test_captions_reach_the_corpus_in_process_and_through_ray(ray_cluster, captioned_folder, tmp_path):
    tok = str(make_tokenizer(tmp_path / "tok"))
    want = {
        "00000/a": "a grey square",
        "00000/b": None,
        "00000/c": "un carré gris",
        "00001/d": None,
        "00001/e": None,
    }
    outputs = {}
    for in_process in (True, False):
        out = tmp_path / f"corpus-{in_process}"
        cfg = TokenizeJobConfig(
            source=SourceConfig(uri=str(captioned_folder), shard_size=3, caption_column="caption"),
            tokenizer=tok,
            output=str(out),
            layers=(1, 2),
            batch_size=2,
            mlflow=NO_MLFLOW,
            progress=False,
            in_process=in_process,
        )
        assert run_tokenize_job(cfg).manifest["rows_written"] == 5
        corpus = read_corpus(str(out))
        assert corpus.schema.names[:5] == ["image_id", "source", "label", "caption", "tokens_l1"]
        assert corpus.schema.field("caption").type == pa.string()
        got = dict(
            zip(corpus.column("image_id").to_pylist(), corpus.column("caption").to_pylist(), strict=True)
        )
        assert got == want
        lines = [
            json.loads(line)
            for part in sorted((out / ".spae" / "jsonl").glob("*.jsonl"))
            for line in part.read_text().splitlines()
        ]
        assert [list(r) for r in lines] == [["image_id", "label", "caption", "text"]] * 5
        assert {r["image_id"]: r["caption"] for r in lines} == want
        outputs[in_process] = out
    for name in ("part-00000.parquet", "part-00001.parquet"):
        assert (outputs[False] / name).read_bytes() == (outputs[True] / name).read_bytes(), name


def test_a_corpus_without_captions_has_no_caption_column(captioned_folder, tmp_path):
    out = tmp_path / "corpus"
    cfg = TokenizeJobConfig(
        source=SourceConfig(uri=str(captioned_folder), shard_size=3),
        tokenizer=str(make_tokenizer(tmp_path / "tok")),
        output=str(out),
        layers=(1, 2),
        mlflow=NO_MLFLOW,
        progress=False,
        in_process=True,
    )
    run_tokenize_job(cfg)
    assert "caption" not in read_corpus(str(out)).column_names
    line = json.loads((out / ".spae" / "jsonl" / "part-00000.jsonl").read_text().splitlines()[0])
    assert list(line) == ["image_id", "label", "text"]


def tarfile_samples(path: Path) -> list[tuple[str, int]]:
    """(key, first header's offset) of each sample, as ``tarfile`` reads the tar: the reference."""
    out: list[tuple[str, int]] = []
    with tarfile.open(path) as tar:
        for m in tar:
            key = m.name.rpartition("/")[0] + "/" + m.name.rpartition("/")[2].partition(".")[0]
            key = key.lstrip("/")
            if m.isfile() and (not out or out[-1][0] != key):
                out.append((key, m.offset))
    return out


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_the_header_walk_lists_what_tarfile_reads(tmp_path, fmt):
    """Pax headers (webdataset's writer sets a float mtime: one per member), GNU and ustar long names,
    non-ASCII names and directories: the same samples and offsets as ``tarfile``."""
    path = tmp_path / "mixed.tar"
    long_dir = "d" * 60 + "/" + "e" * 60  # > 100 bytes with its file name: a long name in every format
    names = ["000000000.jpg", "000000000.cls", f"{long_dir}/000000001.jpg", "données/000000002.jpg"]
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("adir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # a directory member: no sample
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 700 + i, 1_700_000_000.5  # pax: a float mtime needs a pax header
            tar.addfile(info, io.BytesIO(bytes(700 + i)))
    scan = webdataset.scan_tar(open(path, "rb"), path.stat().st_size)  # noqa: SIM115 - read to the end
    assert [(s.key, s.offset) for s in scan] == tarfile_samples(path)
    assert [s.key for s in scan] == ["000000000", f"{long_dir}/000000001", "données/000000002"]
    assert not any(s.reason for s in scan)


def test_a_corrupt_header_inside_a_tar_is_an_error_row_not_a_silent_end(tmp_path):
    """tarfile stops quietly at a bad header after the first and drops the rest; the listing makes the
    rest one error row, so rows in = rows out + errors still counts it."""
    path = tmp_path / "00000.tar"
    write_tar(path, [m for k in range(4) for m in sample(f"00000000{k}", 30 * k, cls=k)])
    samples = tarfile_samples(path)
    data = bytearray(path.read_bytes())
    data[samples[2][1] + 130] ^= 0x7F  # sample 2's first header: its size field no longer sums right
    path.write_bytes(bytes(data))
    scan = webdataset.scan_tar(open(path, "rb"), len(data))  # noqa: SIM115
    # sample 1 may have members after the bad header: it is the error row, holding the rest of the tar
    assert [(s.key, s.offset) for s in scan] == [samples[0], ("000000001", -1)]
    assert f"invalid header at byte {samples[2][1]} (bad checksum)" in scan[-1].reason
    assert scan[-1].reason.startswith("corrupt tar after 1 whole samples")


def test_many_tars_are_listed_in_processes_the_same(img2dataset_folder, monkeypatch):
    config = SourceConfig(uri=str(img2dataset_folder), shard_size=3)
    threads = [s.to_json() for s in list_shards(config)]
    monkeypatch.setattr(sources, "LIST_PROCESSES_FROM", 2)  # two tars: spawned processes list them
    assert [s.to_json() for s in list_shards(config)] == threads


def tarfile_scan(data: bytes) -> list[tuple[str, int, str]]:
    """The listing as ``tarfile`` streams it (the listing before the header walk): the reference."""
    samples, last, problem = [], None, ""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for info in tar:
                key = webdataset.sample_key(info.name)[0]
                if info.isfile() and key != last:
                    samples.append([key, info.offset, ""])
                    last = key
            if tar.offset + 1024 > len(data):
                problem = f"the tar is cut short ({len(data)} bytes; its members run to byte {tar.offset})"
    except (tarfile.TarError, EOFError, OSError) as e:
        problem = str(e)
    if problem:
        broken = samples.pop()[0] if samples else webdataset.CORRUPT_TAIL
        samples.append([broken, -1, f"corrupt tar after {len(samples)} whole samples: {problem}"])
    return [tuple(s) for s in samples]


def test_a_tar_cut_anywhere_lists_as_tarfile_listed_it(tmp_path):
    """Shard digests hold each tar's listing, reasons included: a truncated download listed by the header
    walk gives the same samples, offsets and reasons as before it (resume of older outputs)."""
    path = tmp_path / "00000.tar"
    write_tar(path, [m for k in range(3) for m in sample(f"00000000{k}", 50 * k, cls=k)])
    whole = path.read_bytes()
    for cut in [*range(0, len(whole), 97), len(whole) - 1, len(whole)]:
        data = whole[:cut]
        for stream in (io.BytesIO(data), pa.input_stream(pa.py_buffer(data))):  # seekable, or not
            got = [(s.key, s.offset, s.reason) for s in webdataset.scan_tar(stream, len(data))]
            assert got == tarfile_scan(data), cut
