"""Semantic scorers: open_clip (tiny random-weight config) and the MNIST label probe."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spae.scorers import (
    SIMPLE_TEMPLATES,
    LabelProbeScorer,
    ScorerConfig,
    build_scorer,
    describe_scorer,
    normalized_scores,
    prompt_templates,
    scorer_templates,
    token_text_features,
    train_label_probe,
)

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASS_WORDS = [[w, str(i)] for i, w in enumerate(DIGITS)]


def tiny_clip_dir(root: Path) -> str:
    """An open_clip ``local-dir:`` folder with the tiny config and no weights (random init)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    return f"local-dir:{root}"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    arch = tiny_clip_dir(tmp_path_factory.mktemp("tiny_clip"))
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        return build_scorer(ScorerConfig(kind="open_clip", arch=arch, device="cpu"))


def test_open_clip_shapes_normalisation_and_identity(tiny_clip) -> None:
    images = torch.rand(3, 3, 40, 50)  # any size: the scorer resizes and normalises itself
    feats = tiny_clip.embed_images(images)
    assert feats.shape == (3, 32) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    grey = tiny_clip.embed_images(images[:, :1])  # [b, 1, H, W] is repeated to 3 channels
    assert grey.shape == (3, 32)
    texts = tiny_clip.embed_texts(["a photo of a seven.", "7"])
    assert texts.shape == (2, 32)
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(2))
    ident = tiny_clip.identity
    assert ident["random_weights"] is True and "RANDOM WEIGHTS" in ident["weights"]
    assert ident["dim"] == 32 and ident["image_size"] == 32 and ident["precision"] == "fp32"
    assert tiny_clip.dim == 32


def test_open_clip_registered_arch_and_precision() -> None:
    """Any open_clip architecture name works, here a tiny one registered in _MODEL_CONFIGS; bf16 ~ fp32."""
    from open_clip import factory

    factory._MODEL_CONFIGS["spae-test-tiny"] = json.loads(json.dumps(TINY_CLIP))
    try:
        torch.manual_seed(1)
        with pytest.warns(UserWarning):
            fp32 = build_scorer(ScorerConfig(kind="open_clip", arch="spae-test-tiny", device="cpu"))
        with pytest.warns(UserWarning):
            bf16 = build_scorer(
                ScorerConfig(kind="open_clip", arch="spae-test-tiny", device="cpu", precision="bf16")
            )
        bf16.model.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.model.state_dict().items()})
        assert bf16.model.visual.conv1.weight.dtype == torch.bfloat16  # open_clip's low-precision layers
        assert bf16.identity["precision"] == "bf16"
        images, texts = torch.rand(4, 3, 32, 32), ["one", "two", "a photo of a cat."]
        for a, b in ((fp32.embed_images(images), bf16.embed_images(images)),
                     (fp32.embed_texts(texts), bf16.embed_texts(texts))):  # fmt: skip
            assert b.dtype == torch.float32
            assert (a * b).sum(-1).min() > 0.98  # cosine similarity of fp32 and bf16 features
    finally:
        factory._MODEL_CONFIGS.pop("spae-test-tiny", None)


def test_prompt_templates(tmp_path: Path) -> None:
    t80 = prompt_templates("imagenet80")
    assert len(t80) == 80 and all("{}" in t for t in t80)
    assert "a bad photo of a {}." in t80
    assert prompt_templates("simple") == list(SIMPLE_TEMPLATES)
    f = tmp_path / "t.txt"
    f.write_text("a drawing of {}.\n\n{} again\n")
    assert prompt_templates(str(f)) == ["a drawing of {}.", "{} again"]
    f.write_text("no placeholder\n")
    with pytest.raises(ValueError, match="placeholder"):
        prompt_templates(str(f))
    with pytest.raises(ValueError, match="imagenet80"):
        prompt_templates("nonexistent-spec")


