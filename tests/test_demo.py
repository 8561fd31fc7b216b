"""`spae demo`'s plan: the stage configs it writes for MNIST and for Moving MNIST, and its CLI checks."""

from __future__ import annotations

import pytest

from jobs.cli import main
from jobs.demo import DemoConfig, stages, validate


def _by_name(cfg: DemoConfig) -> dict[str, dict]:
    return {stage.name: stage.config for stage in stages(cfg)}


def test_moving_mnist_plan_trains_the_video_preset_on_clips(tmp_path):
    cfg = DemoConfig(
        output=str(tmp_path), dataset="moving-mnist", use_gpu=True, track=False, probe_steps=2000
    )
    plan = stages(cfg)
    validate(plan)  # every stage's typed config builds (the train stage from the moving-mnist preset)
    c = _by_name(cfg)
    assert c["train"]["preset"] == "moving-mnist" and c["train"]["use_gpu"] is True
    assert c["train"]["data"]["images"]["uri"] == "moving-mnist://train?limit=20000&frames=16&digits=1"
    assert c["train"]["data"]["eval"]["uri"] == "moving-mnist://test?limit=1000&frames=16&digits=1"
    for name in ("probe", "pools (train)", "pools (test)"):
        assert c[name]["frames"] == 16  # the pool job decodes clips of the preset's length
    assert c["probe"]["probe_train_uri"] == "moving-mnist://train?limit=5000&frames=16&digits=1"
    assert c["probe"]["probe_steps"] == 2000
    assert c["tokenize"]["num_gpus_per_actor"] == 1.0 and c["evaluate"]["device"] == "cuda"
    assert c["train"]["mlflow"]["enabled"] is False and c["evaluate"]["mlflow"]["enabled"] is False
    assert "evaluate (shifted)" not in c  # the shifts are of still digits


def test_mnist_plan_is_the_image_demo(tmp_path):
    c = _by_name(DemoConfig(output=str(tmp_path)))
    assert c["train"]["preset"] == "mnist" and c["train"]["use_gpu"] is False
    assert c["train"]["data"]["images"]["uri"] == "mnist://train?limit=20000"
    assert "frames" not in c["pools (train)"] and "device" not in c["evaluate"]
    assert c["train"]["mlflow"]["enabled"] is True
    shifted = c["evaluate (shifted)"]  # the tokenizer off its training distribution, per shift
    assert shifted["source"]["uri"] == "mnist-shifted://test?limit=900" and shifted["limit"] == 900
    assert shifted["tokenizer"] == c["evaluate"]["tokenizer"] and shifted["output"].endswith("demo-shifted")
    assert "evaluate (shifted)" not in _by_name(DemoConfig(output=str(tmp_path), shifted_images=0))
    validate(stages(DemoConfig(output=str(tmp_path))))


def test_stop_after_an_unknown_stage_fails_naming_the_stages(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", f"output={tmp_path}", "stop_after=training"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "stop_after='training'" in err and "probe, vocab, pools, train, evaluate" in err


def test_summary_names_scene_labels_as_labels_and_digits_as_digits(capsys):
    from jobs.demo import print_summary

    base = {
        "metrics": {"psnr/p5": 20.0},
        "top_layer_words": [("scenes-test-000000", 3, "red")],
        "timings_s": {"train": 1.0},
        **{k: "x" for k in ("corpus", "report", "tokenizer", "mlflow", "log")},
    }
    print_summary({**base, "dataset": "scenes"})
    scenes = capsys.readouterr().out
    assert "held-out scenes" in scenes and "label 3: 'red'" in scenes and "digit" not in scenes
    print_summary({**base, "dataset": "mnist"})
    assert "digit 3: 'red'" in capsys.readouterr().out
