"""The S3 server dies mid-job, during a commit, and comes back on the same port: storage calls retry
with backoff and the job (after at most one re-run) ends with a complete corpus and no orphan file."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import pytest
from test_tokenize_job import NO_MLFLOW, make_tokenizer

import pipeline.steps.tokenize as tokenize_mod
from infra.local import stack
from pipeline.inputs.sources import SourceConfig
from pipeline.outputs.corpus import read_corpus
from pipeline.outputs.shards import read_manifest
from pipeline.runtime import storage
from pipeline.runtime.stages import JobFailure
from pipeline.runtime.storage import is_transient, resolve
from pipeline.steps.tokenize import TokenizeJobConfig, run_tokenize_job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("attempts", [storage.RETRY_ATTEMPTS, 1])
def test_s3_restart_mid_commit_ends_in_a_complete_corpus(
    ray_cluster, tmp_path, monkeypatch, caplog, attempts
):
    """With the default retries the job rides the outage out; with none it stops (one line) and one
    re-run completes the corpus."""
    cfg = stack.StackConfig(
        root=str(tmp_path / "stack"), bucket="restart", mlflow=False, s3_port=_free_port(), timeout_s=120
    )
    info = stack.up(cfg, owner_pid=os.getpid())
    restarter: threading.Thread | None = None
    try:
        for key, value in stack.env(info).items():
            if key.startswith(("AWS_", "SPAE_")):
                monkeypatch.setenv(key, value)
        out_uri = "s3://restart/corpus"
        job = TokenizeJobConfig(
            source=SourceConfig(uri="mnist://test?limit=96", shard_size=16),
            tokenizer=str(make_tokenizer(tmp_path / "tok")),
            output=out_uri,
            layers=(1, 2),
            roundtrip_sample=0,
            mlflow=NO_MLFLOW,
            progress=False,
        )
        events: list[str] = []
        sidecar = tokenize_mod.jsonl_sidecar

        def restart() -> None:
            time.sleep(1.0)
            stack.up(cfg)  # same data folder, same S3 port
            events.append(f"up {time.monotonic():.1f}")

        def stop_during_second_commit(shard_id: str, table):
            nonlocal restarter
            if shard_id == "00001" and restarter is None:  # inside the commit: before its uploads
                stack.down(cfg, services=("s3",))
                events.append(f"down {time.monotonic():.1f}")
                restarter = threading.Thread(target=restart)
                restarter.start()
            return sidecar(shard_id, table)

        monkeypatch.setattr(tokenize_mod, "jsonl_sidecar", stop_during_second_commit)
        caplog.set_level(logging.WARNING, logger="pipeline.runtime.storage")
        monkeypatch.setattr(storage, "RETRY_ATTEMPTS", attempts)
        start = time.monotonic()
        runs = 1
        try:
            result = run_tokenize_job(job)
        except JobFailure as e:  # the outage outlasted the retries: one re-run finishes it
            assert attempts == 1 and "cannot reach the S3 endpoint" in str(e) and "\n" not in str(e)
            restarter.join()
            runs = 2
            result = run_tokenize_job(job)
        took = time.monotonic() - start
        print(f"\nS3 restart: {events}; {runs} run(s), {took:.1f}s; last run computed {result.shards_run}")
        assert events[0].startswith("down") and events[1].startswith("up")
        retries = [r.getMessage() for r in caplog.records if r.name == "pipeline.runtime.storage"]
        print(f"storage retries: {len(retries)}; first: {retries[:1]}")
        assert all("retry" in m for m in retries)
        assert (runs, bool(retries)) == ((1, True) if attempts > 1 else (2, False))  # rode it out, or not
        ids = read_corpus(out_uri, columns=["image_id"]).column("image_id").to_pylist()
        assert sorted(ids) == [f"mnist-test-{i:06d}" for i in range(96)]  # every image exactly once
        assert read_manifest(out_uri)["rows_written"] == 96
        names = [loc.path.rsplit("restart/corpus/", 1)[1] for loc in resolve(out_uri).list(recursive=True)]
        files = sorted(n for n in names if "." in n.rsplit("/", 1)[-1])
        parts = sorted(n.rsplit("/", 1)[-1] for n in files if n.startswith(("part-", ".spae/jsonl/part-")))
        assert parts == sorted([f"part-{i:05d}.{ext}" for i in range(6) for ext in ("jsonl", "parquet")])
        assert not [n for n in files if n.startswith("_tmp") or ".tmp-" in n]  # no orphan, no temp file
    finally:
        if restarter is not None:
            restarter.join()
        stack.down(cfg)


def test_transient_and_permanent_storage_errors_are_told_apart(monkeypatch):
    reached = "http://127.0.0.1:1"
    storage._REACHED.add(reached)
    refused = OSError(
        "AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Couldn't connect"
    )
    assert is_transient(refused, reached) and not is_transient(refused, "http://never-reached:2")
    assert is_transient(OSError("AWS Error SLOW_DOWN (HTTP status 503) during PutObject: SlowDown"), reached)
    assert is_transient(OSError("Connection reset by peer"), reached)
    assert not is_transient(FileNotFoundError("no such key"), reached)
    assert not is_transient(OSError("AWS Error ACCESS_DENIED during PutObject operation"), reached)
    assert not is_transient(OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2"), reached)
    assert not is_transient(OSError("InvalidAccessKeyId: the key is unknown"), reached)
    assert not is_transient(ValueError("a bug"), reached)

    calls: list[int] = []
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.01)

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError("Connection reset by peer")
        return "ok"

    assert storage.retrying(flaky, "/local/x", "read") == "ok" and len(calls) == 3
    calls.clear()

    def denied() -> str:
        calls.append(1)
        raise PermissionError("denied")

    with pytest.raises(PermissionError):
        storage.retrying(denied, "/local/x", "read")
    assert len(calls) == 1  # never retried
