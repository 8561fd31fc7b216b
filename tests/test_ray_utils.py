from __future__ import annotations

import socket
import time

import pytest

from pipeline.ray_utils import RayConfig, init_ray, worker_env
from pipeline.storage import resolve


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
    env = worker_env()
    assert env["SPAE_S3_ENDPOINT"] == "http://127.0.0.1:1" and "SOME_OTHER_SECRET" not in env


def test_ray_workers_reach_the_s3_server(ray_cluster, s3_prefix):
    import ray

    init_ray(RayConfig())  # already initialised by the fixture: a no-op
    resolve(s3_prefix).join("hello.txt").write_text("from the driver")

    @ray.remote
    def read(uri: str) -> str:
        from pipeline.storage import resolve

        return resolve(uri).read_text()

    assert ray.get(read.remote(f"{s3_prefix}/hello.txt")) == "from the driver"


def test_local_cluster_workers_silence_the_placement_group_cleaner(ray_cluster):
    import logging

    import ray

    from pipeline.ray_utils import PG_CLEANER_LOGGER, local_runtime_env

    @ray.remote
    def levels() -> tuple[int, int]:
        return logging.getLogger(PG_CLEANER_LOGGER).level, logging.getLogger("ray.data").level

    cleaner, other = ray.get(levels.remote())
    assert cleaner == logging.ERROR and other != logging.ERROR  # only the cleaner's warnings go
    assert "worker_process_setup_hook" not in local_runtime_env(include_dashboard=True)
