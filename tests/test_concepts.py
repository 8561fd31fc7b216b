"""Concept recall / precision per layer (``spae.concepts``), by hand and through ``evaluate_tokenizer`` on
colour scenes."""

from __future__ import annotations

import pytest
import torch

from pipeline.inputs.images import DecodeOptions
from pipeline.inputs.sources import SourceConfig
from pipeline.steps.evaluate import format_metrics
from pipeline.steps.evaluator import evaluate_tokenizer, load_eval_data
from spae.codebook import FrozenCodebook
from spae.concepts import ConceptTally, concept_metrics
from spae.config import replace
from spae.model import preset
from spae.scenes import WORDS as SCENE_WORDS
from spae.scenes import SceneConfig, scene_layout
from spae.tokenizer import SPAETokenizer

VOCAB = ["red", "star", "two", "left", "Blue", "circle", "filler"]


def test_recall_precision_and_key_words_by_hand():
    # one image, words (key first): red star, two, left, blue, circle
    words = [("red", "star", "two", "left", "blue", "circle")]
    layer1 = torch.tensor([[0]])  # red
    layer2 = torch.tensor([[1, 6, 6, 4]])  # star filler filler Blue (case-insensitive)
    m = concept_metrics([layer1, layer2], words, VOCAB)
    assert m["concept_recall/l1"] == pytest.approx(1 / 6)
    assert m["concept_precision/l1"] == 1.0
    assert m["concept_recall/l2"] == pytest.approx(2 / 6) and m["concept_precision/l2"] == pytest.approx(
        2 / 4
    )
    assert m["concept_recall/p2"] == pytest.approx(3 / 6) and m["concept_precision/p2"] == pytest.approx(
        3 / 5
    )
    assert m["key_words/p1"] == 0.0 and m["key_words/p2"] == 1.0  # red + star by layer 2


def test_the_tally_averages_over_images_and_batches():
    tally = ConceptTally(VOCAB, 1)
    tally.update([torch.tensor([[0], [6]])], [("red", "star"), ("blue", "circle")])
    tally.update([torch.tensor([[5]])], [("circle",)])
    m = tally.compute()
    assert m["concept_recall/l1"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert m["concept_precision/l1"] == pytest.approx(2 / 3)
    assert m["key_words/p1"] == pytest.approx(1 / 3)  # only the third image has all its key words


def test_evaluate_reports_concepts_for_scenes_and_not_for_mnist():
    torch.manual_seed(0)
    words = [*SCENE_WORDS, *[f"filler{i}" for i in range(5)]]
    codebook = FrozenCodebook.from_tensor(torch.randn(len(words), 16), tokens=words, words=words)
    tok = SPAETokenizer.from_config(replace(preset("tiny"), network={"latent_dim": 16}), codebook)
    source = SourceConfig(uri="scenes://test?limit=10&size=16", shard_size=6)
    data = load_eval_data(source, DecodeOptions(16))
    assert data.words == [scene_layout("test", i, SceneConfig(size=16)).words for i in range(10)]
    m = evaluate_tokenizer(tok, data, batch_size=4)
    expected = concept_metrics(_layer_ids(tok, data.images), data.words, tok.vocabulary.words)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key
    assert 0 <= m["concept_recall/p4"] <= 1 and m["concept_recall/p4"] >= m["concept_recall/p1"]
    assert "concept_recall" in format_metrics(m) and "key_words" in format_metrics(m)
    mnist = load_eval_data(SourceConfig(uri="mnist://test?limit=4"), DecodeOptions(16))
    assert mnist.words is None
    assert not any(k.startswith("concept") for k in evaluate_tokenizer(tok, mnist, batch_size=4))


def _layer_ids(tok: SPAETokenizer, images: torch.Tensor) -> list[torch.Tensor]:
    pyramid = tok.encode(images)
    return [pyramid.layer_ids(l) for l in range(1, tok.pyramid.num_layers + 1)]
