"""The frozen language codebook: filters, display text, card hash, Parquet, MiniLM loader."""

from __future__ import annotations

import pytest
import torch

from spae.codebook import (
    DEFAULT_BLOCKLIST,
    NUMBER_WORDS,
    CodebookConfig,
    FrozenCodebook,
    display_text,
    filter_vocabulary,
    load_codebook,
    open_vocabulary,
    read_word_list,
)

VOCAB = [
    "[PAD]",  # 0 special
    "[unused3]",  # 1 special
    "the",  # 2
    "##ing",  # 3 continuation
    "seven",  # 4
    "a",  # 5 length 1
    "7",  # 6 length 1
    "tab\tx",  # 7 not printable
    "shit",  # 8 on the default blocklist
    "<s>",  # 9 special
    "cat",  # 10
    "##s",  # 11 continuation
    "Cat",  # 12 another display text (case-sensitive uniqueness)
    "dog",  # 13
]


def test_display_text_strips_markers():
    assert [display_text(t) for t in ["##ing", "▁cat", "Ġdog", "plain", "##", "▁"]] == [
        "ing",
        "cat",
        "dog",
        "plain",
        "##",
        "",
    ]


def test_default_filters_drop_special_continuations_unprintable():
    ids = filter_vocabulary(VOCAB)
    assert ids == [2, 4, 5, 6, 8, 10, 12, 13]


def test_min_length_blocklist_keep_words_and_top_n(tmp_path):
    block = tmp_path / "block.txt"
    block.write_text("# comment\nSHIT\ndog\n")
    blocked = read_word_list(block)
    assert blocked == ["SHIT", "dog"]
    assert filter_vocabulary(VOCAB, min_length=2, blocklist=blocked) == [2, 4, 10, 12]
    # keep words bypass every filter, including min_length and the blocklist
    assert filter_vocabulary(VOCAB, min_length=2, blocklist=blocked, keep_words=("7", "dog")) == [
        2,
        4,
        6,
        10,
        12,
        13,
    ]
    # top_n counts forced words first, then the first survivors in vocabulary order
    assert filter_vocabulary(VOCAB, min_length=2, keep_words=("7", "dog"), top_n=4) == [2, 4, 6, 13]
    assert filter_vocabulary(VOCAB, top_n=3) == [2, 4, 5]


def test_keep_list_is_exclusive_and_words_are_deduplicated():
    assert filter_vocabulary(VOCAB, keep_list=["cat", "seven", "[PAD]", "ing"]) == [4, 10, 12]
    assert filter_vocabulary(VOCAB, keep_list=["cat", "7"], min_length=2, keep_words=["7"]) == [6, 10, 12]
    # without dropping continuations, "##s"/"s" and "##ing"/"ing" would share display texts: first wins
    ids = filter_vocabulary(["s", "##s", "##ing", "ing", "x"], drop_continuations=False)
    assert ids == [0, 2, 4]


def test_sentencepiece_continuations():
    vocab = ["<unk>", "▁the", "re", "▁cat", "s", "▁", "<0x0A>"]
    assert filter_vocabulary(vocab) == [1, 3]
    assert filter_vocabulary(vocab, drop_continuations=False) == [1, 2, 3, 4]


