from __future__ import annotations

import socket
import time

import pytest

from pipeline.runtime.ray_utils import RayConfig, init_ray, local_runtime_env, worker_env
from pipeline.runtime.storage import resolve


def test_unreachable_address_fails_fast_naming_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        init_ray(RayConfig(address=f"127.0.0.1:{port}"))
    assert time.monotonic() - start < 5
    with pytest.raises(ValueError, match="not of the form host:port"):
        init_ray(RayConfig(address="nohost"))


def test_worker_env_is_an_allowlist(monkeypatch):
    monkeypatch.setenv("SPAE_S3_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("SOME_OTHER_SECRET", "x")
    secret = "s3cr3t-Value-7f41"  # not a substring of any path or setting the session may hold
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.setenv(name, secret)
    env = worker_env()
    assert env["SPAE_S3_ENDPOINT"] == "http://127.0.0.1:1" and "SOME_OTHER_SECRET" not in env
    assert secret not in env.values()  # Ray logs a runtime_env in plain text: no credential in it
    assert secret not in str(local_runtime_env())


def test_ray_workers_reach_the_s3_server(ray_cluster, s3_prefix):
    import ray

    init_ray(RayConfig())  # already initialised by the fixture: a no-op
    resolve(s3_prefix).join("hello.txt").write_text("from the driver")

    @ray.remote
    def read(uri: str) -> str:
        from pipeline.runtime.storage import resolve

        return resolve(uri).read_text()

    assert ray.get(read.remote(f"{s3_prefix}/hello.txt")) == "from the driver"


def test_local_cluster_workers_silence_the_placement_group_cleaner(ray_cluster):
    import logging

    import ray

    from pipeline.runtime.ray_utils import PG_CLEANER_LOGGER, local_runtime_env

    @ray.remote
    def levels() -> tuple[int, int]:
        return logging.getLogger(PG_CLEANER_LOGGER).level, logging.getLogger("ray.data").level

    cleaner, other = ray.get(levels.remote())
    assert cleaner == logging.ERROR and other != logging.ERROR  # only the cleaner's warnings go
    assert "worker_process_setup_hook" not in local_runtime_env(include_dashboard=True)


# a fresh local cluster (its own temp dir) runs a task that writes and reads S3, then a real job on S3
_JOB_ON_S3 = """
import sys

import ray

from jobs.cli import main
from pipeline.runtime.ray_utils import RayConfig, init_ray

uri, arch = sys.argv[1], sys.argv[2]
init_ray(RayConfig(num_cpus=2))


@ray.remote
def worker_io(uri: str) -> str:
    from pipeline.runtime.storage import resolve

    loc = resolve(uri).join("from-worker.txt")
    loc.write_text("written by a worker")
    return loc.read_text()


assert ray.get(worker_io.remote(uri)) == "written by a worker"
args = ["vocab", f"output={uri}/vocab", "codebook.top_n=40", "scorer.kind=open_clip", f"scorer.arch={arch}"]
sys.exit(main([*args, "scorer.device=cpu", "scorer.templates=simple", "shard_size=16", "progress=false"]))
"""

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def test_no_secret_in_any_ray_file_after_a_job_on_s3(s3_server, s3_prefix, tmp_path):
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from pipeline.steps.vocab import load_vocab

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # the stack's, exported by the s3_server fixture
    assert len(secret) >= 16
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths live here
    try:
        env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(Path(__file__).parents[1]))
        env.pop("RAY_ADDRESS", None)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
        proc = subprocess.run(
            [sys.executable, "-c", _JOB_ON_S3, s3_prefix, f"local-dir:{tmp_path}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert resolve(s3_prefix).join("from-worker.txt").read_text() == "written by a worker"
        assert len(load_vocab(f"{s3_prefix}/vocab")) == 40
        files = [p for p in ray_tmp.rglob("*") if p.is_file()]
        (agent_log,) = [p for p in files if p.name == "runtime_env_agent.log"]
        # the agent logs each runtime_env in plain text (a secret put there would be found below)
        assert s3_server.endpoint in agent_log.read_text()
        hits = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert hits == [], f"the secret is on disk in {hits}"
        assert secret not in proc.stdout + proc.stderr
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_worker_without_credential_variables_reads_the_stacks_credentials_file(ray_cluster, s3_prefix):
    """How a cluster started without the secrets gets them: only a path travels (no secret in Ray's logs)."""
    import os

    import ray

    assert os.environ["AWS_SHARED_CREDENTIALS_FILE"].endswith("aws-credentials")
    assert "AWS_SHARED_CREDENTIALS_FILE" in worker_env()
    resolve(s3_prefix).join("note.txt").write_text("read with the file")

    @ray.remote(max_calls=1)  # a fresh worker process, gone afterwards
    def read_without_secret_variables(uri: str, credentials_file: str | None = None) -> str:
        import os

        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            os.environ.pop(name, None)
        if credentials_file is not None:
            os.environ["AWS_SHARED_CREDENTIALS_FILE"] = credentials_file
        from pipeline.runtime.storage import resolve

        return resolve(uri).read_text()

    assert ray.get(read_without_secret_variables.remote(f"{s3_prefix}/note.txt")) == "read with the file"
    with pytest.raises(Exception, match="bad credentials|access denied|AccessDenied"):  # no file: no access
        ray.get(read_without_secret_variables.remote(f"{s3_prefix}/note.txt", "/nonexistent/credentials"))
