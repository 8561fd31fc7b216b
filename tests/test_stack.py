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
    status = json.loads(capsys.readouterr().out)
    assert all(s["running"] for s in status["services"].values())

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
