"""The tokenizer API: images <-> token pyramids <-> text, and the self-contained tokenizer folder.

Text form of one image (serialization order of ``spae.pyramid``: layer 1 first, each layer
row-major over (i, j) of eq. 1)::

    [L1] seven [L2] seven 7 digit seven [L3] ...

Clips (``SPAEConfig.num_frames > 0``) use the same text: a layer of ``t_l x h_l x w_l`` tokens is
written in row-major order over ``(k, i, j)``, time outermost (``spae.pyramid``); ids are
``[b, t_l, h_l, w_l]`` and ``decode`` returns ``[b, C, T, H, W]``.

``TokenPyramid.from_text`` reads what an LLM writes back and never raises on free text:

- a word that is not in the vocabulary maps to the nearest word (exact, then case-insensitive,
  then without surrounding punctuation, then by ``difflib`` string similarity); each is reported.
  Every tie is broken by an explicit key (``Vocabulary.nearest``), so the same text gives the same ids
  in every process, whatever ``PYTHONHASHSEED``;
- a layer with too many words is cut; a layer with too few words, or a missing layer, is padded:
  a missing position takes the token of the nearest coarser layer present at the same place
  (nearest-neighbour upsampling of that layer's grid), which keeps the streaming average close to
  the coarser prefix; layer 1 (or a layer with nothing coarser) takes the most frequent word of the
  parsed text (a tie: the one written first), or row 0 when the text had no usable word (e.g. empty
  text). Every fix goes into a ``ParseReport``, whose ``to_dict`` is bounded (counts plus the first
  few unknown words) however long the text;
- the layers produced default to 1..the deepest layer written, and at least the shallowest prefix
  that covers the latent, so ``decode(from_text(text)[0])`` works for any text, e.g. ``"[L1] seven"``;
- text without any ``[Ln]`` tag is read as the serialized word stream (layer 1 first);
  words before the first tag are ignored (counted), tags outside the pyramid are reported.

Folder written by ``save_pretrained`` (loaded with weights-only semantics, no pickle)::

    config.json           {"format", "config" (SPAEConfig, spae.config.to_dict: what encode and decode
                           need, no training settings), "codebook_card", "fingerprint"}

The fingerprint (``SPAETokenizer.fingerprint``) hashes the weights, the codebook hash and the config
less the search fields that never change the ids (``QuantizerConfig.SPEED_FIELDS``). A folder of the
earlier format (its "config" carries the training loss) still loads: the loss is ignored, and the
fingerprint hashes that config as recorded, so it equals the one the folder records.
    model.safetensors     encoder, decoder (and the learned vq codebook, if any)
    codebook.safetensors  {"embeddings": [v, c] float32} -- the frozen codebook travels with the model
    codebook.json         {"tokens", "words", "llm_ids", "card"}
"""

from __future__ import annotations

import difflib
import hashlib
import heapq
import json
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from spae.codebook import FrozenCodebook, load_codebook
from spae.config import from_dict, to_dict
from spae.encode_options import EncodeOptions
from spae.model import SPAE, SPAEConfig
from spae.pyramid import PyramidSpec
from spae.quantize import QuantizerConfig

FORMAT = "spae-tokenizer/1"
CONFIG_JSON, MODEL_FILE = "config.json", "model.safetensors"
CODEBOOK_FILE, CODEBOOK_JSON = "codebook.safetensors", "codebook.json"
LEGACY_KEYS = frozenset({"loss"})  # SPAEConfig keys of earlier tokenizer folders, ignored on load
_TAG = re.compile(r"\[\s*L\s*(\d+)\s*\]", re.IGNORECASE)
_CANDIDATES = 64  # words sharing the most character bigrams, ranked by difflib's ratio


def _bigrams(word: str) -> set[str]:
    w = f"^{word}$"
    return {w[i : i + 2] for i in range(len(w) - 1)}


