"""The word probe (several words per image, ``spae.scorers.WordProbeScorer``) on colour scenes: its held-out
mAP, its word directions, its pools against a float64 computation of eq. 4-6, and the pool job's wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vocab_helpers import write_hand_vocab

from pipeline.inputs.images import DecodeOptions, decode_batch, to_float
from pipeline.inputs.sources import SourceConfig, list_shards, read_shard
from pipeline.steps.pools import PoolsJobConfig, PoolStage, PoolStageConfig, ensure_probe
from pipeline.steps.search import SearchConfig
from pipeline.steps.vocab import load_vocab
from spae.codebook import CodebookConfig, load_codebook
from spae.scenes import WORDS, SceneConfig, scenes, word_matrix
from spae.scorers import (
    ScorerConfig,
    WordProbeScorer,
    build_scorer,
    describe_scorer,
    mean_average_precision,
    prompt_templates,
    token_text_features,
    train_word_probe,
    word_directions,
)

SIZE, K, RHO = 32, 24, 0.9


@pytest.fixture(scope="module")
def contrast_words() -> list[str]:
    return list(load_codebook(CodebookConfig(top_n=400)).words)


@pytest.fixture(scope="module")
def probe(contrast_words) -> WordProbeScorer:
    batch = scenes("train", 0, 600, SceneConfig(size=SIZE))
    x = torch.from_numpy(to_float(batch.images))
    y = torch.from_numpy(word_matrix([s.words for s in batch.scenes]))
    return train_word_probe(
        x, y, WORDS, steps=250, image_size=SIZE, width=16, device="cpu", contrast_words=contrast_words
    )


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, list[tuple[str, ...]]]:
    batch = scenes("test", 0, 64, SceneConfig(size=SIZE))
    return torch.from_numpy(to_float(batch.images)), [s.words for s in batch.scenes]


def test_mean_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.1, 0.2]])
    targets = torch.tensor([[1, 0], [0, 0], [1, 1]])
    # word 0: hits at ranks 1 and 3 -> (1 + 2/3) / 2; word 1: its hit ranks 2nd -> 1/2
    assert mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
    assert mean_average_precision(torch.zeros(2, 1), torch.zeros(2, 1)) != 0.5  # nan: no positives


def test_the_word_probe_learns_the_words_and_records_its_held_out_map(probe, held_out):
    x, words = held_out
    chance = float(torch.from_numpy(word_matrix(words)).mean())  # a random ranking's mAP, about
    test_map = mean_average_precision(probe.logits(x), torch.from_numpy(word_matrix(words)))
    assert min(probe.meta["map"], test_map) > chance + 0.3, (probe.meta["map"], test_map, chance)
    assert probe.identity["kind"] == "word_probe" and probe.words == list(WORDS)


def test_word_directions_score_each_probe_word_exactly_and_keep_the_contrast_low(probe):
    g = probe.class_features.cpu().double()  # [w, d]
    feats = token_text_features(probe, list(WORDS), prompt_templates("simple")).double()  # eq. 5
    np.testing.assert_allclose((g @ feats.T).numpy(), np.eye(len(WORDS)), atol=1e-3)
    # s'(I, w) of the probe's words is p(w | I), up to the image feature's norm
    x = torch.from_numpy(to_float(scenes("test", 0, 4, SceneConfig(size=SIZE)).images))
    s = probe.embed_images(x).double() @ feats.T  # [4, w]
    p = probe.class_probs(x).double()
    np.testing.assert_allclose(
        (s / s.norm(dim=1, keepdim=True)).numpy(), (p / p.norm(dim=1, keepdim=True)).numpy(), atol=1e-3
    )
    a = torch.randn(3, 8, dtype=torch.float64)
    c = torch.randn(50, 8, dtype=torch.float64)
    d = word_directions(a, c, ridge=0.0).double()
    np.testing.assert_allclose((d @ a.T).numpy(), np.eye(3), atol=1e-4)
    # least energy over the contrast: any other exact solution (d + a null direction) scores it higher
    null = torch.linalg.svd(a).Vh[-1]  # a.T-orthogonal direction
    worse = d + 0.5 * null
    assert ((worse @ c.T) ** 2).sum() > ((d @ c.T) ** 2).sum()


def test_save_load_keeps_the_features_and_the_identity(probe, tmp_path, held_out):
    probe.save(tmp_path / "p")
    cfg = ScorerConfig(kind="word_probe", probe_path=str(tmp_path / "p"), device="cpu")
    loaded = build_scorer(cfg)
    assert isinstance(loaded, WordProbeScorer)
    x, _ = held_out
    torch.testing.assert_close(loaded.embed_images(x), probe.embed_images(x))
    ident = describe_scorer(cfg)
    assert ident["kind"] == "word_probe" and ident["map"] == probe.meta["map"]


def test_pools_equal_eq_4_to_6_in_float64_and_hold_several_true_words(probe, tmp_path, contrast_words):
    path = tmp_path / "probe"
    probe.save(path)
    cfg = ScorerConfig(kind="word_probe", probe_path=str(path), templates="simple", device="cpu")
    vocab = list(dict.fromkeys([*WORDS, *contrast_words]))
    text = token_text_features(probe, vocab, prompt_templates("simple")).numpy()  # [v, d] eq. 5
    write_hand_vocab(str(tmp_path / "vocab"), cfg, len(vocab), words=vocab, features=text)
    source = SourceConfig(uri=f"scenes://test?limit=48&size={SIZE}")
    table = read_shard(list_shards(source)[0])
    rows = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    batch = decode_batch(rows, DecodeOptions(SIZE))
    batch = {**batch, "shard_id": np.array(["00000"] * 48)}
    stage = PoolStage(PoolStageConfig(cfg, str(tmp_path / "vocab"), SearchConfig(backend="torch"), K, RHO))
    out = stage(batch)

    # eq. 4-6 in float64 over the whole vocabulary
    f = probe.embed_images(torch.from_numpy(to_float(batch["pixels"]))).double().numpy()  # [b, d]
    t = load_vocab(str(tmp_path / "vocab")).text_features.double().numpy()  # [v, d] (stored float16)
    s = f @ t.T  # [b, v]  s'(I, k)
    lo, hi = s.min(axis=1), s.max(axis=1)
    norm = (s - lo[:, None]) / (hi - lo)[:, None]  # eq. 6
    ids = np.argsort(-s, axis=1, kind="stable")[:, :K]
    top = np.take_along_axis(norm, ids, axis=1)
    np.testing.assert_allclose(out["s_min"], lo, atol=1e-5)
    np.testing.assert_allclose(out["s_max"], hi, atol=1e-5)
    np.testing.assert_allclose(out["topk_scores"], top, atol=1e-4)
    same = (out["topk_ids"] == ids).mean()
    assert same > 0.97  # near-ties of float32 vs float64 may swap neighbours
    np.testing.assert_array_equal(out["n_above_min_threshold"], (top >= RHO).sum(axis=1))

    # several true words per image pass rho = 0.9 (eq. 4), and most of what passes is true
    true_words = [set(ws) for ws in _words(source, batch)]
    passed = [{vocab[j] for j, sc in zip(ids[i], top[i], strict=True) if sc >= RHO} for i in range(48)]
    hits = np.array([len(p & w) for p, w in zip(passed, true_words, strict=True)])
    sizes = np.array([len(p) for p in passed])
    assert hits.mean() >= 3 and hits.sum() / sizes.sum() > 0.6, (hits.mean(), hits.sum() / sizes.sum())


def _words(source: SourceConfig, batch: dict) -> list[tuple[str, ...]]:
    from pipeline.inputs.sources import image_words

    return image_words(source, list(batch["image_id"]))


def test_a_missing_word_probe_is_trained_on_the_words_of_the_scenes(tmp_path, monkeypatch, probe):
    seen = {}

    def fake_train(images, targets, words, **kwargs):
        seen.update(images=images, targets=targets, words=words, **kwargs)
        return probe

    monkeypatch.setattr("pipeline.steps.pools.train_word_probe", fake_train)
    scorer = ScorerConfig(kind="word_probe", probe_path=str(tmp_path / "wp"))
    cfg = PoolsJobConfig(
        scorer=scorer,
        probe_train_uri="scenes://train?limit=12&size=32",
        probe_steps=5,
        image_size=32,
        probe_contrast_words=50,
    )
    messages: list[str] = []
    assert ensure_probe(cfg, log=messages.append) is True
    assert "training it on scenes://train?limit=12&size=32 (12 images, 27 words, 5 steps)" in messages[0]
    assert (tmp_path / "wp" / "probe.json").is_file() and "held-out mAP" in messages[1]
    expected = scenes("train", 0, 12, SceneConfig(size=32))
    np.testing.assert_array_equal(seen["targets"].numpy(), word_matrix([s.salience for s in expected.scenes]))
    assert 0.2 < seen["targets"][seen["targets"] > 0].min() < seen["targets"].max() == 1.0  # soft: salience
    np.testing.assert_allclose(seen["images"].numpy(), to_float(expected.images))
    assert list(seen["words"]) == list(WORDS) and len(seen["contrast_words"]) == 50
    assert ensure_probe(cfg, log=messages.append) is False
    with pytest.raises(ValueError, match="does not say each image's words"):
        ensure_probe(
            PoolsJobConfig(
                scorer=ScorerConfig(kind="word_probe", probe_path=str(tmp_path / "x")),
                probe_train_uri="mnist://train?limit=4",
            )
        )
