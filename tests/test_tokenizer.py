"""The tokenizer API: text round trips, tolerant parsing, save/load, codebook checks."""

import copy
import hashlib
import json
from dataclasses import replace

import pytest
import torch

from spae.codebook import FrozenCodebook
from spae.config import to_dict
from spae.losses import LossConfig
from spae.model import SPAE, preset
from spae.pyramid import PyramidConfig, PyramidSpec
from spae.tokenizer import SPAETokenizer, TokenPyramid, Vocabulary
from spae.training import OptimConfig, SPAETrainer

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "digit", "Seven7"]


def _codebook(v: int = 64, c: int = 384, seed: int = 0) -> FrozenCodebook:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(v, c, generator=g), dim=1)
    words = WORDS + [f"w{i}" for i in range(v - len(WORDS))]
    return FrozenCodebook.from_tensor(emb, words)


@pytest.fixture(scope="module")
def tok() -> SPAETokenizer:
    torch.manual_seed(0)
    return SPAETokenizer(SPAE(preset("tiny"), _codebook()))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_text_round_trip(tok, images):
    p = tok.encode(images)
    assert p.layers == (1, 2, 3, 4)
    assert [tuple(t.shape) for t in p.ids] == [(3, 1, 1), (3, 2, 2), (3, 4, 4), (3, 4, 4)]
    text = tok.to_text(p)
    assert len(text) == 3 and text[0].startswith("[L1] ") and " [L2] " in text[0]
    assert len(text[0].split()) == 4 + 1 + 4 + 16 + 16
    back, reports = tok.from_text(text)
    assert back == p and all(r.ok for r in reports)
    sub = tok.encode(images, layers=[1, 2])
    back2, _ = tok.from_text(sub.to_text(), layers=[1, 2])
    assert back2 == sub and back2.layers == (1, 2)
    assert sub.words(2)[0] == text[0].split()[3:7]
    # by default the missing layer 3 (the shallowest covering prefix) is filled, so the text decodes
    filled, reports = tok.from_text(sub.to_text())
    assert filled.layers == (1, 2, 3) and all(r.missing_layers == [3] for r in reports)
    assert filled.layer_ids(2).equal(sub.layer_ids(2)) and tok.decode(filled).shape == (3, 3, 16, 16)


def _pyramid_and_vocab():
    spec = PyramidSpec(PyramidConfig(latent_size=(4, 4), layer_sizes=((1, 1), (2, 2), (4, 4))))
    return spec, Vocabulary(WORDS)