def test_shipped_word_lists():
    assert read_word_list(NUMBER_WORDS) == [
        *["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
        *"0123456789",
    ]
    assert "fuck" in read_word_list(DEFAULT_BLOCKLIST)


def _tiny() -> FrozenCodebook:
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    return FrozenCodebook.from_tensor(emb, ["▁cat", "##dog", "Ġbird"], llm_ids=[7, 8, 9])


def test_from_tensor_words_card_and_frozen():
    cb = _tiny()
    assert cb.words == ["cat", "dog", "bird"] and cb.llm_ids == [7, 8, 9]
    assert len(cb) == 3 and cb.dim == 2 and cb.card["size"] == 3 and cb.card["dim"] == 2
    assert not cb.embeddings.requires_grad
    assert list(cb.parameters()) == [] and "embeddings" not in cb.state_dict()
    assert cb.word_to_row["bird"] == 2
    with pytest.raises(ValueError, match="unique"):
        FrozenCodebook.from_tensor(torch.zeros(2, 2), ["cat", "##cat"])


def test_hash_changes_with_one_value_and_with_tokens():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    base = FrozenCodebook.from_tensor(emb, ["a", "b", "c"]).hash
    assert FrozenCodebook.from_tensor(emb.clone(), ["a", "b", "c"]).hash == base
    changed = emb.clone()
    changed[2, 1] = 0.5000001
    assert FrozenCodebook.from_tensor(changed, ["a", "b", "c"]).hash != base
    assert FrozenCodebook.from_tensor(emb, ["a", "b", "d"]).hash != base


def test_parquet_round_trip(tmp_path):
    cb = _tiny()
    cb.to_parquet(tmp_path / "cb.parquet")
    back = FrozenCodebook.from_parquet(tmp_path / "cb.parquet")
    assert back.tokens == cb.tokens and back.words == cb.words and back.llm_ids == cb.llm_ids
    assert torch.equal(back.embeddings, cb.embeddings) and back.hash == cb.hash
    # the parquet source filters like any other: keep_list of one word
    (tmp_path / "keep.txt").write_text("bird\n")
    cfg = CodebookConfig(
        source="parquet", path=str(tmp_path / "cb.parquet"), keep_list=str(tmp_path / "keep.txt")
    )
    sub = load_codebook(cfg)
    assert sub.words == ["bird"] and sub.llm_ids == [9] and torch.equal(sub.embeddings, cb.embeddings[2:])


def test_no_gradient_reaches_the_codebook():
    cb = _tiny()
    z = torch.randn(4, 2, requires_grad=True)
    loss = ((z[:, None, :] - cb.embeddings[None]) ** 2).sum()
    loss.backward()
    assert z.grad is not None and cb.embeddings.grad is None and not cb.embeddings.requires_grad


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_codebook(CodebookConfig(source="parquet", path=str(tmp_path / "nope.parquet")))
    with pytest.raises(FileNotFoundError, match="missing_model"):
        load_codebook(CodebookConfig(source="hf", path=str(tmp_path / "missing_model")))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_codebook(
            CodebookConfig(source="parquet", path="x.parquet", blocklist=str(tmp_path / "nope.txt"))
        )
    with pytest.raises(ValueError, match="source"):
        CodebookConfig(source="csv")  # type: ignore[arg-type]


def test_minilm_vocabulary_and_filtered_codebook():
    vocab = open_vocabulary(CodebookConfig())
    assert len(vocab.tokens) == 30522 and vocab.tokens[101] == "[CLS]"
    assert vocab.embed([0, 1]).shape == (2, 384)
    cb = load_codebook(CodebookConfig(blocklist=""))
    assert len(cb) == 23695 and cb.dim == 384  # NOTES.md: specials and ## continuations dropped
    assert (
        not any(t.startswith("##") or t.startswith("[unused") for t in cb.tokens) and "[CLS]" not in cb.tokens
    )
    assert "[" in cb.tokens  # punctuation is not a special token
    numbers = tuple(read_word_list(NUMBER_WORDS))
    mnist = load_codebook(CodebookConfig(top_n=4096, min_length=2, keep_words=numbers))
    assert len(mnist) == 4096 and set(numbers) <= set(mnist.words)
    assert "fuck" not in mnist.words and len(set(mnist.words)) == 4096
    row = mnist.word_to_row["seven"]
    assert torch.equal(mnist.embeddings[row], vocab.embed([mnist.llm_ids[row]])[0].float())


def test_hf_and_sentence_transformers_loaders_agree_with_minilm(tmp_path):
    from spae.codebook import minilm_folder

    keep = tmp_path / "keep.txt"
    keep.write_text("cat\nseven\n7\n")
    base = load_codebook(CodebookConfig(keep_list=str(keep)))
    assert base.words == ["7", "seven", "cat"]  # vocabulary order
    hf = load_codebook(CodebookConfig(source="hf", path=str(minilm_folder()), keep_list=str(keep)))
    assert hf.tokens == base.tokens and hf.llm_ids == base.llm_ids and hf.hash == base.hash
    text = load_codebook(CodebookConfig(embedding="text", keep_list=str(keep)))
    assert text.words == base.words and text.dim == 384 and text.hash != base.hash
    assert torch.allclose(text.embeddings.norm(dim=-1), torch.ones(3), atol=1e-4)  # MiniLM normalises
    sims = text.embeddings @ text.embeddings.T  # "7" and "seven" are closer than "7" and "cat"
    assert sims[0, 1] > sims[0, 2]