class Vocabulary:
    """Words <-> codebook rows. Words are the codebook's unique display strings (no whitespace)."""

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        if not self.words:
            raise ValueError("a vocabulary needs at least one word")
        self._index: dict[str, int] = {}
        for i, w in enumerate(self.words):
            if not w or any(ch.isspace() for ch in w) or _TAG.fullmatch(w):
                raise ValueError(
                    f"vocabulary word {i} {w!r} is empty, holds whitespace or looks like a layer tag"
                )
            if w in self._index:
                raise ValueError(f"vocabulary word {w!r} repeats (rows {self._index[w]} and {i})")
            self._index[w] = i
        self._lower: dict[str, int] = {}
        for i, w in enumerate(self.words):
            self._lower.setdefault(w.lower(), i)
        self._lower_words = list(self._lower)
        self._nearest_cache: dict[str, tuple[int, str]] = {}
        self._grams: dict[str, list[int]] | None = None
        self._gram_sizes: list[int] = []

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    __hash__ = None  # mutable cache inside; compare by words

    def id(self, word: str) -> int:
        if word not in self._index:
            raise KeyError(
                f"{word!r} is not in the vocabulary ({len(self)} words); use nearest() for free text"
            )
        return self._index[word]

    def word(self, id: int) -> str:
        if not 0 <= int(id) < len(self.words):
            raise IndexError(f"token id {id} is out of range 0..{len(self.words) - 1}")
        return self.words[int(id)]

    def nearest(self, word: str) -> tuple[int, str]:
        """(id, word) of the closest vocabulary word; never raises. Exact, then case-insensitive, then
        without surrounding punctuation; else among the 64 words sharing the most character bigrams
        the one with the highest ``difflib.SequenceMatcher`` ratio (row 0 if none shares one).

        Deterministic: the same word maps to the same row in every process, whatever
        ``PYTHONHASHSEED``. Ties are broken by bigram overlap (Dice), then by the first row."""
        if word in self._index:
            return self._index[word], word
        if word not in self._nearest_cache:
            self._nearest_cache[word] = self._search(word)
        return self._nearest_cache[word]

    def _search(self, word: str) -> tuple[int, str]:
        for key in (word.lower(), word.strip(string.punctuation), word.strip(string.punctuation).lower()):
            if key in self._index:
                return self._index[key], key
            if key.lower() in self._lower:
                i = self._lower[key.lower()]
                return i, self.words[i]
        key = word.lower()
        if self._grams is None:  # built on first use: bigram -> positions in _lower_words
            self._grams = {}
            for pos, w in enumerate(self._lower_words):
                for g in sorted(_bigrams(w)):
                    self._grams.setdefault(g, []).append(pos)
            self._gram_sizes = [len(_bigrams(w)) for w in self._lower_words]
        grams = _bigrams(key)
        shared = Counter()
        for g in sorted(grams):
            shared.update(self._grams.get(g, ()))
        if not shared:  # nothing in common with any word (e.g. symbols only)
            return 0, self.words[0]

        def dice(pos: int) -> float:  # bigram overlap, normalised by both words' sizes
            return 2 * shared[pos] / (len(grams) + self._gram_sizes[pos])

        # Every tie is broken by an explicit, total key (never by set or dict order, which can change with
        # PYTHONHASHSEED): the shortlist by (most shared bigrams, highest overlap, first row), the winner
        # by (highest difflib ratio, highest overlap, first row). Rows come in codebook order, so among
        # equally close words the earlier (for a frequency-ranked vocabulary, the more frequent) wins.
        candidates = heapq.nsmallest(_CANDIDATES, shared, key=lambda pos: (-shared[pos], -dice(pos), pos))
        best = min(
            candidates,
            key=lambda pos: (
                -difflib.SequenceMatcher(None, key, self._lower_words[pos]).ratio(),
                -dice(pos),
                pos,
            ),
        )
        i = self._lower[self._lower_words[best]]
        return i, self.words[i]


REPORT_EXAMPLES = 10  # unknown words listed by ParseReport.to_dict (the counts cover all of them)


