"""Source kinds as a registry: each kind lists, packs, cuts and reads through one entry; shard ids,
digests and Shard JSON of existing inputs are what they were before the registry (resume of existing
outputs depends on them)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.inputs.sources import SourceConfig, list_shards, read_shard


def golden_inputs(root: Path) -> dict[str, SourceConfig]:
    """A folder, a Parquet folder and a WebDataset folder of fixed bytes (no encoder involved, so
    sizes and byte offsets are the same on every machine)."""
    folder = root / "folder"
    for i, rel in enumerate(["b/2.png", "a/1.jpg", "a/sub/3.webp", "loose.gif", "clip.npy", "notes.txt"]):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(bytes([i]) * (10 + 7 * i))
    parquet = root / "parquet"
    parquet.mkdir()
    for name, n in (("x.parquet", 5), ("y/z.parquet", 4)):
        (parquet / name).parent.mkdir(parents=True, exist_ok=True)
        blobs = [bytes([k]) * (k + 1) for k in range(n)]
        pq.write_table(pa.table({"img": blobs, "label": list(range(n))}), parquet / name, row_group_size=2)
    wds = root / "wds"
    wds.mkdir()
    for t, n in ((0, 4), (1, 3)):
        with tarfile.open(wds / f"{t:05d}.tar", "w") as tar:
            for k in range(n):
                for ext, size in (("jpg", 100 + 37 * k), ("json", 20), ("cls", 1)):
                    info = tarfile.TarInfo(f"{t}{k:04d}.{ext}")
                    info.size = size
                    tar.addfile(info, io.BytesIO(b"7" * size))
    data = (wds / "00001.tar").read_bytes()
    (wds / "00001.tar").write_bytes(data[: 3072 + 1800])  # cut inside its second sample
    return {
        "folder": SourceConfig(uri=str(folder), shard_size=2),
        "parquet": SourceConfig(uri=str(parquet), image_column="img", shard_size=3),
        "webdataset": SourceConfig(uri=str(wds), shard_size=3),
    }


def fingerprint(cfg: SourceConfig, root: Path) -> list[tuple[str, str, int, str]]:
    """(shard id, digest, rows, sha256 of the Shard JSON with ``root`` as ``ROOT``) of every shard."""
    return [
        (s.shard_id, s.digest, s.num_rows, sha(s.to_json().replace(str(root), "ROOT")))
        for s in list_shards(cfg)
    ]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rows_fingerprint(cfg: SourceConfig, root: Path) -> str:
    """sha256 of every row ``read_shard`` gives, shard by shard (bytes by their own sha256)."""
    rows = []
    for shard in list_shards(cfg):
        for r in read_shard(shard).to_pylist():
            r["image_bytes"] = hashlib.sha256(r["image_bytes"]).hexdigest()
            rows.append({k: v.replace(str(root), "ROOT") if isinstance(v, str) else v for k, v in r.items()})
    return sha(json.dumps(rows, sort_keys=True))


# computed with the sources code before the registry (main at e99c0cf): resume of outputs written then
# depends on these shard ids, digests and Shard JSON
BEFORE = {
    "folder": (
        [
            ("00000", "a9c9b2a072a41d2d", 2, "a4d96f88e1ee1015"),
            ("00001", "febf81f2fb0fed22", 2, "a133661cf137417a"),
            ("00002", "9b1aa310c35b6930", 1, "9a539664d35ccb84"),
        ],
        "75824ae3ff6d0b04",
    ),
    "parquet": (
        [
            ("00000", "34904f9c9f10c92e", 3, "4521157564d37b1a"),
            ("00001", "b903cdc20ad1d021", 3, "0a64ca461c79b091"),
            ("00002", "c78f15988400e3c7", 3, "6aa6ba599eaa0034"),
        ],
        "2fed3964cfe31b4b",
    ),
    "webdataset": (
        [
            ("00000", "90f5f6715bc9034b", 3, "31ae60b289916fc7"),
            ("00001", "7c6d868d38eb40df", 3, "b2f9be31ef04af21"),
        ],
        "2a738777768a854d",
    ),
    "mnist://test?limit=25": (
        [
            ("00000", "09b7452686b891e8", 10, "484f7853aa13377a"),
            ("00001", "7c1285f37ba9fa45", 10, "098c3aaac3722cb9"),
            ("00002", "6a266a04ab72e150", 5, "f8db78383ec61d05"),
        ],
        "43f1caa9d98dd753",
    ),
    "moving-mnist://valid?limit=7&frames=4": (
        [("00000", "d2c8451b4861c98e", 7, "6457ab88efb7b7cd")],
        "7b81baa4e5fdfcc9",
    ),
}


def test_shard_ids_digests_json_and_rows_are_unchanged(tmp_path):
    cfgs = golden_inputs(tmp_path)
    cfgs.update({uri: SourceConfig(uri=uri, shard_size=10) for uri in BEFORE if "://" in uri})
    for name, cfg in cfgs.items():
        shards, rows = BEFORE[name]
        assert [tuple(s) for s in fingerprint(cfg, tmp_path)] == shards, name
        assert rows_fingerprint(cfg, tmp_path) == rows, name


def test_a_new_kind_is_one_registry_entry(monkeypatch):
    """A made-up ``count://N`` source: listing, shards, digests, pieces and reads all go through its entry."""
    from pipeline.inputs import sources
    from pipeline.runtime.stages import shard_pieces

    def list_items(cfg, files):
        return [("n", i) for i in range(int(cfg.uri.split("://")[1]))], []

    def read(shard):
        rows = sources._empty_rows()
        for _, start, stop in shard.items:
            for i in range(start, stop):
                sources._add(rows, f"count-{i}", shard.config.uri, i % 2, bytes([i]), f"count://{i}")
        return rows

    kind = sources.SourceKind(
        "count", list_items, sources._pack_ranges, sources._cut_ranges, read, scheme="count"
    )
    monkeypatch.setitem(sources.SOURCE_KINDS, "count", kind)
    shards = list_shards(SourceConfig(uri="count://7", shard_size=5))
    assert [(s.kind, s.items, s.num_rows) for s in shards] == [
        ("count", (("n", 0, 5),), 5),
        ("count", (("n", 5, 7),), 2),
    ]
    pieces = shard_pieces(shards, task_rows=2)
    assert [p.items for p in pieces] == [(("n", 0, 2),), (("n", 2, 4),), (("n", 4, 5),), (("n", 5, 7),)]
    ids = [i for p in pieces for i in read_shard(p).column("image_id").to_pylist()]
    assert ids == [f"count-{i}" for i in range(7)]
    assert sources.class_words("count", ()) is None
    monkeypatch.delitem(sources.SOURCE_KINDS, "count")
    with pytest.raises(
        ValueError, match="unknown source kind 'count'; known: mnist, mnist-shifted, moving-mnist, webdataset"
    ):
        read_shard(shards[0])
