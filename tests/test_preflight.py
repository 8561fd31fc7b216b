"""Pre-flight: every job checks its storage, credentials, MLflow and GPUs before Ray, in seconds, one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.runtime.preflight import JobNeeds, PreflightError, check, check_output
from pipeline.runtime.storage import resolve

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spae(args: list[str], **env: str) -> tuple[int, list[str], float]:
    """Run the CLI as a user would; returns (exit code, stderr lines, seconds)."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], env=full_env, capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stderr.splitlines(), time.monotonic() - start


def test_unreachable_mlflow_fails_in_seconds_with_one_line(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nobody serves it
    rc, err, seconds = _spae(["vocab", f"output={tmp_path / 'vocab'}", f"mlflow.tracking_uri={uri}"])
    print(f"unreachable MLflow: exit {rc} in {seconds:.1f} s: {err}")
    assert rc == 2 and seconds < LIMIT_S
    assert len(err) == 1 and "cannot reach the MLflow tracking server" in err[0] and uri in err[0]
    assert not (tmp_path / "vocab").exists()  # nothing started


def test_wrong_s3_secret_fails_in_seconds_with_one_line(s3_prefix):
    out = f"{s3_prefix}/vocab"
    args = ["vocab", f"output={out}", "mlflow.enabled=false"]
    rc, err, seconds = _spae(args, AWS_SECRET_ACCESS_KEY="wrong")
    print(f"wrong secret (vocab output): exit {rc} in {seconds:.1f} s: {err}")
    assert rc == 2 and seconds < LIMIT_S
    assert len(err) == 1 and out in err[0] and "secret key does not match" in err[0]
    assert "wrong" not in err[0]  # never the secret itself
    # Ray Train storage of a training run: the same, before any worker starts
    storage = f"{s3_prefix}/runs"
    rc, err, seconds = _spae(
        ["train", "preset=tiny", f"storage={storage}", "mlflow.enabled=false"], AWS_SECRET_ACCESS_KEY="wrong"
    )
    print(f"wrong secret (train storage): exit {rc} in {seconds:.1f} s: {err}")
    assert rc == 2 and seconds < LIMIT_S
    assert len(err) == 1 and err[0].startswith("spae train: cannot start: storage: ") and storage in err[0]


def test_s3_server_down_fails_in_seconds_with_one_line(s3_server):
    endpoint = f"http://127.0.0.1:{_free_port()}"  # the server is gone: nothing listens there
    out = s3_server.uri("corpus")
    rc, err, seconds = _spae(
        ["tokenize", "source.uri=mnist://test?limit=4", "tokenizer=outputs/none", f"output={out}"],
        SPAE_S3_ENDPOINT=endpoint,
        MLFLOW_TRACKING_URI="",
    )
    print(f"S3 down: exit {rc} in {seconds:.1f} s: {err}")
    assert rc == 2 and seconds < LIMIT_S
    assert len(err) == 1 and out in err[0] and f"cannot reach the S3 endpoint {endpoint}" in err[0]


def test_missing_input_on_s3_names_the_key(s3_prefix, tmp_path):
    needs = JobNeeds(outputs=("output",), inputs=("source.uri",))

    class Source:
        uri = f"{s3_prefix}/no-such-images"

    class Cfg:
        source = Source()
        output = str(tmp_path / "out")

    with pytest.raises(PreflightError, match=f"^source.uri={Source.uri} does not exist$"):
        check(Cfg(), needs)


def test_output_probe_writes_and_leaves_nothing(s3_prefix):
    check_output(f"{s3_prefix}/out")
    assert resolve(s3_prefix).list(recursive=True) == []


def test_gpus_asked_for_must_be_present(monkeypatch):
    from pipeline.runtime.ray_utils import RayConfig

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    class Cfg:
        num_gpus_per_actor = 1.0
        ray = RayConfig()

    needs = JobNeeds(gpus=lambda cfg: cfg.num_gpus_per_actor)
    with pytest.raises(PreflightError, match="^gpus: 1 GPU\\(s\\) asked for, 0 on this machine"):
        check(Cfg(), needs)
    Cfg.ray = RayConfig(address="10.0.0.5:6379")  # a remote cluster has its own GPUs: not checked here
    check(Cfg(), needs)


def test_a_live_mlflow_server_passes(mlflow_server):
    from pipeline.runtime.tracking import check_tracking_server

    check_tracking_server(mlflow_server)
    with pytest.raises(ConnectionError, match="answered HTTP 404"):
        check_tracking_server(mlflow_server + "/no/such/prefix")


def test_every_built_in_source_scheme_passes_the_input_check():
    """A source kind selected by its URI scheme names no file: pre-flight must not look for one."""
    from pipeline.inputs.sources import SOURCE_KINDS
    from pipeline.runtime.preflight import BUILT_IN_SCHEMES

    schemes = [f"{k.scheme}://" for k in SOURCE_KINDS.values() if k.scheme]
    assert schemes and all(s in BUILT_IN_SCHEMES for s in schemes), (schemes, BUILT_IN_SCHEMES)