@dataclass
class ParseReport:
    """What ``from_text`` fixed in one image's text.

    unknown_words: (written, mapped to) for every word not in the vocabulary as written, in text order
        (words past a layer's size are cut before they are looked up).
    length_fixes: layer -> (words found, words expected) for layers cut or padded.
    missing_layers: expected layers with no words at all (filled).
    extra_layers: the layers of ignored tags (outside the expected layers, or repeated), each once.
    extra_tags: how many tags were ignored (a runaway answer repeats one tag thousands of times).
    ignored_words: words outside any expected layer (before the first tag, under ignored tags).
    """

    unknown_words: list[tuple[str, str]] = field(default_factory=list)
    length_fixes: dict[int, tuple[int, int]] = field(default_factory=dict)
    missing_layers: list[int] = field(default_factory=list)
    extra_layers: list[int] = field(default_factory=list)
    extra_tags: int = 0
    ignored_words: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.unknown_words
            or self.length_fixes
            or self.missing_layers
            or self.extra_tags
            or self.ignored_words
        )

    def to_dict(self, examples: int = REPORT_EXAMPLES) -> dict:
        """JSON-safe summary, bounded whatever the text's length: counts, ``ok``, and the first
        ``examples`` distinct unknown words with what they became (``unknown_count`` occurrences of
        ``unknown_distinct`` distinct words in all)."""
        distinct = list(dict.fromkeys(self.unknown_words))  # first occurrence order
        return {
            "ok": self.ok,
            "unknown_words": [list(p) for p in distinct[:examples]],
            "unknown_count": len(self.unknown_words),
            "unknown_distinct": len(distinct),
            "length_fixes": {str(l): list(v) for l, v in sorted(self.length_fixes.items())},
            "missing_layers": list(self.missing_layers),
            "extra_layers": list(self.extra_layers),
            "extra_tags": self.extra_tags,
            "ignored_words": self.ignored_words,
        }


@dataclass(eq=False)
class TokenPyramid:
    """Tokens of a batch of images (or clips): ``ids[i]`` is layer ``layers[i]`` as [b, h_l, w_l]
    (clips: [b, t_l, h_l, w_l]) int64 rows."""

    ids: list[Tensor]
    layers: tuple[int, ...]
    vocabulary: Vocabulary
    pyramid: PyramidSpec

    def __post_init__(self) -> None:
        self.layers = tuple(int(l) for l in self.layers)
        if list(self.layers) != sorted(set(self.layers)) or len(self.ids) != len(self.layers):
            raise ValueError(
                f"layers {self.layers} must be sorted, unique and match the {len(self.ids)} id tensors"
            )
        for l, t in zip(self.layers, self.ids, strict=True):
            size = self.pyramid.layer_size(l)
            if t.dim() != 1 + len(size) or tuple(t.shape[1:]) != size or t.shape[0] != self.ids[0].shape[0]:
                raise ValueError(
                    f"layer {l}: ids of shape {tuple(t.shape)}, expected [b, {', '.join(map(str, size))}]"
                )

    @property
    def batch_size(self) -> int:
        return int(self.ids[0].shape[0])

    def layer_ids(self, layer: int) -> Tensor:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not in this token pyramid (layers {list(self.layers)})")
        return self.ids[self.layers.index(layer)]

    def words(self, layer: int) -> list[list[str]]:
        """Per image, the words of ``layer`` in serialization order."""
        rows = self.layer_ids(layer).reshape(self.batch_size, -1).tolist()
        return [[self.vocabulary.words[r] for r in img] for img in rows]

    def to_text(self, layers: Sequence[int] | None = None) -> list[str]:
        """One string per image: ``"[L1] w [L2] w w w w ..."``."""
        layers = self.layers if layers is None else tuple(layers)
        per_layer = {l: self.words(l) for l in layers}
        return [
            " ".join(f"[L{l}] " + " ".join(per_layer[l][b]) for l in layers) for b in range(self.batch_size)
        ]

    @classmethod
    def from_text(
        cls,
        text: str | Sequence[str],
        vocabulary: Vocabulary,
        pyramid: PyramidSpec,
        layers: Sequence[int] | None = None,
    ) -> tuple[TokenPyramid, list[ParseReport]]:
        """Tolerant parse of one string per image (see the module docstring); never raises on free text.

        ``layers``: the layers to produce. Default: 1..the deepest layer found in any of the texts, and
        at least the shallowest prefix that covers the latent (``pyramid.covering_layers[0]``), so the
        result always decodes; layers the text lacks are filled and reported as ``missing_layers``.
        """
        texts = [text] if isinstance(text, str) else [str(t) for t in text]
        if not texts:
            raise ValueError("from_text needs at least one text")
        parsed = [_split_layers(t, pyramid) for t in texts]  # per text: ({layer: words}, extra, ignored)
        if layers is None:
            deepest = max([max(p[0], default=1) for p in parsed] + [pyramid.covering_layers[0]])
            layers = tuple(range(1, deepest + 1))
        layers = tuple(sorted(set(int(l) for l in layers)))
        for l in layers:
            pyramid.layer_size(l)  # ValueError for a layer outside the pyramid (a caller error, not text)
        ids = {l: [] for l in layers}
        reports = []
        for found, extra, ignored in parsed:
            unused = [l for l in found if l not in layers]
            report = ParseReport(
                extra_layers=sorted(set(extra) | set(unused)),
                extra_tags=len(extra) + len(unused),
                ignored_words=ignored + sum(len(found[l]) for l in unused),
            )
            # words past a layer's size are cut before they are mapped: a runaway layer costs no search
            sizes = {l: math.prod(pyramid.layer_size(l)) for l in layers}
            rows = {
                l: [_word_id(w, vocabulary, report) for w in found.get(l, [])[: sizes[l]]] for l in layers
            }
            counts, first = Counter(), {}
            for r in (r for l in layers for r in rows[l]):
                counts[r] += 1
                first.setdefault(r, len(first))
            # the most frequent word; a tie goes to the word written first (explicit, not Counter order)
            fallback = min(counts, key=lambda r: (-counts[r], first[r])) if counts else 0
            grids: dict[int, Tensor] = {}
            for l in layers:
                size = pyramid.layer_size(l)  # (h_l, w_l) or (t_l, h_l, w_l)
                got = rows[l]
                if l not in found:
                    report.missing_layers.append(l)
                elif len(found[l]) != sizes[l]:
                    report.length_fixes[l] = (len(found[l]), sizes[l])
                grid = _pad_from_coarser(grids, pyramid, size, fallback).reshape(-1)
                if got:
                    grid[: len(got)] = torch.tensor(got, dtype=torch.long)
                grids[l] = grid.view(size)
                ids[l].append(grids[l])
            reports.append(report)
        out = cls([torch.stack(ids[l]) for l in layers], layers, vocabulary, pyramid)
        return out, reports

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TokenPyramid)
            and self.layers == other.layers
            and self.pyramid == other.pyramid
            and self.vocabulary == other.vocabulary
            and all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(self.ids, other.ids, strict=True))
        )

    __hash__ = None


