"""Connect to Ray once per process: a local cluster by default, or ``address`` / ``$RAY_ADDRESS``."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

log = logging.getLogger(__name__)

# Settings (never credentials) handed to the workers of a local cluster we start. Ray writes a
# runtime_env, env_vars included, in plain text into session_*/logs/runtime_env_agent.log: a secret must
# never go there. Workers of a local cluster inherit the driver's environment (credentials included)
# through the raylet; workers of a remote cluster get them from the cluster (a Kubernetes Secret, an
# instance role) or read a credentials file themselves (AWS_SHARED_CREDENTIALS_FILE: a path, no secret).
ENV_ALLOWLIST = (
    "SPAE_S3_ENDPOINT",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "HF_HUB_OFFLINE",
)
# a variable whose name contains one of these is a credential: never in a runtime_env
SECRET_MARKERS = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "CREDENTIAL", "SESSION", "API_KEY")
CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # "" = $RAY_ADDRESS, else a new local cluster; "auto" = the running local one
    num_cpus: int | None = None  # local cluster only
    num_gpus: int | None = None  # local cluster only
    include_dashboard: bool = False  # local cluster only


# Ray Train's placement-group cleaner asks the State API (served by the dashboard) every second whether
# the controller lives; without a dashboard each ask logs a warning, hundreds in one training run
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def is_secret_name(name: str) -> bool:
    """A credential by its name (``AWS_SECRET_ACCESS_KEY``, ``RAY_AUTH_TOKEN``, ``OPENAI_API_KEY``...).

    ``AWS_SHARED_CREDENTIALS_FILE`` names a file, not a secret."""
    upper = name.upper()
    return not upper.endswith(("_FILE", "_PATH")) and any(m in upper for m in SECRET_MARKERS)


def worker_env() -> dict[str, str]:
    """The allowlisted variables that are set here, for ``runtime_env={"env_vars": ...}``; no secret."""
    env = {name: os.environ[name] for name in ENV_ALLOWLIST if os.environ.get(name)}
    assert not any(is_secret_name(n) for n in env), "a credential in the runtime_env allowlist"
    return env


def local_runtime_env(include_dashboard: bool = False) -> dict:
    """The runtime environment of a local cluster we start: the allowlisted variables, and without a
    dashboard a worker setup hook that silences the placement-group cleaner's State API warnings."""
    env: dict = {"env_vars": worker_env()}
    if not include_dashboard:
        env["worker_process_setup_hook"] = f"{__name__}.quiet_placement_group_cleaner"
    return env


def quiet_placement_group_cleaner() -> None:
    """Worker setup hook (``local_runtime_env``): the cleaner's warnings only, errors still show."""
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def init_ray(cfg: RayConfig | None = None) -> None:
    """``ray.init`` once; an unreachable address fails within seconds with a message naming it."""
    import ray

    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address and address != "auto":
        _check_reachable(address)  # also when already connected: a wrong address is an error, not ignored
    if ray.is_initialized():
        return
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting a local Ray cluster (its workers inherit this environment)")
        ray.init(
            address="local",  # never attach silently to another cluster on this machine
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            include_dashboard=cfg.include_dashboard,
            runtime_env=local_runtime_env(cfg.include_dashboard),
        )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True


def _check_reachable(address: str) -> None:
    """Fail fast on ``host:port`` / ``ray://host:port`` / ``http://host:port`` that nobody serves."""
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ValueError(f"Ray address {address!r} is not of the form host:port, ray://host:port or 'auto'")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}); is the head running? "
            "Leave the address empty to start a local cluster."
        ) from e
