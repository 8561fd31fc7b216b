"""The Ray Train job end to end: 2 CPU workers (DDP), a worker failure and resume, S3 checkpoints, MLflow."""

import json

import pytest
import torch
from test_evaluate import DIM, tiny_codebook, write_pools, write_vocab

from pipeline.inputs.sources import SourceConfig
from pipeline.outputs.contracts import load_tokenizer
from pipeline.runtime.storage import resolve
from pipeline.steps.train import TrainJobConfig, preset_base, run_train_job
from spae.config import ConfigError, load_config, replace

TRAIN = SourceConfig(uri="mnist://train?limit=64", shard_size=32)
EVAL = SourceConfig(uri="mnist://test?limit=16", shard_size=16)


def job_overrides(tmp_path, storage: str, mlflow_uri: str, **extra) -> dict:
    """The key=value overrides (on the ``tiny`` preset) of a 6-step, 2-worker job on 64 MNIST images."""
    vocab = write_vocab(tmp_path / "vocab", tiny_codebook())
    return {
        "model.network.latent_dim": DIM,
        "data.images.uri": TRAIN.uri,
        "data.images.shard_size": TRAIN.shard_size,
        "data.pools": write_pools(tmp_path / "pools-train", TRAIN),
        "data.vocab": vocab,
        "data.eval.uri": EVAL.uri,
        "data.eval.shard_size": EVAL.shard_size,
        "data.eval_pools": write_pools(tmp_path / "pools-test", EVAL),
        "data.shuffle_buffer": 0,
        "optim.lr": 1e-3,
        "optim.warmup_steps": 0,
        "optim.cooldown_steps": 0,
        "steps": 6,
        "batch_size": 8,
        "checkpoint_every": 2,
        "log_every": 1,
        "eval_every": 3,
        "eval_images": 16,
        "picture_images": 4,
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "storage": storage,
        "name": "tiny-run",
        "mlflow.tracking_uri": mlflow_uri,
        "mlflow.experiment": "spae-train-test",
        **extra,
    }


def job_config(tmp_path, storage: str, mlflow_uri: str, **extra) -> TrainJobConfig:
    overrides = job_overrides(tmp_path, storage, mlflow_uri, **extra)
    return load_config(
        TrainJobConfig, overrides=[f"{k}={v}" for k, v in overrides.items()], base=preset_base("tiny")
    )


def test_presets_and_validation(tmp_path):
    cfg = load_config(
        TrainJobConfig, overrides=["steps=10", "optim.cooldown_steps=2"], base=preset_base("tiny")
    )
    with pytest.raises(ConfigError, match="cooldown_steps=200 exceeds"):
        load_config(TrainJobConfig, overrides=["steps=10"])
    assert cfg.model.image_size == 16 and cfg.optim.total_steps == 10  # the schedule ends with the job
    assert load_config(TrainJobConfig, base=preset_base("paper")).model.image_size == 128
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(TrainJobConfig, overrides=["batch_size=0"])
    with pytest.raises(ValueError, match="unknown SPAE preset"):
        preset_base("huge")


def test_job_entry_resolves_the_preset(capsys):
    from jobs.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["preset=tiny", "steps=10", "optim.cooldown_steps=0", "model.image_size=16", "--print-config"])
    assert exit_info.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["preset"] == "tiny" and printed["model"]["pyramid"]["latent_size"] == [4, 4]
    with pytest.raises(SystemExit) as exit_info:
        main(["preset=huge"])
    assert exit_info.value.code == 2


def test_train_job_ddp_failure_resume_s3_mlflow(ray_cluster, s3_prefix, mlflow_server, tmp_path):
    import mlflow

    cfg = job_config(
        tmp_path, s3_prefix, mlflow_server, fail_at_step=3, max_failures=1, register_model="spae-tiny"
    )
    result = run_train_job(cfg, log=lambda *_: None)
    assert result.steps == 6 and result.run_id

    # the worker failed before step 3 once; the group restarted from the step-2 checkpoint on S3
    run_dir = resolve(s3_prefix).join("tiny-run")
    assert run_dir.join("_fail_at_step_done").exists()
    files = [loc.path for loc in run_dir.list(recursive=True)]
    states = sorted(p for p in files if p.endswith("train_state/state.safetensors"))
    assert len(states) == 2  # keep_checkpoints=2 on S3: the step-4 and step-6 checkpoints remain
    assert any(p.endswith("tokenizer/model.safetensors") for p in files)

    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.tags["spae.resumed_at_step"] == "2"  # resumed, not restarted from zero
    assert run.data.params["steps"] == "6" and run.data.params["model.pyramid.latent_size"] == "[4, 4]"
    history = client.get_metric_history(result.run_id, "loss/total")
    steps = [m.step for m in history]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]  # one continuous history
    # steps up to the checkpoint are logged once; step 3 may be logged again after the restart
    assert all(steps.count(s) == 1 for s in (1, 2, 4, 5, 6)) and steps.count(3) in (1, 2)
    for key in ("w", "loss/reconstruction", "loss/semantic", "loss/gan", "eval/psnr/p3", "eval/relevance/l1"):
        assert key in run.data.metrics, key
    assert {m.step for m in client.get_metric_history(result.run_id, "eval/psnr/p4")} == {3, 6}
    top = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"pictures", "checkpoints"} <= top
    assert len(client.list_artifacts(result.run_id, "pictures")) == 2

    # the final checkpoint's loss history runs 1..6 across the restart
    with tempfile_dir() as tmp:
        ckpt = resolve(
            result.checkpoint if result.checkpoint.startswith("s3://") else f"s3://{result.checkpoint}"
        )
        history_file = ckpt.join("history.json")
        steps = [int(s) for s, _ in json.loads(history_file.read_text())]
        assert steps == [1, 2, 3, 4, 5, 6], tmp

    # a restarted job (same name + storage) resumes at the last checkpoint and continues the MLflow run
    again = run_train_job(
        replace(cfg, steps=7, eval_every=0, register_model="", optim={"total_steps": 0}), log=lambda *_: None
    )
    assert again.steps == 7 and again.run_id == result.run_id
    assert client.get_run(result.run_id).data.tags["spae.resumed_at_step"] == "6"
    assert 7 in {m.step for m in client.get_metric_history(result.run_id, "loss/total")}

    # the training went on, so the new weights are logged; re-running the finished job logs nothing more
    def logged_models() -> list:
        experiment = client.get_run(result.run_id).info.experiment_id
        models = mlflow.search_logged_models([experiment], output_format="list")
        return [m.model_id for m in models if m.source_run_id == result.run_id and m.name == "tokenizer"]

    assert len(logged_models()) == 2
    fingerprint = client.get_run(result.run_id).data.tags["spae.tokenizer_fingerprint"]
    assert fingerprint == load_tokenizer(again.tokenizer).fingerprint()
    rerun = run_train_job(
        replace(cfg, steps=7, eval_every=0, register_model="", optim={"total_steps": 0}), log=lambda *_: None
    )
    assert rerun.run_id == result.run_id and len(logged_models()) == 2
    assert client.get_run(result.run_id).data.tags["spae.resumed_at_step"] == "7"

    # the logged model loads and encodes, by run and by registry
    images = torch.rand(2, 3, 16, 16)
    for uri in (f"runs:/{result.run_id}/tokenizer", "models:/spae-tiny/1"):
        tok = load_tokenizer(uri)
        pyramid = tok.encode(images)
        assert len(tok.to_text(pyramid)) == 2 and pyramid.layer_ids(1).shape == (2, 1, 1)


def tempfile_dir():
    import tempfile

    return tempfile.TemporaryDirectory()
