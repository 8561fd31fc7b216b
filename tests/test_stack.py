from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.local import stack
from jobs.cli import main as spae


@pytest.fixture
def stack_root() -> Iterator[Path]:
    """Outside pytest's basetemp, which concurrent pytest runs may prune while a server uses it."""
    path = Path(tempfile.mkdtemp(prefix="spae-stack-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stack_up_status_env_down_leaves_no_process(stack_root, capsys):
    root = stack_root / "stack"
    assert spae(["stack", "up", f"root={root}"]) == 0
    out = capsys.readouterr().out
    state = json.loads((root / "stack.json").read_text())
    pids = state["pids"]
    assert set(pids) == {"s3", "mlflow"} and all(_pid_alive(p) for p in pids.values())
    assert state["s3_endpoint"] in out and state["mlflow_uri"] in out

    # credentials: generated, private, never in stack.json or on stdout
    creds = stack.read_credentials(root / "credentials.env")
    assert stat.S_IMODE(os.stat(root / "credentials.env").st_mode) == 0o600
    secret = creds["AWS_SECRET_ACCESS_KEY"]
    assert secret not in (root / "stack.json").read_text() and secret not in out

    assert spae(["stack", "status", f"root={root}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("s3      up") and "head-bucket s3://spae: ok" in line for line in lines)
    assert any(line.startswith("mlflow  up") and "experiments/search: ok" in line for line in lines)

    assert spae(["stack", "env", f"root={root}"]) == 0
    env_out = capsys.readouterr().out
    assert f"export SPAE_S3_ENDPOINT={state['s3_endpoint']}" in env_out
    assert f"export MLFLOW_TRACKING_URI={state['mlflow_uri']}" in env_out
    assert secret not in env_out and str(root / "credentials.env") in env_out

    # a second `up` finds the running services and starts nothing new
    assert stack.up(stack.StackConfig(root=str(root))).pids == pids

    assert spae(["stack", "down", f"root={root}"]) == 0
    assert not any(_pid_alive(p) for p in pids.values())
    status = stack.status(stack.StackConfig(root=str(root)))
    assert not any(s["running"] for s in status["services"].values())


def test_stack_reports_a_service_that_does_not_come_up(stack_root):
    tmp_path = stack_root
    root = tmp_path / "stack"
    cfg = stack.StackConfig(root=str(root), mlflow=False, timeout_s=60)
    info = stack.up(cfg)
    try:  # a second S3 server on the same (taken) S3 port cannot start
        bad = stack.StackConfig(root=str(tmp_path / "other"), mlflow=False, s3_port=info.ports["s3"]["s3"])
        try:
            stack.up(bad)
        except stack.StackError as e:
            message = str(e)
        else:
            raise AssertionError("a second server on a taken port started")
        assert "s3 service" in message and str(tmp_path / "other" / "s3" / "log") in message
        assert "last log lines" in message
        assert not stack.status(bad)["services"]["s3"]["running"]
    finally:
        stack.down(cfg)


def test_a_started_child_is_alive_by_its_handle(stack_root):
    # the handle of a child this process started decides, whatever its /proc cmdline reads;
    # pids from elsewhere (stack.json) still need the service's name in their cmdline
    (stack_root / "s3").mkdir()
    pid = stack._spawn("s3", ["sleep", "30"], stack_root / "s3", dict(os.environ))
    try:
        assert stack._alive("s3", pid)
        assert not stack._alive("s3", os.getpid())  # alive, but not a weed process of ours
    finally:
        os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while stack._alive("s3", pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stack._alive("s3", pid) and pid not in stack._CHILDREN


def test_services_die_with_their_owner(stack_root):
    """A killed test run (owner) takes its services with it, through the watchdog."""
    owner = subprocess.Popen(["sleep", "60"])
    cfg = stack.StackConfig(root=str(stack_root / "stack"), mlflow=False)
    pid = stack.up(cfg, owner_pid=owner.pid).pids["s3"]
    try:
        assert _pid_alive(pid)
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 30
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _pid_alive(pid)
    finally:
        stack.down(cfg)


def _wait_gone(cfg: stack.StackConfig, name: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while stack.status(cfg)["services"][name]["running"]:
        assert time.monotonic() < deadline, f"{name} still running {timeout_s} s after SIGKILL"
        time.sleep(0.2)


def test_stack_up_after_s3_died_keeps_the_endpoint_and_mlflow_stores_artifacts(stack_root, capsys):
    import signal

    import boto3
    import mlflow

    cfg = stack.StackConfig(root=str(stack_root / "stack"), bucket="crash", timeout_s=120)
    info = stack.up(cfg)
    try:
        os.kill(info.pids["s3"], signal.SIGKILL)  # the S3 server dies; MLflow keeps running
        assert spae(["stack", "status", f"root={cfg.root}"]) == 1  # dying or gone: down either way
        lines = capsys.readouterr().out.splitlines()
        (s3_line,) = [line for line in lines if line.startswith("s3 ")]
        (mlflow_line,) = [line for line in lines if line.startswith("mlflow ")]
        assert s3_line.startswith("s3      down ") and info.s3_endpoint in s3_line
        assert mlflow_line.startswith("mlflow  up ")
        _wait_gone(cfg, "s3")

        again = stack.up(cfg)
        assert again.s3_endpoint == info.s3_endpoint  # the recorded ports, so MLflow's endpoint holds
        assert again.pids["mlflow"] == info.pids["mlflow"] and again.pids["s3"] != info.pids["s3"]
        state = stack.status(cfg)["services"]
        assert state["s3"]["state"] == "up" and state["mlflow"]["state"] == "up", state

        client = mlflow.MlflowClient(again.mlflow_uri)
        run = client.create_run(client.create_experiment("after-crash"))
        client.log_text(run.info.run_id, "stored after the S3 restart", "note.txt")
        creds = stack.read_credentials(again.credentials_file)
        s3 = boto3.client(
            "s3",
            endpoint_url=again.s3_endpoint,
            region_name=stack.REGION,
            aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        )
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="crash", Prefix="mlflow/")["Contents"]]
        (key,) = [k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/note.txt")]
        body = s3.get_object(Bucket="crash", Key=key)["Body"].read()
        assert body == b"stored after the S3 restart"
    finally:
        stack.down(cfg)


def test_mlflow_is_restarted_when_s3_had_to_move(stack_root):
    """A recorded S3 port taken by someone else: new ports, and MLflow follows the new endpoint."""
    import signal
    import socket

    cfg = stack.StackConfig(root=str(stack_root / "stack"), bucket="moved", timeout_s=120)
    info = stack.up(cfg)
    blocker = socket.socket()
    try:
        os.kill(info.pids["s3"], signal.SIGKILL)
        _wait_gone(cfg, "s3")
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the dead server's TIME_WAIT
        blocker.bind(("127.0.0.1", info.ports["s3"]["s3"]))
        blocker.listen()  # someone else serves the old S3 port now
        again = stack.up(cfg)
        assert again.s3_endpoint != info.s3_endpoint and again.mlflow_s3_endpoint == again.s3_endpoint
        assert again.pids["mlflow"] != info.pids["mlflow"] and not _pid_alive(info.pids["mlflow"])
        assert all(s["state"] == "up" for s in stack.status(cfg)["services"].values())
    finally:
        blocker.close()
        stack.down(cfg)
