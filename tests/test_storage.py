from __future__ import annotations

import os
import socket
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runtime import storage
from pipeline.runtime.storage import StorageError, as_location, check_access, ray_storage, resolve


def test_resolve_local_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = resolve("out/a")
    assert rel.uri == str(tmp_path / "out" / "a") and not rel.is_s3
    assert resolve(f"file://{tmp_path}/out/a").uri == rel.uri
    assert resolve(str(tmp_path / "out" / "a")).path == rel.path
    assert resolve("out").join("a", "b.txt").uri == str(tmp_path / "out" / "a" / "b.txt")
    with pytest.raises(ValueError, match="unsupported scheme 'gs://'"):
        resolve("gs://bucket/x")
    with pytest.raises(ValueError, match="needs a bucket"):
        resolve("s3://")


def test_local_round_trip_list_delete(tmp_path):
    root = resolve(tmp_path / "data")
    root.join("b.txt").write_text("bee")
    root.join("a", "x.bin").write_bytes(b"\x00\x01")
    assert root.join("b.txt").read_text() == "bee"
    assert [loc.name for loc in root.list()] == ["a", "b.txt"]
    assert [loc.name for loc in root.list(recursive=True)] == ["a", "x.bin", "b.txt"]
    assert not [p for p in os.listdir(tmp_path / "data") if ".tmp-" in p]  # atomic write left no temp file
    root.join("a").delete()
    assert not root.join("a").exists() and root.join("b.txt").exists()
    assert ray_storage(root) == (root.path, None)


def test_local_unwritable_parent_is_an_error(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere; use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(StorageError, match=str(blocker / "sub")):
            resolve(blocker / "sub" / "out.txt").write_text("y")
        return
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(StorageError, match=f"{ro}/out: cannot write here"):
        check_access(resolve(ro / "out"))


def test_s3_round_trip_bytes_and_parquet(s3_prefix):
    root = resolve(s3_prefix)
    assert root.is_s3 and root.uri == s3_prefix
    check_access(root)
    root.join("obj.bin").write_bytes(b"spae" * 100)
    assert root.join("obj.bin").read_bytes() == b"spae" * 100
    table = pa.table({"image_id": ["a", "b", "c"], "label": [1, 2, 3]})
    pq.write_table(table, root.join("t.parquet").path, filesystem=root.fs)
    back = pq.read_table(root.join("t.parquet").path, filesystem=root.fs)
    assert back.equals(table)
    assert [loc.name for loc in root.list()] == ["obj.bin", "t.parquet"]
    path, fs = ray_storage(root)
    assert path == root.path and not path.startswith("s3://") and fs is root.fs
    # the boto3 client sees the same objects
    keys = storage.s3_client().list_objects_v2(Bucket=root.bucket, Prefix=root.key)["Contents"]
    names = sorted(k["Key"].rsplit("/", 1)[-1] for k in keys if not k["Key"].endswith("/"))  # no dir markers
    assert names == ["obj.bin", "t.parquet"]
    root.delete()
    assert not root.join("obj.bin").exists()


def _fails_fast(fn, match: str, seconds: float = 10.0) -> StorageError:
    start = time.monotonic()
    with pytest.raises(StorageError, match=match) as e:
        fn()
    assert time.monotonic() - start < seconds
    return e.value


def test_missing_bucket_names_the_uri(s3_server):
    uri = "s3://no-such-bucket-spae/x"
    _fails_fast(lambda: check_access(resolve(uri)), f"{uri}: bucket 'no-such-bucket-spae' does not exist")
    _fails_fast(lambda: resolve(uri).join("a.txt").write_text("x"), "does not exist")


def test_bad_credentials_name_the_uri(s3_prefix, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    err = _fails_fast(lambda: check_access(resolve(s3_prefix)), f"{s3_prefix}: bad credentials")
    assert "wrong-secret" not in str(err)
    _fails_fast(lambda: resolve(s3_prefix).join("a.txt").read_bytes(), "bad credentials")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown-key")
    _fails_fast(lambda: check_access(resolve(s3_prefix)), "access key is not known")


def test_unreachable_endpoint_fails_fast(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SPAE_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    uri = "s3://bucket/prefix"
    _fails_fast(
        lambda: check_access(resolve(uri)), f"{uri}: cannot reach the S3 endpoint http://127.0.0.1:{port}"
    )
    _fails_fast(lambda: resolve(uri).join("f").read_bytes(), "cannot reach")


def test_every_reader_takes_a_location_a_path_or_a_uri(tmp_path):
    from pathlib import Path

    loc = resolve(str(tmp_path))
    assert as_location(loc) is loc
    assert as_location(Path(tmp_path)) == loc == as_location(str(tmp_path))
