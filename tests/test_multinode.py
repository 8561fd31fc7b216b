"""Three raylets on loopback (a head and two worker nodes); a worker node killed mid-tokenize and mid-train.

The tokenize job (or its one re-run) must end with every image exactly once; training must resume from
the last checkpoint (``FailureConfig(max_failures)``) and finish. The jobs run as a user runs them: the
``spae`` CLI, a separate driver process, connected to the head by ``ray.address`` with the cluster's
token. A node is killed as a machine dies: SIGKILL to its ``ray start`` process, its raylet and every
process under it. The cluster is always torn down by killing exactly the processes this test started
(never ``ray stop``, which stops every Ray cluster on the machine).

Facts this test relies on (checked here with Ray 2.60): every node started with
``--node-ip-address=127.0.0.1`` registers under the machine's own address (e.g. 192.0.2.2), all three on
the same one, each with its own raylet socket; a driver on that address attaches to the head's raylet.
Two worker nodes started at once collide on fixed default ports (the dashboard agent's 52365), so each
node gets its own free ports and the workers start one after the other. Token authentication is on
(``RAY_AUTH_MODE=token``) with a token made for this cluster, passed in the environment
(``RAY_AUTH_TOKEN``), never written to ``~/.ray``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_tokenize_job import make_tokenizer, upload
from test_train_job import job_overrides

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
NODE_START_S = 120
TOKENIZE_IMAGES, SHARD = 2000, 100
TRAIN_STEPS = 8
# detect a dead node in ~3 s instead of ~15 s (GCS health checks of the raylets)
FAST_HEALTH = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "2",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One ``ray start --block`` process (its own session) and everything under it."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path):
        self.name, self.log = name, log
        ports = {
            "node-manager-port": _free_port(),
            "object-manager-port": _free_port(),
            "dashboard-agent-listen-port": _free_port(),
            "dashboard-agent-grpc-port": _free_port(),
            "metrics-export-port": _free_port(),
            "runtime-env-agent-port": _free_port(),
        }
        cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        cmd += [f"--{k}={v}" for k, v in ports.items()] + args
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def titles(self) -> list[str]:
        out = []
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                out.append(" ".join(p.cmdline()))
        return out

    def hosts(self, marker: str) -> bool:
        return any(marker in t for t in self.titles())

    def wait_started(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log.read_text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"ray node {self.name} did not start:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the node: ``ray start``, its raylet, agents and every worker process under them."""
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


class LoopbackCluster:
    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, Node] = {}

    def start(self) -> None:
        deadline = time.monotonic() + NODE_START_S
        # the head holds no CPU: every task and train worker runs on a worker node, so killing one hits work
        self._node(
            "head",
            [
                "--head",
                f"--port={self.port}",
                "--num-cpus=0",
                f"--temp-dir={self.root / 'ray'}",
                "--include-dashboard=false",
                f"--dashboard-port={_free_port()}",  # its minimal head process still binds one (8265)
                f"--ray-client-server-port={_free_port()}",
            ],
        ).wait_started(deadline)
        for name in ("w1", "w2"):  # one after the other: nodes started at once race for ports
            self.add_worker(name, deadline)

    def add_worker(self, name: str, deadline: float) -> None:
        self._node(name, [f"--address={self.address}", "--num-cpus=2"]).wait_started(deadline)

    def _node(self, name: str, args: list[str]) -> Node:
        self.nodes[name] = Node(name, args, self.env, self.root / f"{name}.log")
        return self.nodes[name]

    def node_hosting(self, marker: str) -> Node | None:
        return next((n for k, n in self.nodes.items() if k != "head" and n.hosts(marker)), None)

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            node.kill()


@pytest.fixture
def cluster(s3_server) -> Iterator[LoopbackCluster]:
    """The S3 credentials reach the workers as the raylets' own environment (no runtime_env)."""
    root = Path(tempfile.mkdtemp(prefix="spae-mn-", dir="/tmp"))  # short: raylet socket paths are limited
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        PYTHONPATH=str(ROOT),
        **FAST_HEALTH,
    )
    c = LoopbackCluster(root, env)
    try:
        started = time.monotonic()
        c.start()
        c.start_seconds = time.monotonic() - started
        yield c
    finally:
        c.stop()
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if str(root) in " ".join(p.info["cmdline"] or []):
                left.append(p)
                p.kill()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left after the cluster was stopped: {[p.pid for p in left]}"


