"""Check what a job will need before it starts Ray, in seconds: each failure is one line naming the URI.

``check(cfg, needs)`` walks a job config: the MLflow tracking server (a remote ``http(s)://`` URI answers
a REST call within ``MLFLOW_TIMEOUT_S``), every output URI (S3: the endpoint answers, the credentials are
accepted, a probe object is written and deleted; local: the nearest existing folder is writable), every
input URI (readable and present) and the GPUs asked for (on a local cluster). The first failure raises
``PreflightError`` with one line; the full detail goes to the log at debug level.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.runtime.storage import check_access, resolve
from pipeline.runtime.tracking import check_tracking_server

log = logging.getLogger(__name__)

BUILT_IN_SCHEMES = ("mnist://", "mnist-shifted://", "moving-mnist://", "scenes://", "runs:/", "models:/")
MLFLOW_TIMEOUT_S = 3.0
PROBE_NAME = "_spae-preflight-"


class PreflightError(RuntimeError):
    """A job cannot start: one line naming the config key, the URI and the problem."""


@dataclass(frozen=True)
class JobNeeds:
    """What a job's config names, as dotted keys: the URIs it writes and reads, the GPUs it asks for."""

    outputs: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    gpus: Callable[[Any], float] | None = None  # cfg -> GPUs one worker / actor needs to start (0 = none)
    mlflow: bool = True  # the job logs to MLflow as its ``mlflow`` config (tracking_uri, enabled) says
    early: bool = True  # also check the raw config file + overrides (False where the config itself
    # rejects remote URIs, so that its error, not the pre-flight's, is what the user sees)


def check(cfg: Any, needs: JobNeeds) -> None:
    """Raise ``PreflightError`` (one line) on the first thing the job would fail on; quiet otherwise.

    ``cfg`` is the job's typed config, or the nested dict of its config file and overrides (checked before
    the job's module, which imports torch, is loaded; values left to the defaults are not there).
    """
    if needs.mlflow and _get(_get(cfg, "mlflow"), "enabled", True) is not False:
        uri = _value(cfg, "mlflow.tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI", "")
        _guard("mlflow.tracking_uri", lambda: check_tracking_server(uri, MLFLOW_TIMEOUT_S))
    for key in needs.outputs:
        uri = _value(cfg, key)
        if uri:
            _guard(key, lambda uri=uri: check_output(uri))
    for key in needs.inputs:
        uri = _value(cfg, key)
        if uri and not uri.startswith(BUILT_IN_SCHEMES):
            _guard(key, lambda uri=uri: check_input(uri), uri)
    wanted = needs.gpus(cfg) if needs.gpus and not isinstance(cfg, Mapping) else 0
    if wanted > 0:
        ray_cfg = getattr(cfg, "ray", None)
        _guard("gpus", lambda: check_gpus(wanted, ray_cfg))


def check_output(uri: str) -> None:
    """The job can write under ``uri``: S3 gets a probe object written and deleted."""
    loc = resolve(uri)
    check_access(loc, write=True)
    if loc.is_s3:
        existed = loc.exists()
        probe = loc.join(f"{PROBE_NAME}{uuid.uuid4().hex[:12]}")
        probe.write_bytes(b"")
        probe.delete()
        if not existed and loc.exists() and not loc.list():  # a server that keeps folders (SeaweedFS)
            loc.delete()


def check_input(uri: str) -> None:
    loc = resolve(uri)
    if loc.is_s3:
        check_access(loc, write=False)
    if not loc.exists():
        raise FileNotFoundError(f"{loc.uri} does not exist")


def check_gpus(wanted: float, ray_cfg: Any) -> None:
    """A local cluster must have ``ceil(wanted)`` GPUs; a remote cluster (an address) is not checked here."""
    address = (getattr(ray_cfg, "address", "") or os.environ.get("RAY_ADDRESS", "")) if ray_cfg else ""
    if address:
        return
    declared = getattr(ray_cfg, "num_gpus", None) if ray_cfg else None
    have = declared if declared is not None else visible_gpus()
    need = math.ceil(wanted)
    if have < need:
        raise PreflightError(
            f"{need} GPU(s) asked for, {have} on this machine (ray.num_gpus / CUDA_VISIBLE_DEVICES); "
            "ask for none (CPU) or run on a GPU machine / cluster (ray.address)"
        )


def visible_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    import torch  # lazy: jobs.cli runs the pre-flight before a job module loads torch (seconds)

    return torch.cuda.device_count()


def _get(node: Any, key: str, default: Any = None) -> Any:
    if isinstance(node, Mapping):
        return node.get(key, default)
    return getattr(node, key, default)


def _value(cfg: Any, dotted: str) -> str:
    value: Any = cfg
    for part in dotted.split("."):
        value = _get(value, part)
    return value if isinstance(value, str) else ""


def _guard(key: str, fn: Callable[[], None], uri: str = "") -> None:
    """Run one check; any failure becomes a one-line ``PreflightError`` naming ``key`` (and ``uri``)."""
    try:
        fn()
    except FileNotFoundError as e:
        log.debug("preflight %s failed", key, exc_info=True)
        raise PreflightError(f"{key}={uri} does not exist" if uri else f"{key}: {_one_line(e)}") from e
    except Exception as e:  # StorageError, ConnectionError, botocore's...: one line each
        log.debug("preflight %s failed", key, exc_info=True)
        raise PreflightError(f"{key}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
