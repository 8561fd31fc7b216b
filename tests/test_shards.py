"""Exactly-once shard output, driven in-process (the Ray path is covered by tests/test_pools_job.py)."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from pipeline.inputs.images import DecodeOptions
from pipeline.inputs.sources import SourceConfig, list_shards
from pipeline.outputs.shards import ShardError, ShardWriter, pending, read_errors, read_manifest, read_output
from pipeline.runtime.stages import carry, ok_rows, read_and_decode
from pipeline.runtime.storage import resolve

SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.int64()), ("mean", pa.float32())])
IDENTITY = {"stage": "mean", "version": 1}


class Interrupted(RuntimeError):
    pass


def mean_stage(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Ray-free stage: the mean pixel value of each ok row."""
    ok = ok_rows(batch)
    mean = np.zeros(len(ok), np.float32)
    mean[ok] = batch["pixels"][ok].reshape(ok.sum(), -1).mean(axis=1)
    return {**carry(batch), "mean": mean}


def run(
    output: str,
    cfg: SourceConfig,
    fail_after: int | None = None,
    batch: int = 7,
    threads: int = 0,
    sidecars=None,
) -> ShardWriter:
    """Every pending shard: read -> decode -> stage -> writer, in rows of ``batch``, shards interleaved."""
    shards = list_shards(cfg)
    writer = ShardWriter(
        output, shards, SCHEMA, identity=IDENTITY, config={"uri": cfg.uri}, threads=threads, sidecars=sidecars
    )
    todo = writer.pending()
    decoded = [
        mean_stage(read_and_decode({"shard": np.array([s.to_json()])}, DecodeOptions(8))) for s in todo
    ]
    rows = {k: np.concatenate([d[k] for d in decoded]) for k in decoded[0]} if decoded else {}
    n = len(rows.get("shard_id", []))
    order = np.argsort(np.arange(n) + np.random.default_rng(0).uniform(0, 8, n))  # shards interleave
    for start in range(0, len(order), batch):
        take = order[start : start + batch]
        writer.add({k: v[take] for k, v in rows.items()})
        if fail_after is not None and len(writer.committed) >= fail_after:
            raise Interrupted
    writer.finish()
    return writer


def files(root) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    for i in range(23):
        path = root / f"c{i % 3}" / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.new("L", (8, 8), 10 * i).save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
    (root / "c0" / "zero.png").write_bytes(b"")
    (root / "c1" / "bad.png").write_bytes(b"garbage" * 9)
    return root


def test_kill_then_rerun_gives_every_image_once_and_a_finished_rerun_writes_nothing(folder, tmp_path):
    out = tmp_path / "out"
    cfg = SourceConfig(uri=str(folder), shard_size=5)  # 25 images -> 5 shards
    with pytest.raises(Interrupted):
        run(str(out), cfg, fail_after=2)
    done = sorted(p.name for p in out.glob("part-*.parquet"))
    assert 2 <= len(done) < 5  # only complete shards are visible
    assert not (out / ".spae" / "manifest.json").exists()
    before = files(out)
    writer = run(str(out), cfg)
    assert len(writer.committed) == 5 - len(done)  # only the missing shards were computed
    after = files(out)
    assert all(after[name] == before[name] for name in before if name.startswith("part-"))

    table = read_output(str(out))
    errors = read_errors(str(out))
    ids = table.column("image_id").to_pylist() + errors.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 25
    assert sorted(errors.column("reason").to_pylist()) == [
        "undecodable: not a recognised image format",
        "zero-byte file",
    ]
    assert set(errors.column("stage").to_pylist()) == {"decode"}
    row = table.filter(pc.equal(table.column("image_id"), "c2/05.png")).to_pylist()[0]
    assert row["label"] == 2 and row["mean"] == pytest.approx(50.0)
    manifest = read_manifest(str(out))
    assert (manifest["rows_in"], manifest["rows_written"], manifest["errors"]) == (25, 23, 2)
    assert [s["shard_id"] for s in manifest["shards"]] == ["00000", "00001", "00002", "00003", "00004"]
    assert manifest["input"]["classes"] == ["c0", "c1", "c2"]

    finished = files(out)
    writer = run(str(out), cfg)
    assert writer.committed == [] and files(out) == finished  # no new keys, no rewritten files


def test_incomplete_and_overfull_shards_are_errors_naming_the_shard(folder, tmp_path):
    shards = list_shards(SourceConfig(uri=str(folder), shard_size=5))
    writer = ShardWriter(str(tmp_path / "out"), shards, SCHEMA, identity=IDENTITY)
    rows = mean_stage(read_and_decode({"shard": np.array([shards[1].to_json()])}, DecodeOptions(8)))
    writer.add({k: v[:3] for k, v in rows.items()})
    assert not list((tmp_path / "out").glob("part-*"))  # nothing visible before the shard is complete
    with pytest.raises(ShardError, match="shard 00001 has 3 of 5 rows"):
        writer.finish()
    with pytest.raises(ShardError, match="shard 00001: received 6 rows, expected 5"):
        writer.add({k: v[:3] for k, v in rows.items()})