def test_token_text_features_is_eq5(tiny_clip) -> None:
    words = ["seven", "7", "cat", "a b", "{x}"]
    templates = ["a photo of a {}.", "{}", "itap of the {}"]
    got = token_text_features(tiny_clip, words, templates, batch_size=4)  # several encoder calls
    assert got.shape == (5, 32)
    for i in (0, 3, 4):  # direct eq. 5: mean over templates of f_T(p_i(k)), one prompt at a time
        direct = torch.stack([tiny_clip.embed_texts([t.replace("{}", words[i])])[0] for t in templates]).mean(
            0
        )
        torch.testing.assert_close(got[i], direct, atol=1e-5, rtol=1e-5)
    assert (got.norm(dim=-1) < 1).all()  # a mean of unit vectors: eq. 5 is not re-normalised by default
    renorm = token_text_features(tiny_clip, words, templates, renormalize=True)
    torch.testing.assert_close(renorm, F.normalize(got, dim=-1), atol=1e-5, rtol=1e-5)


def test_normalized_scores_eq6_by_hand() -> None:
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # s' rows: [1, 0, -1] and [0.6, 0.8, -0.6]; eq. 6: (s' - min) / (max - min)
    expected = torch.tensor([[1.0, 0.5, 0.0], [1.2 / 1.4, 1.0, 0.0]])
    torch.testing.assert_close(normalized_scores(img, txt), expected)


# ----------------------------------------------------------------------------- label probe on MNIST


@pytest.fixture(scope="module")
def probe() -> LabelProbeScorer:
    from spae.data import load_mnist, mnist_images

    x, y = load_mnist("train")
    images, labels = mnist_images(x[:3000], size=32), torch.from_numpy(y[:3000].copy())
    return train_label_probe(images, labels, CLASS_WORDS, steps=300, seed=0, device="cpu")


@pytest.fixture(scope="module")
def mnist_test():
    from spae.data import load_mnist, mnist_images

    x, y = load_mnist("test")
    return mnist_images(x[:500], size=32), torch.from_numpy(y[:500].copy())


def test_label_probe_accuracy_and_embeddings(probe, mnist_test) -> None:
    images, labels = mnist_test
    assert probe.meta["accuracy"] >= 0.95, probe.meta["accuracy"]  # held out from the training images
    acc = float((probe.class_probs(images).argmax(-1) == labels).float().mean())
    print(f"label probe: held-out accuracy {probe.meta['accuracy']:.3f}, MNIST test[:500] {acc:.3f}")
    assert acc >= 0.93
    feats = probe.embed_images(images[:8])
    assert feats.shape == (8, 384)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(8))
    # embed_texts is the MiniLM sentence embedding, normalised
    t = probe.embed_texts(["seven", "a photo of a seven."])
    assert t.shape == (2, 384)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
    # class features: normalize(f'("seven") + f'("7")), f' of eq. 5 over the probe's templates
    f7 = token_text_features(probe, ["seven", "7"], probe.meta["templates"])
    torch.testing.assert_close(probe.class_features[7], F.normalize(f7.sum(0), dim=0), atol=1e-5, rtol=1e-5)


def test_label_probe_save_load_roundtrip(probe, mnist_test, tmp_path: Path) -> None:
    images, _ = mnist_test
    probe.save(tmp_path / "probe")
    assert sorted(p.name for p in (tmp_path / "probe").iterdir()) == ["probe.json", "probe.safetensors"]
    loaded = build_scorer(ScorerConfig(kind="label_probe", probe_path=str(tmp_path / "probe"), device="cpu"))
    assert isinstance(loaded, LabelProbeScorer)
    torch.testing.assert_close(
        loaded.embed_images(images[:64]), probe.embed_images(images[:64]), atol=0, rtol=0
    )
    torch.testing.assert_close(loaded.embed_texts(["seven"]), probe.embed_texts(["seven"]), atol=1e-6, rtol=0)
    assert loaded.identity["probe_sha256"] == probe.identity["probe_sha256"]
    assert (
        describe_scorer(ScorerConfig(kind="label_probe", probe_path=str(tmp_path / "probe")))["probe_sha256"]
        == probe.identity["probe_sha256"]
    )
    with pytest.raises(FileNotFoundError, match="probe.safetensors"):
        LabelProbeScorer.load(tmp_path / "missing")
    # the vocabulary's eq. 5 must use the templates the class features were built with
    path = str(tmp_path / "probe")
    assert scorer_templates(ScorerConfig(kind="label_probe", probe_path=path, templates="simple")) == list(
        SIMPLE_TEMPLATES
    )
    with pytest.raises(ValueError, match="scorer.templates='imagenet80'"):
        scorer_templates(ScorerConfig(kind="label_probe", probe_path=path, templates="imagenet80"))


