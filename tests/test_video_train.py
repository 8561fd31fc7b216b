"""Video through train and evaluate: the perceptual loss and PSNR over frames, the Ray train job on
Moving MNIST clips (Discriminator3D, S3 checkpoints), then ``spae evaluate`` on its tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_evaluate import DIM, WORDS, tiny_codebook, write_pools, write_vocab

from pipeline.inputs.images import DecodeOptions
from pipeline.inputs.sources import SourceConfig
from pipeline.outputs.contracts import load_tokenizer
from pipeline.runtime.storage import resolve
from pipeline.steps.evaluate import EvaluateJobConfig, run_evaluate
from pipeline.steps.evaluator import class_token_rows, class_words, evaluate_tokenizer, load_eval_data
from pipeline.steps.train import (
    TRAIN_STATE,
    TrainJobConfig,
    build_discriminator,
    check_data,
    preset_base,
    run_train_job,
)
from spae.checkpoint import CONFIG_JSON, STATE_JSON, STATE_TENSORS, load_train_state
from spae.config import load_config, replace
from spae.losses import PerceptualLoss
from spae.metrics import psnr
from spae.model import preset
from spae.networks3d import Discriminator3D
from spae.tokenizer import SPAETokenizer
from spae.video import frames_as_images

CLIPS = "frames=4&size=16"  # the tiny3d model's clips: 4 frames of 16x16
TRAIN = SourceConfig(uri=f"moving-mnist://train?limit=16&{CLIPS}", shard_size=8)
TEST = SourceConfig(uri=f"moving-mnist://test?limit=6&{CLIPS}", shard_size=6)


def random_vgg(path) -> str:
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, path)
    return str(path)


def tiny3d_tokenizer() -> SPAETokenizer:
    torch.manual_seed(0)
    return SPAETokenizer.from_config(replace(preset("tiny3d"), network={"latent_dim": DIM}), tiny_codebook())


def test_perceptual_loss_of_a_clip_is_the_mean_over_its_frames(tmp_path):
    loss_fn = PerceptualLoss(random_vgg(tmp_path / "vgg16.pth"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 3, 16, 16, generator=g) * 2 - 1  # [b, 3, T, H, W]
    y = torch.rand(2, 3, 3, 16, 16, generator=g) * 2 - 1
    per_frame = [loss_fn(x[:, :, t], y[:, :, t]) for t in range(3)]  # each the mean over the batch
    assert loss_fn(x, y).item() == pytest.approx(torch.stack(per_frame).mean().item(), rel=1e-5)
    assert loss_fn(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_evaluate_tokenizer_on_clips_averages_over_frames(tmp_path):
    tok = tiny3d_tokenizer()
    data = load_eval_data(TEST, DecodeOptions.for_model(tok.config), write_pools(tmp_path / "pools", TEST))
    assert tuple(data.images.shape) == (6, 3, 4, 16, 16) and data.frames == 4
    rows = class_token_rows(class_words(data), tok.vocabulary.words)  # MNIST words: first digit's label

    class Recorder:  # stands in for spae.metrics.OptionalMetrics: what it is given
        def __init__(self):
            self.shapes = []

        def update(self, real, fake):
            self.shapes.append((tuple(real.shape), tuple(fake.shape)))

        def compute(self):
            return {"fvd": 1.5}

    optional = Recorder()
    m = evaluate_tokenizer(tok, data, torch.zeros(len(WORDS), 8), rows, batch_size=4, optional=optional)
    assert (m["clips"], m["frames_per_clip"]) == (6, 4) and "images" not in m
    assert optional.shapes == [((4, 3, 4, 16, 16),) * 2, ((2, 3, 4, 16, 16),) * 2] and m["fvd/p4"] == 1.5
    pyramid = tok.encode(data.images)
    for l in tok.pyramid.covering_layers:  # by hand: PSNR of each of the 24 frames, averaged
        recon = tok.decode(pyramid, up_to_layer=l)
        want = psnr(frames_as_images(recon), frames_as_images(data.images)).mean()
        assert m[f"psnr/p{l}"] == pytest.approx(float(want), abs=1e-3)
    top = pyramid.layer_ids(1).reshape(-1)
    hits = sum(int(t) in rows[int(lab)] for t, lab in zip(top, data.labels, strict=True))
    assert m["label_word_accuracy/l1"] == pytest.approx(hits / 6)


def test_fvd_is_refused_for_an_image_tokenizer(tmp_path):
    from test_evaluate import tiny_tokenizer

    (tmp_path / "i3d.pt").write_bytes(b"unused")
    cfg = EvaluateJobConfig(
        tokenizer="unused", optional_metrics=("fvd",), weights={"fvd": str(tmp_path / "i3d.pt")}
    )
    with pytest.raises(ValueError, match="fvd is a video metric"):
        run_evaluate(cfg, tokenizer=tiny_tokenizer())


def test_video_model_gets_discriminator3d_and_refuses_an_image_source(tmp_path):
    model = replace(preset("tiny3d"), network={"latent_dim": DIM})
    disc = build_discriminator(model)
    assert isinstance(disc, Discriminator3D)
    assert disc(torch.zeros(2, 3, 4, 16, 16)).dim() == 5  # patch logits over (t, h, w)
    cfg = load_config(
        TrainJobConfig,
        overrides=[f"data.vocab={tmp_path}", f"data.pools={tmp_path}", "steps=2", "optim.cooldown_steps=0"],
        base=preset_base("tiny3d"),
    )
    with pytest.raises(ValueError, match="takes clips of 4 frames"):
        check_data(cfg)  # the default source is mnist://train: images


def train_config(tmp_path, storage: str, **extra) -> TrainJobConfig:
    overrides = {
        "model.network.latent_dim": DIM,
        "loss.perceptual_weights": random_vgg(tmp_path / "vgg16.pth"),  # on clips: per frame
        "data.images.uri": TRAIN.uri,
        "data.images.shard_size": TRAIN.shard_size,
        "data.pools": write_pools(tmp_path / "pools-train", TRAIN),
        "data.vocab": write_vocab(tmp_path / "vocab", tiny_codebook()),
        "data.eval.uri": TEST.uri,
        "data.eval.shard_size": TEST.shard_size,
        "data.eval_pools": write_pools(tmp_path / "pools-test", TEST),
        "data.shuffle_buffer": 0,
        "optim.lr": 1e-3,
        "optim.warmup_steps": 0,
        "optim.cooldown_steps": 0,
        "steps": 4,
        "batch_size": 4,
        "checkpoint_every": 2,
        "log_every": 1,
        "eval_every": 0,  # at the end only
        "eval_images": 6,
        "picture_images": 2,
        "log_checkpoints": False,
        "num_workers": 1,
        "storage": storage,
        "name": "tiny3d-run",
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        **extra,
    }
    return load_config(
        TrainJobConfig, overrides=[f"{k}={v}" for k, v in overrides.items()], base=preset_base("tiny3d")
    )


def test_train_tiny3d_on_moving_mnist_via_ray_on_s3_then_evaluate(ray_cluster, s3_prefix, tmp_path, capsys):
    import mlflow

    from jobs.evaluate import main as evaluate_main

    cfg = train_config(tmp_path, s3_prefix)
    assert cfg.model.num_frames == 4 and cfg.loss.gan_weight > 0
    result = run_train_job(cfg, log=lambda *_: None)
    m = result.metrics
    assert result.steps == 4
    for key in ("loss/gan", "loss/perceptual", "loss/semantic", "eval/clips", "eval/label_word_accuracy/l1"):
        assert key in m, key
    assert m["eval/frames_per_clip"] == 4 and all(math.isfinite(m[f"eval/psnr/p{l}"]) for l in (3, 4))

    # the tokenizer on S3 loads and encodes clips into the 3-axis pyramid
    tok = load_tokenizer(result.tokenizer)
    clips = torch.rand(2, 3, 4, 16, 16)
    pyramid = tok.encode(clips)
    assert [tuple(pyramid.layer_ids(l).shape) for l in (1, 2, 3)] == [
        (2, 1, 1, 1),
        (2, 1, 2, 2),
        (2, 2, 4, 4),
    ]
    assert tuple(tok.decode(pyramid).shape) == (2, 3, 4, 16, 16)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    assert "pictures" in {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}

    # the final checkpoint on S3 holds the 3D discriminator (a resume loads it as for images)
    ckpt = resolve(f"s3://{result.checkpoint.removeprefix('s3://')}").join(TRAIN_STATE)
    local = tmp_path / "ckpt"
    for name in (STATE_TENSORS, STATE_JSON, CONFIG_JSON):
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(ckpt.join(name).read_bytes())
    state, saved_cfg = load_train_state(local)
    assert state["step"] == 4 and saved_cfg["model"]["num_frames"] == 4
    assert state["discriminator"]["net.0.weight"].dim() == 5  # Conv3d [c, 3, 3, 4, 4]

    # spae evaluate on held-out clips, output on S3
    out = f"{s3_prefix}/eval"
    rc = evaluate_main(
        [
            f"tokenizer={result.tokenizer}",
            f"source.uri={TEST.uri}",
            f"pools={tmp_path / 'pools-test'}",
            f"vocab={tmp_path / 'vocab'}",
            "picture_images=2",
            f"output={out}",
            "mlflow.enabled=false",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and "6 clips of 4 frames" in printed and "evaluate: 6 clips" in printed
    saved = json.loads(resolve(out).join("metrics.json").read_text())
    assert (
        all(math.isfinite(saved[f"psnr/p{l}"]) for l in (3, 4)) and 0 <= saved["label_word_accuracy/l1"] <= 1
    )
    assert (saved["clips"], saved["frames_per_clip"]) == (6, 4) and 0 <= saved["relevance/l1"] <= 1
    assert len(resolve(out).join("reconstructions.png").read_bytes()) > 1000