def test_noisy_text_is_repaired_and_reported():
    spec, vocab = _pyramid_and_vocab()
    good = "[L1] seven [L2] one two three four [L3] " + " ".join(["nine"] * 16)
    ref, reports = TokenPyramid.from_text(good, vocab, spec)
    assert reports[0].ok
    # an unknown word (typo), a case change, punctuation: mapped to the nearest word and reported
    p, (r,) = TokenPyramid.from_text(
        good.replace("seven", "sevn").replace("two", "Two").replace("four", "four,"), vocab, spec
    )
    assert p == ref
    assert r.unknown_words == [("sevn", "seven"), ("Two", "two"), ("four,", "four")] and not r.ok
    # a missing word: padded from the coarser layer at the same place (layer 1's "seven")
    p, (r,) = TokenPyramid.from_text(
        "[L1] seven [L2] one two three [L3] " + " ".join(["nine"] * 16), vocab, spec
    )
    assert r.length_fixes == {2: (3, 4)}
    assert p.words(2) == [["one", "two", "three", "seven"]]
    # an extra word: cut
    p, (r,) = TokenPyramid.from_text(good.replace("four", "four five"), vocab, spec)
    assert p == ref and r.length_fixes == {2: (5, 4)}
    # a missing layer: filled from the layer above (nearest-neighbour upsampling of layer 2)
    p, (r,) = TokenPyramid.from_text("[L1] seven [L2] one two three four", vocab, spec, layers=[1, 2, 3])
    assert r.missing_layers == [3]
    assert p.layer_ids(3)[0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    # chatter before the first tag, a tag outside the pyramid
    p, (r,) = TokenPyramid.from_text("Sure! Here it is: " + good + " [L9] extra words", vocab, spec)
    assert p == ref and r.ignored_words == 6 and r.extra_layers == [9] and r.extra_tags == 1
    assert json.loads(json.dumps(r.to_dict()))["ok"] is False


def test_junk_text_never_raises():
    spec, vocab = _pyramid_and_vocab()
    for junk in [
        "",
        "   ",
        "!!! ??? ###",
        "[L] [L1 [ L 2 ] one",
        "[L0] one",
        "\x00\n\t ☃ 🙂",
        "[L2] two two",
    ]:
        p, (r,) = TokenPyramid.from_text(junk, vocab, spec)
        assert isinstance(p, TokenPyramid) and len(p.layers) >= 1
        assert all(int(t.max()) < len(vocab) for t in p.ids)
    # no tags: the serialized word stream, layer 1 first
    p, (r,) = TokenPyramid.from_text("seven one two three four", vocab, spec, layers=[1, 2])
    assert p.layers == (1, 2) and p.words(2) == [["one", "two", "three", "four"]] and r.ok
    # a batch whose texts reach different depths: one set of layers, the short ones padded; by default
    # up to the shallowest covering prefix (layer 3 here), so the pyramid decodes
    p, rs = TokenPyramid.from_text(["[L1] one", "[L1] two [L2] one one one one"], vocab, spec)
    assert p.layers == (1, 2, 3) and rs[0].missing_layers == [2, 3] and rs[1].missing_layers == [3]
    assert p.words(2)[0] == ["one"] * 4 and p.words(3)[1][:4] == ["one", "one", "one", "one"]


def test_fallback_word_ties_go_to_the_word_written_first():
    spec, vocab = _pyramid_and_vocab()
    for text, first in (("[L2] two one one two", "two"), ("[L2] one two two one", "one")):
        p, (r,) = TokenPyramid.from_text(text, vocab, spec)
        assert r.missing_layers == [1, 3] and p.words(1) == [[first]]


def test_from_text_of_layer_1_decodes_without_layers(tok):
    """docs/CORPUS.md: missing layers are filled by default, so one word decodes to an image."""
    p, (r,) = tok.from_text("[L1] seven")
    assert p.layers == (1, 2, 3) and r.missing_layers == [2, 3]
    assert all(w == ["seven"] * len(w) for l in p.layers for w in p.words(l))  # filled from layer 1
    out = tok.decode(p)
    torch.testing.assert_close(out, tok.decode(tok.from_text("[L1] seven", layers=[1, 2, 3])[0]))
    assert out.shape == (1, 3, 16, 16)
    empty, (r,) = tok.from_text("")  # the API decodes empty text (row 0 everywhere) and says so
    assert r.missing_layers == [1, 2, 3] and not r.ok and tok.decode(empty).shape == (1, 3, 16, 16)


def test_runaway_text_gives_a_bounded_report():
    spec, vocab = _pyramid_and_vocab()
    p, (r,) = TokenPyramid.from_text("[L3] seven " * 10_000, vocab, spec)
    assert r.extra_layers == [3] and r.extra_tags == 9_999 and r.ignored_words == 9_999
    assert r.length_fixes == {3: (1, 16)} and r.missing_layers == [1, 2]
    assert len(json.dumps(r.to_dict())) < 400
    typos = " ".join(f"sevn{i % 50}" for i in range(10_000))  # 10,000 unknown words, 50 distinct
    p, (r,) = TokenPyramid.from_text("[L1] one [L2] two [L3] " + typos, vocab, spec)
    summary = r.to_dict()
    assert summary["unknown_count"] == 16 and summary["unknown_distinct"] == 16  # the layer is cut at 16
    p, (r,) = TokenPyramid.from_text(typos, vocab, spec)  # untagged: the stream fills layers, rest ignored
    assert len(r.unknown_words) == 21 and r.ignored_words == 10_000 - 21
    p, (r,) = TokenPyramid.from_text("[L3] " + typos, vocab, spec, layers=[3])
    summary = r.to_dict(examples=3)
    assert summary["unknown_distinct"] == 16 and [w for w, _ in summary["unknown_words"]] == [
        "sevn0",
        "sevn1",
        "sevn2",
    ]
    assert all(to == "seven" for _, to in summary["unknown_words"]) and len(json.dumps(summary)) < 600


# The same noisy text must decode to the same ids in every process: no tie broken by set or hash order.
# A vocabulary of 3,000 pseudo-words makes ties common (many words share one bigram with a typo).
_SEEDED_PARSE = """
import json, random
from spae.pyramid import PyramidConfig, PyramidSpec
from spae.tokenizer import TokenPyramid, Vocabulary

rng = random.Random(0)
words = ["i", "him", "a", "the", "seven", "eight", "digit", "number", "handwritten", "am", "me", "my"]
seen = set(words)
while len(words) < 3000:
    w = "".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 8)))
    if w not in seen:
        seen.add(w)
        words.append(w)
vocab = Vocabulary(words)
spec = PyramidSpec(PyramidConfig(latent_size=(4, 4), layer_sizes=((1, 1), (2, 2), (4, 4))))
noisy = []
for w in words[12:400]:
    k = rng.randrange(len(w))
    noisy.append(w[:k] + rng.choice("xqzjkv") + w[k + 1 :])
head = "[L1] I'm [L2] Seven, eigth HIM? (digit) [L3] "
texts = [head + " ".join(noisy[i : i + 16]) for i in range(0, 384, 16)]
p, _ = TokenPyramid.from_text(texts, vocab, spec)
RESULT = {"ids": [t.tolist() for t in p.ids], "nearest": [vocab.nearest(w)[0] for w in noisy + ["I'm"]]}
print(json.dumps(RESULT))
"""


def test_same_text_same_ids_under_five_hash_seeds():
    import contextlib
    import io
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SEEDED_PARSE],
            env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": root},
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in (0, 1, 2, 3, 4)
    ]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    with contextlib.redirect_stdout(io.StringIO()):
        here: dict = {}
        exec(_SEEDED_PARSE, here)  # this process's hash seed too
    assert all(r == here["RESULT"] for r in results)
    assert len(set(here["RESULT"]["nearest"])) > 100  # the typos map to many different words


