"""The tokenizer API: text round trips, tolerant parsing, save/load, codebook checks."""

import json

import pytest
import torch

from spae.codebook import FrozenCodebook
from spae.model import SPAE, preset
from spae.pyramid import PyramidConfig, PyramidSpec
from spae.tokenizer import SPAETokenizer, TokenPyramid, Vocabulary

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
    back2, _ = tok.from_text(sub.to_text())
    assert back2 == sub and back2.layers == (1, 2)
    assert sub.words(2)[0] == text[0].split()[3:7]


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
    assert p == ref and r.ignored_words == 6 and r.extra_layers == [9]
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
    p, (r,) = TokenPyramid.from_text("seven one two three four", vocab, spec)
    assert p.layers == (1, 2) and p.words(2) == [["one", "two", "three", "four"]] and r.ok
    # a batch whose texts reach different depths: one set of layers, the short one padded
    p, rs = TokenPyramid.from_text(["[L1] one", "[L1] two [L2] one one one one"], vocab, spec)
    assert p.layers == (1, 2) and rs[0].missing_layers == [2] and rs[1].ok
    assert p.words(2)[0] == ["one"] * 4


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