def _spae(cluster: LoopbackCluster, log: Path, *argv: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", *argv, f"ray.address={cluster.address}"],
            cwd=ROOT,
            env=cluster.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _kill_when(cluster: LoopbackCluster, proc: subprocess.Popen, marker: str, ready, timeout: float):
    """Wait until a worker node hosts a process titled ``marker`` and ``ready()`` holds, then kill that
    node. Returns (the node's name, seconds into the job) or fails if the job ended first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before a node hosting {marker} was killed")
        node = cluster.node_hosting(marker)
        if node is not None and ready():
            node.kill()
            return node.name, time.monotonic() - start
        time.sleep(0.2)
    pytest.fail(f"no worker node hosted {marker} within {timeout:.0f} s")


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the job did not finish within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def test_worker_node_killed_mid_tokenize_and_mid_train(cluster, s3_prefix, tmp_path):
    from pipeline.outputs.corpus import read_corpus, read_manifest
    from pipeline.runtime.storage import resolve

    timings = {"cluster_start_s": round(cluster.start_seconds, 1)}

    # -- tokenize: 2,000 MNIST images in 20 shards on S3, 2 actors; a node dies once work is under way
    tokenizer = upload(make_tokenizer(tmp_path / "tok"), f"{s3_prefix}/tokenizer")
    output = f"{s3_prefix}/corpus"
    argv = [
        "tokenize",
        f"source.uri=mnist://test?limit={TOKENIZE_IMAGES}",
        f"source.shard_size={SHARD}",
        f"tokenizer={tokenizer}",
        f"output={output}",
        "actors=2",
        "batch_size=50",
        "roundtrip_sample=0",
        "progress=false",
        "mlflow.enabled=false",
    ]
    started = time.monotonic()
    log = tmp_path / "tokenize.log"
    proc = _spae(cluster, log, *argv)

    def committed() -> int:
        return sum(loc.path.endswith(".parquet") for loc in resolve(output).list())

    # an encoder actor is executing a batch (its process title is "ray::MapWorker(...).submit")
    killed, at = _kill_when(cluster, proc, "TokenizeStage)).submit", lambda: True, timeout=90)
    committed_at_kill = committed()
    rc = _finish(proc, log, timeout=180)
    runs = [rc]
    if rc != 0:  # the job may fail with the node; a re-run computes what is missing
        proc = _spae(cluster, tmp_path / "tokenize-rerun.log", *argv)
        runs.append(_finish(proc, tmp_path / "tokenize-rerun.log", timeout=120))
    timings["tokenize_s"] = round(time.monotonic() - started, 1)
    assert runs[-1] == 0, (log.read_text()[-4000:], runs)
    ids = read_corpus(output).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == TOKENIZE_IMAGES  # every image exactly once
    assert set(ids) == {f"mnist-test-{i:06d}" for i in range(TOKENIZE_IMAGES)}
    manifest = read_manifest(output)
    assert manifest["rows_in"] == manifest["rows_written"] + manifest["errors"] == TOKENIZE_IMAGES
    parts = [loc.path for loc in resolve(output).list() if loc.path.rsplit("/", 1)[-1].startswith("part-")]
    parts += [loc.path for loc in resolve(output).join(".spae", "jsonl").list()]
    assert sum(p.endswith(".parquet") for p in parts) == sum(p.endswith(".jsonl") for p in parts) == 20
    logs = "".join(f.read_text() for f in sorted(tmp_path.glob("tokenize*.log")))
    retried = logs.count("TokenizeStage)).submit failed. There are infinite retries remaining")
    shards_now = re.findall(r"(\d+)/20 shards computed now", logs)
    tokenize_report = {
        "killed": killed,
        "at_s": round(at, 1),
        "exits": runs,
        "shards_committed_at_kill": committed_at_kill,
        "retry_messages": retried,
        "shards_computed_per_run": shards_now,
    }

    # the dead machine is replaced (as an autoscaler would): training needs two worker nodes again
    replaced = time.monotonic()
    cluster.add_worker(f"{killed}-new", time.monotonic() + NODE_START_S)
    timings["replace_node_s"] = round(time.monotonic() - replaced, 1)

    # -- train: 2 workers (DDP) on a worker node; the node dies after the first checkpoint
    storage = tmp_path / "runs"
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = job_overrides(
        tmp_path / "data",
        str(storage),
        mlflow_uri,
        steps=TRAIN_STEPS,
        eval_every=0,
        picture_images=0,
        max_failures=2,
        keep_checkpoints=0,
        log_checkpoints="false",
    )
    started = time.monotonic()
    log = tmp_path / "train.log"
    proc = _spae(cluster, log, "train", "preset=tiny", *[f"{k}={v}" for k, v in overrides.items()])

    def registered_step() -> int:
        """The step of the latest checkpoint Ray Train has registered (its manager's snapshot): a
        checkpoint folder alone may be one whose report never reached the controller."""
        try:
            snapshot = json.loads((storage / "tiny-run" / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):
            return 0
        latest = snapshot.get("latest_checkpoint_result") or {}
        return int(latest.get("metrics", {}).get("step", 0))

    killed, at = _kill_when(cluster, proc, "RayTrainWorker", lambda: registered_step() >= 2, timeout=150)
    steps_at_kill = registered_step()
    rc = _finish(proc, log, timeout=180)
    timings["train_s"] = round(time.monotonic() - started, 1)
    assert rc == 0, log.read_text()[-4000:]
    assert f"finished at step {TRAIN_STEPS}" in log.read_text()

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("spae-train-test").experiment_id], "tags.`spae.run_name` = 'tiny-run'"
    )
    resumed = int(run.data.tags["spae.resumed_at_step"])
    # resumed from a checkpoint (every 2 steps), at least the one seen before the kill, not from zero
    assert resumed >= steps_at_kill >= 2 and resumed % 2 == 0 and resumed < TRAIN_STEPS
    final = max(glob.glob(str(storage / "tiny-run" / "checkpoint_*" / "history.json")), key=os.path.getmtime)
    steps = [int(s) for s, _ in json.loads(Path(final).read_text())]
    assert steps == list(range(1, TRAIN_STEPS + 1))  # one continuous history across the restart
    assert (storage / "tiny-run" / "tokenizer" / "model.safetensors").is_file()
    text = log.read_text()
    groups = set(re.findall(r"pid=(\d+)\) world_rank=0", text))  # rank 0 of each worker group started
    assert len(groups) >= 2, "the worker group was not restarted after its node died"
    train_report = {
        "killed": killed,
        "at_s": round(at, 1),
        "checkpoint_step_at_kill": steps_at_kill,
        "resumed_at_step": resumed,
        "worker_groups_started": len(groups),
    }
    print(f"\nmultinode: {timings} tokenize {tokenize_report} train {train_report}")