def test_vocabulary():
    vocab = Vocabulary(WORDS)
    assert vocab.id("seven") == 7 and vocab.word(7) == "seven"
    assert vocab.nearest("SEVEN") == (7, "seven")
    assert vocab.nearest("Seven7") == (11, "Seven7")  # exact match before case-insensitive
    assert vocab.nearest("eigth") == (8, "eight")
    with pytest.raises(KeyError):
        vocab.id("nope")
    with pytest.raises(ValueError, match="whitespace"):
        Vocabulary(["a", "b c"])
    with pytest.raises(ValueError, match="repeats"):
        Vocabulary(["a", "a"])


def test_decode_needs_a_covering_prefix(tok, images):
    p = tok.encode(images)
    out = tok.decode(p)
    assert out.shape == (3, 3, 16, 16) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    torch.testing.assert_close(tok.decode(p, 3), tok.decode(tok.encode(images, layers=[1, 2, 3])))
    with pytest.raises(ValueError, match=r"\[3, 4\]"):
        tok.decode(p, up_to_layer=2)
    with pytest.raises(ValueError, match=r"\[3, 4\]"):
        tok.decode(tok.encode(images, layers=[1, 2]))


def test_save_load_identical(tok, images, tmp_path):
    folder = tok.save_pretrained(tmp_path / "tok")
    assert {p.name for p in folder.iterdir()} == {
        "config.json",
        "model.safetensors",
        "codebook.safetensors",
        "codebook.json",
    }
    loaded = SPAETokenizer.from_pretrained(folder)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.codebook.hash == tok.codebook.hash
    p = tok.encode(images)
    assert loaded.encode(images) == p
    assert torch.equal(loaded.decode(p), tok.decode(p))
    # the same codebook object may be passed in; file:// URIs work too
    again = SPAETokenizer.from_pretrained(f"file://{folder}", codebook=_codebook())
    assert torch.equal(again.decode(p), tok.decode(p))
    meta = json.loads((folder / "config.json").read_text())
    assert meta["codebook_card"]["hash"] == tok.codebook.hash


def test_mismatched_codebook_is_refused(tok, tmp_path):
    folder = tok.save_pretrained(tmp_path / "tok")
    other = _codebook(seed=5)
    with pytest.raises(ValueError, match="codebook mismatch") as err:
        SPAETokenizer.from_pretrained(folder, codebook=other)
    assert tok.codebook.hash in str(err.value) and other.hash in str(err.value)
    with pytest.raises(FileNotFoundError):
        SPAETokenizer.from_pretrained(tmp_path / "nowhere")


def test_fingerprint_tracks_weights(tok):
    fp = tok.fingerprint()
    twin = SPAETokenizer(SPAE(preset("tiny"), _codebook()))
    twin.model.load_state_dict(tok.model.state_dict())
    assert twin.fingerprint() == fp
    with torch.no_grad():
        twin.model.decoder.conv_out.bias.add_(1e-3)
    assert twin.fingerprint() != fp


