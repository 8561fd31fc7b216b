"""MLflow for every job: one run per run name, resumed on restart, params without secrets.

With no tracking URI configured, runs go to a local SQLite store (no server needed) that
``mlflow ui --backend-store-uri sqlite:///.../mlflow.db`` opens.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spae.config import flatten

RUN_NAME_TAG = "spae.run_name"
# A key is secret when one of its dotted parts names a credential ("api_token", "secret_key", ...);
# "max_tokens" or "tokenizer" are not.
SECRET_PATTERN = re.compile(r"secret|password|passwd|credential|api_?key|access_?key|(^|_)token$")
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (characters)


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<output dir>/mlflow.db
    experiment: str = "spae"
    enabled: bool = True


def tracking_dir(output: str) -> str:
    """Where the default local MLflow store goes: beside a local output, else ./outputs."""
    return str(Path(output).expanduser().resolve().parent) if "://" not in output else "outputs"


def configured_tracking_uri(cfg: MlflowConfig) -> str:
    """``cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else "" (the local default store)."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")


def resolve_tracking_uri(cfg: MlflowConfig, default_dir: str) -> str:
    configured = configured_tracking_uri(cfg)
    if configured:
        return configured
    path = Path(default_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def check_tracking_server(uri: str, timeout_s: float = 3.0) -> None:
    """A remote ``http(s)://`` tracking server answers one REST call within ``timeout_s``, or
    ``ConnectionError`` naming it (MLflow's own client retries for minutes). Other URIs: nothing to reach.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import base64
    import json
    import urllib.error
    import urllib.request

    shown = _without_userinfo(uri)
    request = urllib.request.Request(
        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
        data=json.dumps({"max_results": 1}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    elif user and password:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ConnectionError(
                f"the MLflow server at {shown} refused the credentials (HTTP {e.code}); "
                "check MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
            ) from e
        raise ConnectionError(
            f"the MLflow server at {shown} answered HTTP {e.code} to experiments/search; "
            "is it an MLflow tracking server?"
        ) from e
    except (OSError, ValueError) as e:  # URLError, timeouts, refused connections
        reason = getattr(e, "reason", None) or e
        raise ConnectionError(
            f"cannot reach the MLflow tracking server at {shown} within {timeout_s:.0f} s ({reason}); "
            "is it running? (mlflow.tracking_uri / $MLFLOW_TRACKING_URI, or mlflow.enabled=false)"
        ) from e


def _without_userinfo(uri: str) -> str:
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.username is None and parsed.password is None:
        return uri
    return parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")).geturl()


def find_run_id(client: Any, experiment_id: str, run_name: str) -> str | None:
    """The id of the newest run tagged ``spae.run_name == run_name``, or None."""
    escaped = run_name.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{escaped}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


@contextmanager
def start_run(
    cfg: MlflowConfig,
    run_name: str,
    default_dir: str,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Resume the run named ``run_name`` in ``cfg.experiment`` or create it; yields the ActiveRun.

    ``cfg.enabled=False`` yields None and logs nothing.
    """
    if not cfg.enabled:
        yield None
        return
    import mlflow

    uri = resolve_tracking_uri(cfg, default_dir)
    mlflow.set_tracking_uri(uri)
    _create_experiment(cfg.experiment, uri)
    experiment = mlflow.set_experiment(cfg.experiment)
    run_id = find_run_id(mlflow.MlflowClient(), experiment.experiment_id, run_name)
    all_tags = {RUN_NAME_TAG: run_name, **(tags or {})}
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, tags=all_tags)
    else:
        run = mlflow.start_run(run_name=run_name, experiment_id=experiment.experiment_id, tags=all_tags)
    with run:
        yield run


def _create_experiment(name: str, uri: str) -> None:
    """A local SQLite store keeps its artifacts beside the database, not in ``./mlruns`` of the cwd."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not uri.startswith("sqlite:///") or mlflow.get_experiment_by_name(name) is not None:
        return
    artifacts = Path(uri[len("sqlite:///") :]).parent / "mlartifacts"
    with contextlib.suppress(MlflowException):  # created meanwhile by another process
        mlflow.create_experiment(name, artifact_location=artifacts.as_uri())


def is_secret(key: str) -> bool:
    return any(SECRET_PATTERN.search(part) for part in key.lower().split("."))


def log_params_flat(cfg: Any, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Log a config dataclass or dict as flat ``a.b`` params (no secrets, not ``skip``); returns them.

    A resumed run keeps its params (MLflow refuses to change one): new keys are added and a changed value
    is recorded as a ``spae.rerun_param.<key>`` tag instead.
    """
    import mlflow

    params = {}
    for key, value in flatten(cfg, prefix).items():
        if is_secret(key) or key in skip:
            continue
        params[key] = str(value)[:MAX_PARAM_VALUE]
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run is not None else {}
    new = {k: v for k, v in params.items() if k not in existing}
    if new:
        mlflow.log_params(new)
    changed = {f"spae.rerun_param.{k}": v for k, v in params.items() if k in existing and existing[k] != v}
    if changed:
        mlflow.set_tags(changed)
    return params
