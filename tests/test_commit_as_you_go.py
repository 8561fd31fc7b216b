"""Reliability of the sharded jobs' data plane, on real Ray (and the real S3 server where it matters):
commits as they go with default shard sizes, device faults stop the job instead of becoming error
rows, no orphan sidecar after a failed commit, pieces of a shard read exactly its rows."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
from test_tokenize_job import NO_MLFLOW, make_tokenizer

from jobs import tokenize as tokenize_cli
from pipeline.inputs.sources import SourceConfig, list_shards, read_shard
from pipeline.outputs.corpus import read_corpus
from pipeline.outputs.shards import read_manifest
from pipeline.runtime.stages import (
    FATAL_STAGE,
    JobFailure,
    StageFailure,
    call_with_retries,
    fatal_reason,
    shard_pieces,
)
from pipeline.steps.tokenize import (
    INJECTED_DEVICE_ERROR,
    TokenizeJobConfig,
    TokenizeStage,
    TokenizeStageConfig,
    run_tokenize_job,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _parts(out, suffix: str) -> list[str]:
    folder = out / ".spae" / "jsonl" if suffix == ".jsonl" else out  # the JSONL twins: docs/CORPUS.md
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"part-*{suffix}"))


def test_default_shards_commit_as_they_go_and_a_rerun_after_85_percent_computes_the_rest(
    ray_cluster, tokenizer_dir, tmp_path
):
    out = tmp_path / "corpus"
    cfg = TokenizeJobConfig(
        source=SourceConfig(uri="mnist://test"),  # 10,000 images, the default shard size (1,000)
        tokenizer=str(tokenizer_dir),
        output=str(out),
        roundtrip_sample=0,
        model_retries=0,
        mlflow=NO_MLFLOW,
        progress=False,
    )
    assert (
        cfg.source.shard_size == SourceConfig().shard_size
        and cfg.batch_size == TokenizeJobConfig().batch_size
    )
    total = len(list_shards(cfg.source))
    # a device fault on the batch holding image 8,500 (85% of the input, in shard 00008) stops the job
    start = time.perf_counter()
    with pytest.raises(JobFailure, match="CUDA error: an illegal memory access") as e:
        run_tokenize_job(replace(cfg, fail_encode_at="mnist-test-008500"))
    first = time.perf_counter() - start
    assert str(e.value).count("\n") == 0 and "00008" in str(e.value)
    committed = _parts(out, ".parquet")
    print(f"\ninterrupted at 85%: {len(committed)}/{total} shards committed in {first:.1f}s")
    assert _parts(out, ".jsonl") == committed  # every JSONL has its Parquet twin, and back
    assert "part-00008" not in committed and len(committed) >= 8  # shards 0-7 were done before image 8,500

    start = time.perf_counter()
    result = run_tokenize_job(cfg)  # the re-run computes only the rest
    print(f"re-run: {result.shards_run}/{total} shards computed in {time.perf_counter() - start:.1f}s")
    assert result.shards_run == total - len(committed) and result.shards_run <= 0.25 * total
    ids = read_corpus(str(out), columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 10_000 and sorted(ids)[-1] == "mnist-test-009999"
    assert read_manifest(str(out))["errors"] == 0


def test_a_device_fault_fails_the_cli_with_one_line_and_commits_nothing_of_that_shard(
    ray_cluster, tokenizer_dir, tmp_path, capsys
):
    out = tmp_path / "corpus"
    args = [
        "source.uri=mnist://test?limit=96",
        "source.shard_size=32",
        f"tokenizer={tokenizer_dir}",
        f"output={out}",
        "batch_size=16",
        "roundtrip_sample=0",
        "mlflow.enabled=false",
        "progress=false",
        "model_retries=1",
    ]
    assert tokenize_cli.main([*args, "fail_encode_at=mnist-test-000040"]) == 1  # in shard 00001
    last = capsys.readouterr().err.strip().splitlines()[-1]  # above it: Ray Data's own log of the fault
    assert last.startswith("spae tokenize: ") and "job stopped after committing" in last
    assert INJECTED_DEVICE_ERROR in last and "tokenize (shard 00001) failed 2 times" in last
    assert "part-00001" not in _parts(out, ".parquet") and "part-00001" not in _parts(out, ".jsonl")
    assert not (out / ".spae" / "errors").exists()  # a device fault is never an image's error
    assert tokenize_cli.main(args) == 0  # without the fault the re-run completes the corpus
    ids = read_corpus(str(out), columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == [f"mnist-test-{i:06d}" for i in range(96)]
    assert read_manifest(str(out))["errors"] == 0


def test_a_model_fault_is_retried_then_marks_the_batch_fatal(tokenizer_dir):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("CUDA out of memory")
        return "ok"

    assert call_with_retries(flaky, "x", retries=2, delay_s=0) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(StageFailure, match="x failed 2 times; last error: RuntimeError: CUDA out of memory"):
        call_with_retries(flaky, "x", retries=1, delay_s=0)
    stage = TokenizeStage(TokenizeStageConfig(str(tokenizer_dir), layers=(1,), retries=0, fail_at="img-1"))
    batch = {
        "shard_id": np.array(["00000"] * 2, dtype=object),
        "image_id": np.array(["img-0", "img-1"], dtype=object),
        "error": np.array([None, None], dtype=object),
        "pixels": np.zeros((2, 16, 16, 3), np.uint8),
    }
    out = stage(batch)  # rows marked as given up on (the driver stops there), never image errors
    assert list(out["error_stage"]) == [FATAL_STAGE] * 2 and INJECTED_DEVICE_ERROR in fatal_reason(out)


@pytest.mark.parametrize("uri", ["mnist://test?limit=37", "folder"])
def test_pieces_of_a_shard_read_exactly_its_rows(uri, tmp_path):
    if uri == "folder":
        for i in range(11):
            (tmp_path / f"{i:02d}.png").write_bytes(b"")
        uri = str(tmp_path)
    shards = list_shards(SourceConfig(uri=uri, shard_size=9))
    pieces = shard_pieces(shards, task_rows=4)
    assert [p.num_rows for p in pieces if p.shard_id == "00000"] == [4, 4, 1]
    assert all(p.digest == shards[int(p.shard_id)].digest for p in pieces)
    got = [i for p in pieces for i in read_shard(p).column("image_id").to_pylist()]
    assert got == [i for s in shards for i in read_shard(s).column("image_id").to_pylist()]


def test_a_shard_of_an_unknown_item_layout_stays_whole():
    shard = list_shards(SourceConfig(uri="mnist://test?limit=20", shard_size=20))[0]
    other = replace(shard, kind="webdataset")  # items this module cannot cut (byte offsets)
    assert shard_pieces([other], task_rows=8) == [other]
    assert [p.num_rows for p in shard_pieces([shard], task_rows=8)] == [8, 8, 4]


@pytest.mark.slow
def test_a_driver_killed_at_85_percent_leaves_its_commits_and_the_rerun_computes_the_rest(
    tokenizer_dir, tmp_path
):
    """``spae tokenize`` on its own local Ray cluster, SIGKILLed (driver and cluster) once 8 of its 10
    default-size shards are committed and before the last: those stay, the re-run computes the rest."""
    import contextlib
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    out = tmp_path / "corpus"
    ray_tmp = Path(tempfile.mkdtemp(prefix="spae-k-", dir="/tmp"))  # short: Ray's socket paths are limited
    args = [
        sys.executable, "-m", "jobs.cli", "tokenize", "source.uri=mnist://test", f"tokenizer={tokenizer_dir}",
        f"output={out}", "roundtrip_sample=0", "mlflow.enabled=false", "progress=false", "ray.num_cpus=2",
    ]  # fmt: skip
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(Path(__file__).parents[1]))
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen = []  # committed shard counts, polled
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            seen.append(len(_parts(out, ".parquet")))
            if 8 <= seen[-1] < 10:
                break
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the driver and the Ray cluster it started
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _kill_leftovers(ray_tmp)
    committed = _parts(out, ".parquet")
    assert proc.returncode == -signal.SIGKILL and 8 <= len(committed) < 10, (seen[-20:], committed)
    assert any(0 < n < 8 for n in seen), "shards were committed together, not as they finished"
    try:
        rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    finally:
        _kill_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    ids = read_corpus(str(out), columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 10_000
    m = read_manifest(str(out))
    assert m["rows_in"] == m["rows_written"] == 10_000 and m["errors"] == 0
    assert _parts(out, ".jsonl") == _parts(out, ".parquet")  # no JSONL without its Parquet, and back
    computed = 10 - len(committed)
    assert computed <= 0.25 * 10
    print(f"\nkilled with {len(committed)}/10 shards committed; the re-run computed {computed}")


def _kill_leftovers(ray_tmp) -> None:
    """Ray processes of a session under ``ray_tmp`` that outlived their driver (they may leave its group)."""
    import contextlib
    import os
    import signal
    from pathlib import Path

    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if str(ray_tmp) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
