from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from pipeline.runtime.tracking import MlflowConfig, log_params_flat, resolve_tracking_uri, start_run


@dataclass(frozen=True)
class Storage:
    uri: str = "s3://bucket/run"
    secret_key: str = "do-not-log"


@dataclass(frozen=True)
class JobCfg:
    lr: float = 0.001
    api_token: str = "hidden"
    storage: Storage = field(default_factory=Storage)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(MlflowConfig(), str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(MlflowConfig(), str(tmp_path)) == "http://env:5000"
    assert resolve_tracking_uri(MlflowConfig(tracking_uri="http://cfg:1"), str(tmp_path)) == "http://cfg:1"


def test_disabled_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with start_run(MlflowConfig(enabled=False), "r", str(tmp_path)) as run:
        assert run is None
    assert not (tmp_path / "mlflow.db").exists()


def test_run_param_metric_artifact_round_trip_and_resume(mlflow_server, tmp_path):
    cfg = MlflowConfig(tracking_uri=mlflow_server, experiment="spae-test-tracking")
    with start_run(cfg, "job-a", str(tmp_path), tags={"stage": "train"}) as run:
        logged = log_params_flat(JobCfg())
        mlflow.log_metric("loss", 0.5, step=1)
        (tmp_path / "note.txt").write_text("pyramid")
        mlflow.log_artifact(str(tmp_path / "note.txt"), artifact_path="notes")
        run_id = run.info.run_id
    assert logged == {"lr": "0.001", "storage.uri": "s3://bucket/run"}  # secrets skipped

    with start_run(cfg, "job-a", str(tmp_path)) as again:  # a restarted job continues the same run
        assert again.info.run_id == run_id
        mlflow.log_metric("loss", 0.25, step=2)
    with start_run(cfg, "job-b", str(tmp_path)) as other:
        assert other.info.run_id != run_id

    client = MlflowClient(mlflow_server)
    data = client.get_run(run_id).data
    assert data.params == {"lr": "0.001", "storage.uri": "s3://bucket/run"}
    assert data.tags["spae.run_name"] == "job-a" and data.tags["stage"] == "train"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 0.5), (2, 0.25)]
    local = client.download_artifacts(run_id, "notes/note.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "pyramid"


def test_resumed_run_keeps_params_and_tags_a_changed_value(tmp_path):
    import mlflow

    from pipeline.runtime.tracking import MlflowConfig, log_params_flat, start_run

    cfg = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with start_run(cfg, "job-a", str(tmp_path)) as run:
        log_params_flat({"steps": 10, "threads": 1})
    with start_run(cfg, "job-a", str(tmp_path)) as again:
        assert again.info.run_id == run.info.run_id
        log_params_flat({"steps": 10, "threads": 2, "new_key": "x"})  # MLflow alone would refuse this
    data = mlflow.get_run(run.info.run_id).data
    assert data.params == {"steps": "10", "threads": "1", "new_key": "x"}
    assert data.tags["spae.rerun_param.threads"] == "2"