def test_training_and_search_settings_leave_the_fingerprint_and_config_alone(tok, tmp_path):
    """Two tokenizers with the same weights, trained under different loss settings, are one tokenizer:
    same fingerprint, same config.json. The search fields that never change the ids do not enter the
    fingerprint either; the search dtype does."""
    g = torch.Generator().manual_seed(2)
    batch = (
        torch.rand(2, 3, 16, 16, generator=g),
        torch.randint(0, 64, (2, 4), generator=g),
        torch.ones(2, 4),
    )
    trainers = [
        SPAETrainer(copy.deepcopy(tok.model), None, lcfg, OptimConfig(warmup_steps=0), "cpu")
        for lcfg in (
            LossConfig(semantic_layers=2, thresholds=(0.98, 0.95)),
            LossConfig(semantic_layers=1, thresholds=(0.9,), beta=1.0, gan_weight=0.0, codebook_weight=2.0),
        )
    ]
    for t in trainers:
        t.step(*batch)  # the loss lives with the trainer
    trainers[1].core.load_state_dict(trainers[0].core.state_dict())  # the same weights
    saved = []
    for name, t in zip("ab", trainers, strict=True):
        twin = SPAETokenizer(t.core)
        saved.append(
            (twin.fingerprint(), (twin.save_pretrained(tmp_path / name) / "config.json").read_text())
        )
    assert saved[0] == saved[1]
    assert "loss" not in json.loads(saved[0][1])["config"]

    def with_quantizer(**changes):
        cfg = replace(tok.config, quantizer=replace(tok.config.quantizer, **changes))
        twin = SPAETokenizer(SPAE(cfg, _codebook()))
        twin.model.load_state_dict(tok.model.state_dict())
        return twin.fingerprint()

    assert with_quantizer(search_chunk=7, search="chunked") == tok.fingerprint()
    assert with_quantizer(search_dtype="bfloat16") != tok.fingerprint()


def _old_fingerprint(config: dict, tok: SPAETokenizer) -> str:
    """The fingerprint as earlier versions computed it: the whole config dict as saved, the codebook hash,
    the weights."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(tok.codebook.hash.encode())
    for name, t in sorted(tok._weights().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def test_an_older_folder_with_a_loss_key_loads_and_keeps_its_fingerprint(tok, images, tmp_path):
    """A folder written while the loss was part of SPAEConfig: the key is ignored, and the fingerprint is
    the one recorded there (corpora tokenized with it resume), also after saving it again."""
    folder = tok.save_pretrained(tmp_path / "old")
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["loss"] = to_dict(LossConfig(semantic_layers=2, thresholds=(0.98, 0.95)))
    del meta["config"]["quantizer"]["search"]  # not a field back then
    meta["fingerprint"] = _old_fingerprint(meta["config"], tok)
    (folder / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    assert meta["fingerprint"] != tok.fingerprint()

    old = SPAETokenizer.from_pretrained(folder)
    assert old.config == tok.config
    assert old.fingerprint() == meta["fingerprint"]
    assert old.encode(images) == tok.encode(images)
    again = SPAETokenizer.from_pretrained(old.save_pretrained(tmp_path / "again"))
    assert again.fingerprint() == meta["fingerprint"]
    assert json.loads((tmp_path / "again" / "config.json").read_text())["fingerprint"] == meta["fingerprint"]


def test_a_folder_written_before_global_context_keeps_its_fingerprint(tok, images, tmp_path):
    """A folder whose config lacks a field added since (network.global_context, default off) loads with the
    default and hashes its config as recorded: the same fingerprint, also after saving it again."""
    folder = tok.save_pretrained(tmp_path / "before")
    meta = json.loads((folder / "config.json").read_text())
    del meta["config"]["network"]["global_context"]
    meta["fingerprint"] = _old_fingerprint(meta["config"], tok)
    (folder / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    assert meta["fingerprint"] != tok.fingerprint()
    old = SPAETokenizer.from_pretrained(folder)
    assert old.config == tok.config and not old.config.network.global_context
    assert old.fingerprint() == meta["fingerprint"] and old.encode(images) == tok.encode(images)
    again = SPAETokenizer.from_pretrained(old.save_pretrained(tmp_path / "again"))
    assert again.fingerprint() == meta["fingerprint"]
    assert (
        SPAETokenizer.from_pretrained(tok.save_pretrained(tmp_path / "now")).fingerprint()
        == tok.fingerprint()
    )


def test_global_context_starts_as_no_change_and_learns_from_every_position():
    from spae.networks import Encoder, NetworkConfig

    torch.manual_seed(0)
    cfg = NetworkConfig.preset("tiny", global_context=True)
    enc, plain = Encoder(cfg), Encoder(replace(cfg, global_context=False))
    plain.load_state_dict({k: v for k, v in enc.state_dict().items() if not k.startswith("context.")})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc(x), plain(x))  # zero-initialised: no change at the start
    enc(x)[..., -1, -1].sum().backward()  # one corner position's output
    assert enc.context.weight.grad.abs().sum() > 0  # reaches the map of the mean over all positions
    assert {"context.weight", "context.bias"} <= set(
        enc.state_dict()
    ) and "context.weight" not in plain.state_dict()


def test_global_context_is_refused_for_clips():
    from spae.config import replace
    from spae.model import preset

    with pytest.raises(ValueError, match="network.global_context is for images"):
        replace(preset("tiny3d"), network={"global_context": True})
