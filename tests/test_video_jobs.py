"""Video through the jobs: pools, tokenize and decode on Moving MNIST via the local Ray cluster and S3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from vocab_helpers import write_hand_vocab

from pipeline.inputs.sources import SourceConfig
from pipeline.inputs.video import clip_gif, clip_npy
from pipeline.outputs.shards import read_errors, read_manifest, read_output
from pipeline.runtime.tracking import MlflowConfig
from pipeline.steps.pools import PoolsJobConfig, PoolStage, PoolStageConfig, ensure_probe, run_pools_job
from pipeline.steps.search import SearchConfig
from pipeline.steps.tokenize import TokenizeJobConfig, run_tokenize_job
from spae.codebook import FrozenCodebook
from spae.data import MNIST_CLASS_WORDS
from spae.model import SPAE, preset
from spae.scorers import LabelProbeScorer, ProbeNet, ScorerConfig
from spae.tokenizer import SPAETokenizer
from spae.video import MovingMnistConfig, clips_to_float, clips_to_uint8, moving_mnist

V, K = 50, 5
SMALL = "frames=4&size=16&digit_size=8"  # 4 frames of 16x16: the tiny3d model's clips
META = {
    "class_words": [[w, str(i)] for i, w in enumerate(MNIST_CLASS_WORDS)],
    "text_encoder": {"name": "minilm", "dim": 384, "weights_sha256": "none"},
    "templates": ["{}"],
    "accuracy": None,
    "image_size": 32,
    "width": 8,
    "renormalize_text": False,
}


@pytest.fixture(scope="module")
def probe_cfg(tmp_path_factory) -> ScorerConfig:
    """A hand-built label probe (random CNN and class features), saved like a trained one."""
    torch.manual_seed(0)
    probe = LabelProbeScorer(ProbeNet(10, width=8, image_size=32), torch.randn(10, 384), META, device="cpu")
    path = tmp_path_factory.mktemp("probe") / "probe"
    probe.save(path)
    return ScorerConfig(kind="label_probe", probe_path=str(path), templates="simple")


def _write_vocab(uri: str, scorer: ScorerConfig) -> None:
    write_hand_vocab(uri, scorer, V, digest="hand-built")


def test_clip_pools_average_sampled_frame_features(probe_cfg, tmp_path):
    """The Ray-free stage: a clip's feature is the renormalised mean of its sampled frames' features."""
    _write_vocab(str(tmp_path / "vocab"), probe_cfg)
    clips = moving_mnist("test", 0, 3, MovingMnistConfig(frames=8, size=32)).clips  # [3, 8, 32, 32]
    pixels = np.repeat(clips[..., None], 3, axis=-1)  # [3, 8, 32, 32, 3]
    batch = {
        "pixels": pixels,
        "error": np.array([None] * 3, dtype=object),
        "image_id": np.array(["a", "b", "c"]),
    }
    stage = PoolStage(
        PoolStageConfig(
            probe_cfg, str(tmp_path / "vocab"), SearchConfig(backend="torch"), K, 0.5, sample_frames=4
        )
    )
    out = stage(batch)
    probe = LabelProbeScorer.load(probe_cfg.probe_path, device="cpu")
    frames = clips_to_float(clips[:, [1, 3, 5, 7]].reshape(12, 32, 32)[:, None])  # the 4 sampled frames
    f = probe.embed_images(frames[:, :, 0]).reshape(3, 4, -1).mean(1)
    want = F.normalize(f, dim=1).numpy()
    np.testing.assert_allclose(out["image_feature"].astype(np.float32), want, atol=2e-3)
    assert out["topk_ids"].shape == (3, K)


def test_probe_trains_on_moving_mnist_frames_with_clip_labels(tmp_path, monkeypatch):
    seen = {}

    def fake_train(images, labels, class_words, **kwargs):
        seen.update(images=images, labels=labels, class_words=class_words)
        return LabelProbeScorer(ProbeNet(10, width=8), torch.randn(10, 384), META)

    monkeypatch.setattr("pipeline.steps.pools.train_label_probe", fake_train)
    scorer = ScorerConfig(kind="label_probe", probe_path=str(tmp_path / "probe"))
    uri = "moving-mnist://train?limit=5&frames=8"
    cfg = PoolsJobConfig(scorer=scorer, probe_train_uri=uri, probe_steps=3, sample_frames=2)
    assert ensure_probe(cfg, log=lambda _: None) is True
    want = moving_mnist("train", 0, 5, MovingMnistConfig(frames=8))
    assert tuple(seen["images"].shape) == (10, 3, 32, 32)  # 5 clips x 2 sampled frames
    assert seen["labels"].tolist() == np.repeat(want.labels[:, 0], 2).tolist()
    np.testing.assert_allclose(seen["images"][1, 0].numpy(), want.clips[0, 6] / 255.0)  # frames 2 and 6
    assert seen["class_words"][3] == ["three", "3"]


def test_pools_on_a_video_folder_with_corrupt_files_via_ray_on_s3(
    ray_cluster, probe_cfg, tmp_path, s3_prefix
):
    clips = moving_mnist("test", 0, 4, MovingMnistConfig(frames=8, size=32)).clips
    root = tmp_path / "videos"
    root.mkdir()
    for i, c in enumerate(clips[:3]):
        (root / f"clip{i}.npy").write_bytes(clip_npy(c))
    (root / "clip3.gif").write_bytes(clip_gif(np.repeat(clips[3][..., None], 3, axis=-1)))
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 40)
    (root / "short.gif").write_bytes(clip_gif(np.repeat(clips[0][:2, ..., None], 3, axis=-1)))
    vocab, output = f"{s3_prefix}/vocab", f"{s3_prefix}/pools"
    _write_vocab(vocab, probe_cfg)
    cfg = PoolsJobConfig(
        source=SourceConfig(uri=str(root), shard_size=3), vocab=vocab, scorer=probe_cfg, top_k=K,
        min_threshold=0.5, output=output, frames=8, image_size=32, batch_size=4,
        search=SearchConfig(backend="torch"), progress=False, max_error_fraction=0.5,  # 2 of 6 bad on purpose
        mlflow=MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"),
    )  # fmt: skip
    result = run_pools_job(cfg, log=lambda _: None)
    manifest = read_manifest(output)
    assert (manifest["rows_in"], manifest["rows_written"], manifest["errors"]) == (6, 4, 2)
    errors = {r["image_id"]: r["reason"] for r in read_errors(output).to_pylist()}
    assert errors["short.gif"] == "too short: 2 frames < 8" and errors["broken.mp4"].startswith("undecodable")
    table = read_output(output)
    by_id = {r["image_id"]: r for r in table.to_pylist()}
    assert set(by_id) == {"clip0.npy", "clip1.npy", "clip2.npy", "clip3.gif"}
    norms = [np.linalg.norm(np.asarray(r["image_feature"], np.float32)) for r in by_id.values()]
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    assert result.run.shards_run == 2


@pytest.fixture(scope="module")
def video_tokenizer(tmp_path_factory) -> str:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cb = FrozenCodebook.from_tensor(
        F.normalize(torch.randn(16, 384, generator=g), dim=1), [f"w{i}" for i in range(16)]
    )
    model = SPAE(preset("tiny3d"), cb)
    model.match_latent_to_codebook(
        clips_to_float(moving_mnist("train", 0, 4, MovingMnistConfig(frames=4, size=16, digit_size=8)).clips)
    )
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    SPAETokenizer(model).save_pretrained(path)
    return str(path)


def test_tokenize_and_decode_moving_mnist_via_ray_on_s3(ray_cluster, video_tokenizer, s3_prefix, tmp_path):
    from jobs.decode import DecodeConfig, run_decode
    from pipeline.outputs.corpus import read_corpus

    source = SourceConfig(uri=f"moving-mnist://test?limit=5&{SMALL}", shard_size=3)
    corpus = f"{s3_prefix}/corpus"
    cfg = TokenizeJobConfig(
        source=source, tokenizer=video_tokenizer, output=corpus, batch_size=4, roundtrip_sample=3,
        progress=False, mlflow=MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"),
    )  # fmt: skip
    result = run_tokenize_job(cfg)
    assert (result.manifest["rows_in"], result.manifest["rows_written"], result.manifest["errors"]) == (
        5,
        5,
        0,
    )
    assert result.metrics["roundtrip/ids_match"] == 1.0 and result.metrics["roundtrip/text_match"] == 1.0
    assert result.metrics["roundtrip/psnr"] > 0
    table = read_corpus(corpus)
    rows = sorted(table.to_pylist(), key=lambda r: r["image_id"])
    tok = SPAETokenizer.from_pretrained(video_tokenizer)
    gen = moving_mnist("test", 0, 5, MovingMnistConfig(frames=4, size=16, digit_size=8))
    fresh = tok.encode(clips_to_float(gen.clips))
    assert [len(rows[0][f"tokens_l{l}"]) for l in (1, 2, 3, 4)] == [1, 4, 32, 32]
    for b, r in enumerate(rows):  # serialization order over (t, h, w), as the library gives it
        assert r["tokens_l3"] == fresh.layer_ids(3)[b].reshape(-1).tolist()
        assert r["text"] == fresh.to_text()[b] and r["label"] == int(gen.labels[b, 0])

    out = tmp_path / "decoded"
    done = run_decode(DecodeConfig(corpus=corpus, image_ids=(rows[1]["image_id"],), output=str(out), scale=2))
    assert len(done) == 1 and done[0].png.endswith(".gif") and done[0].prefix == 4
    gif = Image.open(out / f"{rows[1]['image_id']}.gif")
    assert gif.size == (32, 32) and gif.n_frames >= 1
    want = clips_to_uint8(tok.decode(fresh))[1]  # [T, 16, 16, 3]
    first = np.asarray(gif.convert("RGB"))[::2, ::2]
    assert np.abs(first.astype(int) - want[0]).max() <= 8  # GIF palette quantization
    report = json.loads((out / "decode_report.json").read_text())
    assert report["images"][0]["origin"] == f"corpus:{rows[1]['image_id']}"
