"""Session fixtures shared by every test module: a real S3 server, a real MLflow server, a Ray cluster.

Each service starts lazily, on first request, once per test session, and is stopped at the end.
``s3_server`` exports the S3 endpoint and credentials into ``os.environ`` for the whole session,
so ``pipeline.runtime.storage``, MLflow and Ray workers (started afterwards) all find them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import infra  # noqa: F401
except ModuleNotFoundError:  # an install that predates `infra` in the package list: use the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infra.local import stack  # noqa: E402

# keep tests offline and quiet, whatever the machine's settings
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    stack_config: stack.StackConfig

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


@pytest.fixture(scope="session")
def stack_dir() -> Iterator[Path]:
    """A private folder, not under pytest's basetemp (concurrent pytest runs prune each other's)."""
    path = Path(tempfile.mkdtemp(prefix="spae-stack-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(stack_dir: Path) -> Iterator[S3Server]:
    cfg = stack.StackConfig(root=str(stack_dir), bucket="spae-test", mlflow=False, timeout_s=180)
    saved = dict(os.environ)
    info = stack.up(cfg, owner_pid=os.getpid())  # a watchdog stops it if this run is killed
    try:
        client_env = stack.env(info)
        client_env.pop("MLFLOW_S3_ENDPOINT_URL", None)  # set by mlflow_server
        os.environ.update(client_env)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
            os.environ.pop(name, None)
        yield S3Server(endpoint=info.s3_endpoint, bucket=info.bucket, stack_config=cfg)
    finally:
        stack.down(cfg)
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def s3_prefix(s3_server: S3Server) -> str:
    """A fresh, empty ``s3://<bucket>/test-<uuid>`` prefix."""
    return s3_server.uri(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Server) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite, artifacts on the S3 bucket); yields its tracking URI."""
    cfg = stack.StackConfig(
        root=s3_server.stack_config.root, bucket=s3_server.bucket, mlflow=True, timeout_s=180
    )
    info = stack.up(cfg, owner_pid=os.getpid())
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = info.s3_endpoint
    try:
        yield info.mlflow_uri
    finally:
        stack.down(cfg, services=("mlflow",))
        os.environ.pop("MLFLOW_S3_ENDPOINT_URL", None)


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[None]:
    """One small local Ray cluster for the whole suite (2 CPUs, 500 MB object store)."""
    import ray

    from pipeline.runtime.ray_utils import local_runtime_env

    if ray.is_initialized():
        ray.shutdown()
    saved_address = os.environ.pop("RAY_ADDRESS", None)
    ray.init(
        address="local",  # a new cluster, even if another one runs on this machine
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=500 * 1024 * 1024,
        runtime_env=local_runtime_env(),
        logging_level="WARNING",
        log_to_driver=True,
    )
    try:
        yield None
    finally:
        ray.shutdown()
        if saved_address is not None:
            os.environ["RAY_ADDRESS"] = saved_address