def _mnist_codebook_words() -> list[str]:
    """MiniLM whole words, the first 4,096 in vocabulary order, with every number word and numeral."""
    from spae.codebook import (
        NUMBER_WORDS,
        filter_vocabulary,
        minilm_folder,
        read_word_list,
        resolve_blocklist,
    )

    tokens = (minilm_folder() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    ids = filter_vocabulary(
        tokens, top_n=4096, keep_words=read_word_list(NUMBER_WORDS), blocklist=resolve_blocklist("default")
    )
    return [tokens[i] for i in ids]


def test_label_probe_top_tokens_name_the_digit(probe, mnist_test) -> None:
    """Issue 4: the top-ranked tokens of most images of a digit include its word or numeral."""
    images, labels = mnist_test
    words = _mnist_codebook_words()
    assert len(words) == 4096 and {"seven", "7"} <= set(words)
    text = token_text_features(probe, words, probe.meta["templates"])  # [v, d] eq. 5
    img = probe.embed_images(images)  # [n, d]
    top_n = 3
    rates = {}
    for name, feats in (("eq. 5 as written", text), ("re-normalised", F.normalize(text, dim=-1))):
        s = normalized_scores(img, feats)  # [n, v] eq. 6
        top = s.topk(top_n, dim=1).indices  # [n, 3]
        hit = torch.tensor(
            [
                bool({words[j] for j in top[i].tolist()} & set(CLASS_WORDS[int(labels[i])]))
                for i in range(len(labels))
            ]
        )
        rates[name] = float(hit.float().mean())
        print(
            f"\n{name}: top-{top_n} tokens hold the digit's word or numeral for {rates[name]:.1%} of images"
        )
        print(f"{'digit':>5} {'images':>6} {'hit rate':>8}  most frequent top-{top_n} tokens")
        for c in range(10):
            rows = (labels == c).nonzero().flatten()
            counts = Counter(words[j] for i in rows.tolist() for j in top[i].tolist())
            common = ", ".join(f"{w} ({n})" for w, n in counts.most_common(5))
            print(f"{c:>5} {len(rows):>6} {float(hit[rows].float().mean()):>8.2f}  {common}")
    assert rates["eq. 5 as written"] >= 0.8


def test_features_from_prompt_tokens_equal_features_from_words(tiny_clip) -> None:
    from spae.scorers import prompt_token_ids, text_tokenizer

    words = ["seven", "7", "cat", "a b", "hello-", "'s"]
    templates = ["a photo of a {}.", "{}", "itap of the {}"]
    tokenizer = text_tokenizer(tiny_clip.cfg)  # built without the model (a CPU stage's tokenizer)
    ids = prompt_token_ids(tokenizer, words, templates)  # [v, t, context]
    assert ids.shape == (6, 3, 77)
    assert torch.equal(ids[3, 0], tiny_clip.tokenizer(["a photo of a a b."])[0])  # word-major, template-minor
    want = token_text_features(tiny_clip, words, templates, batch_size=4)
    got = token_text_features(tiny_clip, words, templates, batch_size=4, prompt_tokens=ids.to(torch.int32))
    assert torch.equal(got, want)  # the same prompts, the same encoder calls: the same bits
    with pytest.raises(ValueError, match="prompt_tokens"):
        token_text_features(tiny_clip, words[:2], templates, prompt_tokens=ids)
    assert text_tokenizer(ScorerConfig(kind="label_probe")) is None  # the probe tokenizes inside its encoder