def _split_layers(text: str, pyramid: PyramidSpec) -> tuple[dict[int, list[str]], list[int], int]:
    """-> ({layer: words}, tags outside the pyramid or repeated, words ignored)."""
    found: dict[int, list[str]] = {}
    extra: list[int] = []
    tags = list(_TAG.finditer(text))
    if not tags:  # no tags: the serialized stream, layer 1 first
        words = text.split()
        start = 0
        for l in range(1, pyramid.num_layers + 1):
            if start >= len(words):
                break
            n = pyramid.token_counts[l - 1]
            found[l] = words[start : start + n]
            start += n
        return found, extra, max(0, len(words) - start)
    ignored = len(text[: tags[0].start()].split())
    for i, m in enumerate(tags):
        end = tags[i + 1].start() if i + 1 < len(tags) else len(text)
        words = text[m.end() : end].split()
        l = int(m.group(1))
        if not 1 <= l <= pyramid.num_layers or l in found:
            extra.append(l)
            ignored += len(words)
        else:
            found[l] = words
    return found, extra, ignored


def _word_id(word: str, vocabulary: Vocabulary, report: ParseReport) -> int:
    i, mapped = vocabulary.nearest(word)
    if mapped != word:
        report.unknown_words.append((word, mapped))
    return i


def _pad_from_coarser(
    grids: dict[int, Tensor], pyramid: PyramidSpec, size: tuple[int, ...], fallback: int
) -> Tensor:
    """[*size] ids from the nearest coarser grid present (nearest-neighbour per axis), else ``fallback``."""
    if not grids:
        return torch.full(tuple(size), fallback, dtype=torch.long)
    parent = grids[max(grids)]  # [h_m, w_m] or [t_m, h_m, w_m]
    index = [torch.arange(n) * m // n for n, m in zip(size, parent.shape, strict=True)]
    return parent[torch.meshgrid(*index, indexing="ij")].clone()


# ----------------------------------------------------------------------------- the tokenizer


class SPAETokenizer(nn.Module):
    """Images <-> token pyramids <-> text around a trained ``SPAE``."""

    def __init__(self, model: SPAE, encode_options: EncodeOptions | None = None):
        super().__init__()
        self.model = model
        self.encode_options = encode_options or EncodeOptions()
        self._compiled: dict[str, object] = {}  # a plain dict: the compiled encoder is no submodule
        self.config: SPAEConfig = model.cfg
        # the config.json "config" of a folder written before the loss left SPAEConfig: hashed as it
        # was, so the fingerprint stays the one recorded there (corpora tokenized with it still resume)
        self._legacy_config: dict | None = None
        self.pyramid: PyramidSpec = model.pyramid
        qcfg = self.config.quantizer
        if qcfg.spec.learned:  # a learned codebook has no words: name its rows (vq0, vq1, ...)
            words = [f"{qcfg.kind}{i}" for i in range(qcfg.vq_codebook_size)]
        else:
            words = model.codebook.words
        self.vocabulary = Vocabulary(words)

    @property
    def codebook(self) -> FrozenCodebook:
        return self.model.codebook

    @classmethod
    def from_config(cls, cfg: SPAEConfig, codebook: FrozenCodebook | None = None) -> SPAETokenizer:
        """A freshly initialised tokenizer; loads ``cfg.codebook`` unless a codebook is given."""
        return cls(SPAE(cfg, codebook if codebook is not None else load_codebook(cfg.codebook)))

    @property
    def device(self) -> torch.device:
        return self.codebook.embeddings.device

    # -- images <-> tokens

    @torch.no_grad()
    def encode(self, images: Tensor, layers: Sequence[int] | None = None) -> TokenPyramid:
        """images [b, C, H, W] (clips [b, C, T, H, W]) in [0, 1] -> TokenPyramid of ``layers``
        (default: all). The encoder runs as ``encode_options`` says; the ids equal those of the
        training forward pass (``SPAE.forward``) for the default fp32 eager encoder."""
        layers = (
            tuple(range(1, self.pyramid.num_layers + 1)) if layers is None else tuple(sorted(set(layers)))
        )
        for l in layers:
            self.pyramid.layer_size(l)
        was_training = self.model.training
        self.model.eval()
        try:
            z = self._encode_latent(images.to(self.device, torch.float32))  # [b, c, *latent] fp32
            ids = self.model.quantizer.encode_ids(z)  # per layer [b, *layer_size]
        finally:
            self.model.train(was_training)
        flat = torch.cat([ids[l - 1].reshape(-1) for l in layers]).cpu()  # one device -> host copy
        sizes = [ids[l - 1].numel() for l in layers]
        out = [t.view(ids[l - 1].shape) for t, l in zip(flat.split(sizes), layers, strict=True)]
        return TokenPyramid(out, layers, self.vocabulary, self.pyramid)

    def _encode_latent(self, images: Tensor) -> Tensor:
        """images [b, C, ...] in [0, 1] -> z [b, c, *latent] fp32, as ``encode_options`` says."""
        opts = self.encode_options
        if opts.dtype == "float32" and not opts.compile:
            return self.model.encode_latent(images)
        self.model._check_images(images)
        if not opts.compile:
            return _encoder_fn(self.model.encoder, opts.dtype)(images)
        key = f"{opts.dtype}/{opts.compile_backend}/{opts.compile_mode}"
        if key not in self._compiled:
            fn = torch.compile(
                _encoder_fn(self.model.encoder, opts.dtype),
                backend=opts.compile_backend,
                mode=opts.compile_mode,
                dynamic=False,
            )
            self._compiled[key] = (fn, 0)
        fn, size = self._compiled[key]
        b = images.shape[0]
        if b > size:  # a new, larger batch: compiled once more, and kept as the size to pad to
            size = 1 << (b - 1).bit_length()
            self._compiled[key] = (fn, size)
        if size > b:  # every image is encoded on its own (per-image GroupNorm): the pads change nothing
            images = torch.cat([images, images.new_zeros(size - b, *images.shape[1:])])
        return fn(images)[:b]

    @torch.no_grad()
    def decode(self, pyramid: TokenPyramid, up_to_layer: int | None = None) -> Tensor:
        """TokenPyramid -> images [b, C, H, W] (clips [b, C, T, H, W]) in [0, 1] from the prefix of
        ``up_to_layer`` layers (default: the deepest layer present). The prefix must cover every
        latent position."""
        if pyramid.pyramid != self.pyramid:
            raise ValueError(
                f"token pyramid layout {pyramid.pyramid} differs from this tokenizer's {self.pyramid}"
            )
        if len(pyramid.vocabulary) != len(self.vocabulary):
            raise ValueError(
                f"token pyramid vocabulary has {len(pyramid.vocabulary)} words, "
                f"this tokenizer {len(self.vocabulary)}"
            )
        l = max(pyramid.layers) if up_to_layer is None else int(up_to_layer)
        if l not in self.pyramid.covering_layers:
            raise ValueError(
                f"cannot decode from the first {l} layers: only prefixes that cover every latent "
                f"position can be decoded, here {list(self.pyramid.covering_layers)}"
            )
        missing = [i for i in range(1, l + 1) if i not in pyramid.layers]
        if missing:
            raise ValueError(
                f"decoding the first {l} layers needs layers {missing}, absent from the token pyramid"
            )
        was_training = self.model.training
        self.model.eval()
        try:
            zq = self.model.quantizer.lookup(
                [pyramid.layer_ids(i).to(self.device) for i in range(1, l + 1)], l
            )
            return self.model.decode_latent(zq)
        finally:
            self.model.train(was_training)

    # -- tokens <-> text

    def to_text(self, pyramid: TokenPyramid, layers: Sequence[int] | None = None) -> list[str]:
        return pyramid.to_text(layers)

    def from_text(
        self, text: str | Sequence[str], layers: Sequence[int] | None = None
    ) -> tuple[TokenPyramid, list[ParseReport]]:
        return TokenPyramid.from_text(text, self.vocabulary, self.pyramid, layers)

    # -- persistence

    def _weights(self) -> dict[str, Tensor]:
        """Model weights on the CPU. The frozen codebook is a non-persistent buffer, so it is not among
        them: it travels in codebook.safetensors."""
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def identity_config(self) -> dict:
        """The config the fingerprint hashes: ``SPAEConfig`` (what encode and decode need; no training
        settings) without the search fields that never change the ids (``QuantizerConfig.SPEED_FIELDS``).
        For a folder of the earlier format, the config recorded there, as it was."""
        if self._legacy_config is not None:
            return self._legacy_config
        cfg = to_dict(self.config)
        for name in QuantizerConfig.SPEED_FIELDS:
            del cfg["quantizer"][name]
        return cfg

    def fingerprint(self, weights: dict[str, Tensor] | None = None) -> str:
        """sha256 of the weights, the identity config and the codebook hash: the tokenizer's identity
        (``weights``: this tokenizer's ``_weights()`` when the caller has them already)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.identity_config(), sort_keys=True).encode())
        h.update(self.codebook.hash.encode())
        for name, t in sorted((weights if weights is not None else self._weights()).items()):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the self-contained tokenizer folder (see the module docstring); returns its path."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        cb = self.codebook
        weights = self._weights()
        save_file(weights, str(out / MODEL_FILE))
        save_file({"embeddings": cb.embeddings.detach().cpu().contiguous()}, str(out / CODEBOOK_FILE))
        (out / CODEBOOK_JSON).write_text(
            json.dumps({"tokens": cb.tokens, "words": cb.words, "llm_ids": cb.llm_ids, "card": cb.card})
        )
        meta = {
            "format": FORMAT,
            # a tokenizer loaded from an earlier folder writes that folder's config back: same fingerprint
            "config": to_dict(self.config) if self._legacy_config is None else self._legacy_config,
            "codebook_card": cb.card,
            "fingerprint": self.fingerprint(weights),
        }
        (out / CONFIG_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return out

    @classmethod
    def from_pretrained(
        cls,
        path_or_uri: str | Path,
        codebook: FrozenCodebook | None = None,
        map_location: str | torch.device = "cpu",
    ) -> SPAETokenizer:
        """Load a folder written by ``save_pretrained``: a local path or ``file://`` (the folder or one
        above it). Remote URIs (``s3://``, MLflow ``runs:/``, ``models:/``) are fetched by the pipeline
        (``pipeline.outputs.contracts.load_tokenizer``). A given ``codebook`` must have the saved codebook's
        hash."""
        folder = _find_folder(_resolve(path_or_uri))
        meta = json.loads((folder / CONFIG_JSON).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder / CONFIG_JSON} has format {meta.get('format')!r}, expected {FORMAT!r}")
        # folders written before the loss left SPAEConfig carry a training-only "loss" key: ignored
        legacy = LEGACY_KEYS & set(meta["config"])
        cfg = from_dict(SPAEConfig, {k: v for k, v in meta["config"].items() if k not in legacy})
        saved_hash = meta["codebook_card"]["hash"]
        if codebook is not None and codebook.hash != saved_hash:
            raise ValueError(
                f"codebook mismatch: the tokenizer in {folder} was trained with codebook {saved_hash} "
                f"but the codebook given has hash {codebook.hash}"
            )
        if codebook is None:
            info = json.loads((folder / CODEBOOK_JSON).read_text())
            emb = load_file(str(folder / CODEBOOK_FILE))["embeddings"]
            card = {k: v for k, v in info["card"].items() if k not in ("hash", "size", "dim")}
            codebook = FrozenCodebook(emb, info["tokens"], info["words"], info["llm_ids"], card)
            if codebook.hash != saved_hash:
                raise ValueError(
                    f"{folder / CODEBOOK_FILE} has hash {codebook.hash}, config.json says {saved_hash}"
                )
        model = SPAE(cfg, codebook)
        state = load_file(str(folder / MODEL_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{folder / MODEL_FILE} does not fit the config: missing {missing}, unexpected {unexpected}"
            )
        tokenizer = cls(model.to(map_location))
        # the config as recorded when it is not today's serialization of the same config (the "loss" key,
        # or a folder written before a field was added, such as network.global_context): same fingerprint
        if legacy or meta["config"] != json.loads(json.dumps(to_dict(cfg))):
            tokenizer._legacy_config = meta["config"]
        return tokenizer


def _encoder_fn(encoder: nn.Module, dtype: str):
    """images in [0, 1] -> z fp32 through ``encoder``, under bf16 autocast when ``dtype`` says so."""

    def run(images: Tensor) -> Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            z = encoder(images * 2.0 - 1.0)  # [b, c, *latent]
        return z.float()

    return run


def _resolve(path_or_uri: str | Path) -> Path:
    """A local path (or ``file://``) as a ``Path``; any other URI scheme is refused."""
    uri = str(path_or_uri)
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/", uri) and not re.match(r"^[a-zA-Z]:[\\/]", uri):
        raise ValueError(
            f"tokenizer {uri!r}: from_pretrained takes a local folder; load remote tokenizers (s3://, "
            "runs:/, models:/) with pipeline.outputs.contracts.load_tokenizer"
        )
    return Path(uri)


def _find_folder(path: Path) -> Path:
    """The folder holding config.json + model.safetensors: ``path`` itself or one below it."""
    if not path.exists():
        raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
    if (path / CONFIG_JSON).is_file() and (path / MODEL_FILE).is_file():
        return path
    found = sorted(p.parent for p in path.rglob(MODEL_FILE) if (p.parent / CONFIG_JSON).is_file())
    if not found:
        raise FileNotFoundError(
            f"{str(path)!r} holds no {CONFIG_JSON} + {MODEL_FILE} (not a save_pretrained folder)"
        )
    return found[0]


__all__ = ["EncodeOptions", "ParseReport", "SPAETokenizer", "TokenPyramid", "Vocabulary"]
