"""``spae submit`` against a real local Ray head with its dashboard and token authentication.

The head runs in its own temp dir, on its own free ports, with its own token file, in its own
process group: it never touches the suite's in-process ``ray_cluster`` nor ``~/.ray``, and it is
stopped by its process group (never ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.local.stack import stop_with_owner
from jobs.cli import main as spae
from pipeline.outputs.shards import read_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """Outside pytest's basetemp, which concurrent pytest runs may prune while the job uses it."""
    path = Path(tempfile.mkdtemp(prefix="spae-submit-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def tiny_tokenizer(folder: Path) -> Path:
    """A random-weight ``tiny`` SPAE tokenizer (16px images) saved with ``save_pretrained``."""
    import torch

    from spae.codebook import FrozenCodebook
    from spae.model import preset
    from spae.tokenizer import SPAETokenizer

    torch.manual_seed(0)
    cfg = preset("tiny")
    codebook = FrozenCodebook.from_tensor(
        torch.randn(48, cfg.network.latent_dim), words=[f"w{i}" for i in range(48)]
    )
    return SPAETokenizer.from_config(cfg, codebook).save_pretrained(folder)


@dataclass(frozen=True)
class RayHead:
    address: str  # http://127.0.0.1:PORT (dashboard)
    token_path: Path
    pid: int


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    tmp = Path(tempfile.mkdtemp(prefix="spae-head-", dir="/tmp"))  # short: Ray's socket paths must fit
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    gcs, dash, client, agent, agent_grpc, runtime_env, metrics = _free_ports(7)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [ray_bin, "start", "--head", "--block", f"--temp-dir={tmp / 'ray'}", f"--port={gcs}"]
    cmd += ["--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
    cmd += [f"--dashboard-port={dash}", f"--ray-client-server-port={client}"]
    cmd += [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}"]
    cmd += [f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]
    cmd += ["--object-store-memory=200000000", "--disable-usage-stats"]
    log = open(tmp / "head.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stop_with_owner(os.getpid(), proc.pid)  # a killed test run takes the head with it
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:  # ready = the dashboard answers (401: it wants the token)
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray head did not start; log:\n{(tmp / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield RayHead(address=address, token_path=token, pid=proc.pid)
    finally:
        family = _descendants(proc.pid) | {proc.pid}
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(_alive(p) for p in family):
                proc.poll()
                time.sleep(0.2)
        proc.wait(timeout=10)
        log.close()
        left = [p for p in family if _alive(p)]
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray head processes left behind: {left}"


@pytest.fixture
def head_env(ray_head, monkeypatch) -> RayHead:
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(ray_head.token_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.chdir(ROOT)
    return ray_head


def test_submit_wait_runs_a_tokenize_job_and_writes_its_corpus(head_env, work_dir, capsys):
    tokenizer = tiny_tokenizer(work_dir / "tokenizer")
    corpus = work_dir / "corpus"
    job = ["tokenize", "source.uri=mnist://test", "source.limit=24", "source.shard_size=12"]
    job += [f"tokenizer={tokenizer}", f"output={corpus}", "batch_size=12", "roundtrip_sample=0"]
    job += ["progress=false", "mlflow.enabled=false"]
    rc = spae(["submit", *job, "--address", head_env.address, "--wait", "--working-dir", str(ROOT)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"corpus: {corpus}" in out and "SUCCEEDED" in out
    manifest = read_manifest(corpus)
    assert manifest["rows_in"] == 24 and manifest["rows_written"] == 24
    assert len(list(corpus.glob("part-*.parquet"))) == 2


def test_failing_job_status_reaches_the_caller(head_env, capsys):
    code = "import sys; print('about to fail'); sys.exit(3)"
    rc = spae(
        [
            "submit",
            "--raw",
            f"{sys.executable} -c {json.dumps(code)}",
            "--address",
            head_env.address,
            "--wait",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1
    assert "about to fail" in out and "FAILED" in out


def test_missing_token_is_refused(head_env, monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    rc = spae(["submit", "--raw", "true", "--address", head_env.address])
    assert rc == 2
    assert "not-the-token" not in capsys.readouterr().err  # the token is never echoed


def test_bad_config_and_unreachable_address_fail_fast(tmp_path, capsys):
    start = time.monotonic()
    assert spae(["submit", "stack", "status", "colour=red", "--address", "http://127.0.0.1:1"]) == 2
    assert "unknown config key colour" in capsys.readouterr().err
    assert spae(["submit", "no-such-job"]) == 2
    assert "unknown command 'no-such-job'" in capsys.readouterr().err
    (port,) = _free_ports(1)
    assert spae(["submit", "stack", "status", "--address", f"http://127.0.0.1:{port}"]) == 2
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{port}" in capsys.readouterr().err
    assert spae(["submit", "stack", "status", "--env", "AWS_SECRET_ACCESS_KEY"]) == 2
    assert "looks like a secret" in capsys.readouterr().err
    assert time.monotonic() - start < 10


def test_runtime_env_forwards_settings_but_no_secrets(monkeypatch):
    from jobs.submit import FORWARD_ENV, build_parser, prepare

    for name in FORWARD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPAE_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    args, rest = build_parser().parse_known_args(
        ["stack", "status", "--address", "http://10.0.0.5:8265", "--working-dir", str(ROOT), "--env", "X=1"]
    )
    request = prepare(args, rest)
    env = request.runtime_env
    assert env["env_vars"] == {"SPAE_S3_ENDPOINT": "http://127.0.0.1:9", "X": "1"}
    assert "s3cret" not in json.dumps(env) and "key" not in env["env_vars"].values()
    assert env["working_dir"] == str(ROOT) and ".venv/" in env["excludes"]
    assert any(req.startswith("ray[") for req in env["pip"])  # a remote head gets the pinned deps
    assert request.entrypoint == "python -m jobs.cli stack status"  # the image's python on a remote head


def test_config_files_local_are_checked_cluster_paths_are_passed(tmp_path):
    from jobs.submit import SubmitError, build_parser, prepare

    def request(*argv):
        args, rest = build_parser().parse_known_args([*argv, "--address", "http://10.0.0.5:8265", "--no-pip"])
        return prepare(args, rest)

    (tmp_path / "tok.yaml").write_text("batch_size: 8\n")
    ok = request("tokenize", "--config", "tok.yaml", "actors=2", "--working-dir", str(tmp_path))
    assert (
        ok.entrypoint == "python -m jobs.cli tokenize --config tok.yaml actors=2"
        and "pip" not in ok.runtime_env
    )
    (tmp_path / "bad.yaml").write_text("batch_size: many\n")
    with pytest.raises(SubmitError, match="tokenize: config error: batch_size: expected an integer"):
        request("tokenize", "--config", "bad.yaml", "--working-dir", str(tmp_path))
    with pytest.raises(SubmitError, match="--config missing.yaml: no such file in the working dir"):
        request("tokenize", "--config", "missing.yaml", "--working-dir", str(tmp_path))
    mounted = request("tokenize", "--config", "/etc/spae/tokenize.yaml", "--working-dir", str(tmp_path))
    assert "--config /etc/spae/tokenize.yaml" in mounted.entrypoint


def test_runtime_env_refuses_a_secret_under_another_name_and_a_url_with_a_password(monkeypatch):
    from jobs.submit import FORWARD_ENV, SubmitError, build_parser, prepare

    for name in FORWARD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-value-123")

    def request(*argv):
        args, rest = build_parser().parse_known_args(
            [
                "stack",
                "status",
                "--address",
                "http://10.0.0.5:8265",
                "--working-dir",
                str(ROOT),
                "--no-pip",
                *argv,
            ]
        )
        return prepare(args, rest)

    with pytest.raises(SubmitError, match="--env HARMLESS: its value is a credential"):
        request("--env", "HARMLESS=s3cret-value-123")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:pw@mlflow.example.com")
    with pytest.raises(SubmitError, match="MLFLOW_TRACKING_URI: the URL carries a password"):
        request()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.com")
    assert request().runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "https://mlflow.example.com"}
