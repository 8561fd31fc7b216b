"""The listing of sources holds no Python object per input row on the driver: Parquet lists row counts
per file, WebDataset a compact ``TarListing`` (each sample's byte offset and key in numpy arrays and one
joined string), built tar by tar; shards and their pieces are views of it. Cutting it anywhere gives
the ranges the per-sample listing gave."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.inputs.sources import FileRows, SourceConfig, list_shards
from pipeline.runtime.stages import shard_pieces

TARS, PER_TAR = 40, 500  # 20,000 samples; keys of 9 characters, as img2dataset writes them


def write_tars(root: Path, tars: int, per_tar: int, cut: int = 0) -> Path:
    """``tars`` tars of ``per_tar`` one-member samples (``<key>.jpg`` of one byte); the last tar cut to
    ``cut`` bytes when given (an unreadable rest)."""
    root.mkdir(parents=True)
    for t in range(tars):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tar:
            for k in range(per_tar):
                info = tarfile.TarInfo(f"{t * per_tar + k:09d}.jpg")
                info.size = 1
                tar.addfile(info, io.BytesIO(b"7"))
    if cut:
        last = root / f"{tars - 1:05d}.tar"
        last.write_bytes(last.read_bytes()[:cut])
    return root


def traced(fn):
    """``fn()``, and the bytes it left allocated and its peak (tracemalloc: numpy arrays included)."""
    tracemalloc.start()
    try:
        out = fn()
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, retained, peak


def test_webdataset_listing_holds_about_25_bytes_per_sample(tmp_path):
    """Measured on 20,000 samples in 40 tars: the per-sample listing (a tuple per sample, kept per shard
    in ``Shard.listed``) retained 199 bytes per sample at a peak of 247 (1,023 with 4 tars of 5,000:
    ``tarfile`` kept every member header of a tar until it closed), and its pieces of 256 rows 9.6 more;
    the compact listing retains 27 (an offset, a key start and the key's 9 bytes) at a peak of 60, its
    pieces 2.9 more."""
    root = write_tars(tmp_path / "wds", TARS, PER_TAR)
    n = TARS * PER_TAR
    shards, retained, peak = traced(lambda: list_shards(SourceConfig(uri=str(root), shard_size=1000)))
    assert sum(s.num_rows for s in shards) == n and len(shards) == 20
    assert retained / n < 40, f"the listing holds {retained / n:.1f} bytes per sample"
    assert peak / n < 150, f"listing peaked at {peak / n:.1f} bytes per sample"
    pieces, more, _ = traced(lambda: shard_pieces(shards, task_rows=256))
    assert len(pieces) == 20 * 4 and all(p.listed for p in pieces)
    assert more / n < 6, f"the pieces add {more / n:.1f} bytes per sample"
    # the shards share one listing: each holds the samples of its rows only
    assert [len(s.listed) for s in shards] == [1000] * 20
    assert list(shards[3].listed)[0] == ("00006.tar", 0, 0, "000003000", "")


def test_parquet_listing_holds_no_object_per_row(tmp_path):
    """Measured on 20,000 rows in 4 files: a tuple per row retained 6.2 bytes per row (packed into
    ranges per shard) at a peak of 96.5; row counts per file retain 0.5 at a peak of 0.6."""
    (tmp_path / "pq").mkdir()
    for f in range(4):
        pq.write_table(pa.table({"image": [b"x"] * 5000}), tmp_path / "pq" / f"{f}.parquet")
    cfg = SourceConfig(uri=str(tmp_path / "pq"), shard_size=1000)
    shards, retained, peak = traced(lambda: list_shards(cfg))
    assert [s.items for s in shards[4:6]] == [(("0.parquet", 4000, 5000),), (("1.parquet", 0, 1000),)]
    assert retained / 20000 < 2 and peak / 20000 < 10, (retained / 20000, peak / 20000)


def pack_samples(samples: list[tuple]) -> tuple:
    """The per-sample packing the compact listing replaces: ``(relpath, index, offset, key, reason)``
    samples -> ``(relpath, start, stop, offset, key, broken key, reason)`` ranges."""
    ranges = []
    for relpath, index, offset, key, reason in samples:
        broken = (key, reason) if reason else ("", "")
        if ranges and ranges[-1][0] == relpath and ranges[-1][2] == index:
            ranges[-1][2], ranges[-1][5:] = index + 1, broken
        else:
            ranges.append([relpath, index, index + 1, offset, key, *broken])
    return tuple(tuple(r) for r in ranges)


def test_cutting_the_compact_listing_anywhere_gives_the_per_sample_ranges(tmp_path):
    root = write_tars(tmp_path / "wds", tars=3, per_tar=4, cut=512 * 5 + 100)  # the last: 2 whole + rest
    (shard,) = list_shards(SourceConfig(uri=str(root), shard_size=100))
    samples = list(shard.listed)
    assert len(samples) == shard.num_rows == 4 + 4 + 3
    assert samples[-1][2:4] == (-1, "000000010") and samples[-1][4].startswith("corrupt tar after 2")
    assert [s[2] for s in samples[:5]] == [0, 1024, 2048, 3072, 0]  # a header and a data block each
    assert shard.items == pack_samples(samples)
    for a in range(len(samples)):
        for b in range(a + 1, len(samples) + 1):
            assert shard.listed[a:b].ranges() == pack_samples(samples[a:b]), (a, b)
            assert list(shard.listed[a:b]) == samples[a:b]


def test_file_rows_skip_empty_files_and_slice_as_views():
    rows = FileRows.of(["a", "b", "c", "d"], [2, 0, 3, 0])
    assert len(rows) == 5
    assert rows.ranges() == (("a", 0, 2), ("c", 0, 3))
    assert rows[1:4].ranges() == (("a", 1, 2), ("c", 0, 2))
    assert rows[1:4][1:].ranges() == (("c", 0, 2),)
    assert rows[:0].ranges() == () and not rows[3:3]
    assert rows[1:4].starts is rows.starts