def test_changed_input_or_config_is_refused(folder, tmp_path):
    out = str(tmp_path / "out")
    cfg = SourceConfig(uri=str(folder), shard_size=5)
    run(out, cfg)
    shards = list_shards(cfg)
    assert pending(resolve(out), shards, IDENTITY) == []
    with pytest.raises(ShardError, match="different configuration"):
        pending(resolve(out), shards, {**IDENTITY, "version": 2})
    os.remove(folder / "c0" / "zero.png")  # item 9: shard 00001 and later shift
    with pytest.raises(ShardError, match="part-00001.parquet: written from different input items"):
        pending(resolve(out), list_shards(cfg), IDENTITY)


def test_output_on_s3(folder, s3_prefix):
    cfg = SourceConfig(uri=str(folder), shard_size=10)
    with pytest.raises(Interrupted):
        run(s3_prefix, cfg, fail_after=1)
    writer = run(s3_prefix, cfg)
    assert 1 <= len(writer.committed) <= 2
    manifest = read_manifest(s3_prefix)
    assert manifest["rows_written"] + manifest["errors"] == 25
    assert read_output(s3_prefix).num_rows == 23
    names = [loc.name for loc in resolve(s3_prefix).list()]
    assert "_tmp" not in names and ".spae" in names
    assert resolve(s3_prefix).join(".spae", "errors.pq").exists()  # the failed rows, merged


def test_a_failed_commit_leaves_no_sidecar_without_its_parquet(folder, tmp_path, monkeypatch):
    """The commit point is the Parquet part: a commit dying before it rolls back the moved sidecar and
    errors files; what a harder death leaves (no rollback) is deleted by the next run's ``pending``."""
    cfg = SourceConfig(uri=str(folder), shard_size=10)
    shards = list_shards(cfg)
    out = tmp_path / "out"

    def writer() -> ShardWriter:
        return ShardWriter(
            str(out),
            shards,
            SCHEMA,
            identity=IDENTITY,
            sidecars=lambda sid, table: {f"part-{sid}.jsonl": f"{table.num_rows}\n".encode()},
        )

    rows = [mean_stage(read_and_decode({"shard": np.array([s.to_json()])}, DecodeOptions(8))) for s in shards]
    real_move = ShardWriter._move

    def move_then_die(self, tmp, name):
        if name.endswith(".parquet") and not name.startswith("_errors"):
            raise OSError("S3 went away for good")
        real_move(self, tmp, name)

    monkeypatch.setattr(ShardWriter, "_move", move_then_die)
    with pytest.raises(OSError, match="went away"):
        writer().add(rows[0])  # shard 00000 holds a bad image: errors file, JSONL, then Parquet
    assert not list(out.glob("part-*")) and not list(out.glob(".spae/*/*"))  # rolled back

    monkeypatch.setattr(ShardWriter, "_delete", lambda self, name: None)  # a death with no rollback
    with pytest.raises(OSError):
        writer().add(rows[0])
    assert not list(out.glob("part-*")) and list(out.glob(".spae/errors/*"))
    assert [p.name for p in out.glob(".spae/jsonl/part-*")] == ["part-00000.jsonl"]
    monkeypatch.undo()
    w = writer()
    assert [s.shard_id for s in w.pending()] == ["00000", "00001", "00002"]
    assert not list(out.glob("part-*")) and not list(out.glob(".spae/*/*"))  # orphans deleted
    for r in rows:
        w.add(r)
    manifest = w.finish()
    names = [p.name for p in [*out.glob("part-*"), *out.glob(".spae/jsonl/part-*")]]
    assert sorted(names) == sorted(f"part-{s.shard_id}.{ext}" for s in shards for ext in ("jsonl", "parquet"))
    assert manifest["rows_written"] + manifest["errors"] == 25


def test_parquet_encoded_on_threads_commits_the_same_files_in_the_same_order(folder, tmp_path):
    cfg = SourceConfig(uri=str(folder), shard_size=4)
    plain = run(str(tmp_path / "plain"), cfg)
    threaded = run(str(tmp_path / "threaded"), cfg, threads=2)
    assert threaded.committed == plain.committed and len(plain.committed) > 2
    names = sorted(p.name for p in (tmp_path / "plain").glob("part-*.parquet"))
    assert names == sorted(p.name for p in (tmp_path / "threaded").glob("part-*.parquet"))
    for name in names:  # byte for byte
        assert (tmp_path / "threaded" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_a_threaded_writer_that_fails_mid_commit_still_commits_the_shards_before_it(folder, tmp_path):
    """The job's failure path flushes: shards encoded on the threads before the fault commit, in order."""
    cfg = SourceConfig(uri=str(folder), shard_size=4)
    seen: list[str] = []

    def sidecars(shard_id: str, table: pa.Table) -> dict[str, bytes]:
        seen.append(shard_id)
        if len(seen) == 3:
            raise Interrupted(f"while committing {shard_id}")
        return {}

    shards = list_shards(cfg)
    out = tmp_path / "out"
    writer = ShardWriter(str(out), shards, SCHEMA, identity=IDENTITY, sidecars=sidecars, threads=2)
    with pytest.raises(Interrupted):
        for shard in shards:
            writer.add(mean_stage(read_and_decode({"shard": np.array([shard.to_json()])}, DecodeOptions(8))))
    writer.flush()
    assert writer.committed == seen[:2]
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [
        f"part-{s}.parquet" for s in sorted(seen[:2])
    ]
    assert [s.shard_id for s in writer.pending()] == [
        s.shard_id for s in shards if s.shard_id not in seen[:2]
    ]
