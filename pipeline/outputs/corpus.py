"""The lexical corpus: token pyramids as Parquet rows, LLM-ready text and a JSONL twin.

A corpus folder (local or ``s3://``) holds, per input shard ``<id>``:

- ``.spae/jsonl/part-<id>.jsonl``: one ``{"image_id", "label", "text"}`` object a line (committed first);
- ``part-<id>.parquet``: the rows (committed last: its presence marks the shard complete);

and ``.spae/manifest.json``, ``.spae/errors.pq`` and the dataset card ``.spae/README.md`` (see
docs/CORPUS.md; a corpus of the old layout keeps ``part-<id>.jsonl``, ``_manifest.json`` and
``_errors.parquet`` beside its parts, and is read the same way).

Row columns: ``image_id`` (unique across the corpus), ``source``, ``label`` (null if none),
``tokens_l<l>`` (list<int32>: codebook rows of layer ``l``, serialization order of eq. 1, i.e.
row-major over the ``h_l x w_l`` grid; for clips over ``t_l x h_l x w_l``, time outermost),
``words_l<l>`` (list<string>: the same tokens as words), and
``text``: ``[L1] w [L2] w w w w ...`` (layers in order, each introduced by ``[L<l>]``, words
space-separated), the same string ``TokenPyramid.to_text`` gives.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.outputs.contracts import PARQUET_SUFFIX, PART_PREFIX, read_manifest_dict
from pipeline.runtime.storage import Location, as_location
from spae.tokenizer import TokenPyramid

JSONL_SUFFIX = ".jsonl"
_TOKENS_RE = re.compile(r"^tokens_l(\d+)$")


def tokens_column(layer: int) -> str:
    return f"tokens_l{layer}"


def words_column(layer: int) -> str:
    return f"words_l{layer}"


def corpus_schema(layers: Sequence[int], caption: bool = False) -> pa.Schema:
    """The Parquet schema of a corpus emitting ``layers`` (1-indexed, ascending); ``caption`` adds the
    source's captions (string, null for a row without one) after ``label``."""
    fields = [("image_id", pa.string()), ("source", pa.string()), ("label", pa.int64())]
    if caption:
        fields.append(("caption", pa.string()))
    for l in layers:
        fields += [(tokens_column(l), pa.list_(pa.int32())), (words_column(l), pa.list_(pa.string()))]
    fields.append(("text", pa.string()))
    return pa.schema(fields)


def corpus_layers(schema: pa.Schema) -> tuple[int, ...]:
    """The layers a corpus table holds, from its ``tokens_l<l>`` columns, ascending."""
    found = (_TOKENS_RE.match(name) for name in schema.names)
    return tuple(sorted(int(m.group(1)) for m in found if m))


def format_text(words_by_layer: Sequence[tuple[int, Sequence[str]]]) -> str:
    """``[(1, ["seven"]), (2, ["a", "b", "c", "d"])]`` -> ``"[L1] seven [L2] a b c d"``."""
    return " ".join(f"[L{l}] " + " ".join(words) for l, words in words_by_layer)


@dataclass(frozen=True)
class CorpusBatch:
    """Token ids of ``b`` images for the emitted layers: ``ids[l]`` is ``[b, n_l]`` int (row-major)."""

    image_ids: list[str]
    sources: list[str]
    labels: list[int | None]
    ids: Mapping[int, np.ndarray]  # layer (1-indexed) -> [b, n_l]


def build_table(
    batch: CorpusBatch, vocabulary: Sequence[str], texts: Sequence[str] | None = None
) -> pa.Table:
    """Corpus rows for one batch; ``vocabulary[token_id]`` is a token's word.

    ``texts`` (e.g. from ``TokenPyramid.to_text``) replaces the text built here by ``format_text``;
    both must agree, and the tokenize job checks that they do on its round-trip sample.
    """
    layers = sorted(batch.ids)
    b = len(batch.image_ids)
    if not (len(batch.sources) == len(batch.labels) == b):
        raise ValueError(f"{b} image ids but {len(batch.sources)} sources and {len(batch.labels)} labels")
    words_of = np.asarray(vocabulary, dtype=object)
    columns: dict[str, Any] = {
        "image_id": pa.array(batch.image_ids, pa.string()),
        "source": pa.array(batch.sources, pa.string()),
        "label": pa.array(batch.labels, pa.int64()),
    }
    words: dict[int, np.ndarray] = {}
    for l in layers:
        ids = np.asarray(batch.ids[l]).reshape(b, -1).astype(np.int32)  # [b, n_l]
        if ids.size and (ids.min() < 0 or ids.max() >= len(words_of)):
            raise ValueError(f"layer {l}: token ids outside the vocabulary of {len(words_of)} words")
        words[l] = words_of[ids]  # [b, n_l] str
        n = ids.shape[1]
        offsets = np.arange(0, (b + 1) * n, n, dtype=np.int32)
        columns[tokens_column(l)] = pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1), pa.int32()))
        columns[words_column(l)] = pa.ListArray.from_arrays(
            offsets, pa.array(words[l].reshape(-1).tolist(), pa.string())
        )
    if texts is None:
        texts = [format_text([(l, words[l][i]) for l in layers]) for i in range(b)]
    elif len(texts) != b:
        raise ValueError(f"{len(texts)} texts for {b} images")
    columns["text"] = pa.array(list(texts), pa.string())
    return pa.Table.from_pydict(columns, schema=corpus_schema(layers))


def table_from_pyramid(
    pyramid: Any, image_ids: Sequence[str], sources: Sequence[str], labels: Sequence[int | None]
) -> pa.Table:
    """Corpus rows of a ``TokenPyramid`` (all its layers); text from ``TokenPyramid.to_text``."""
    ids = {l: pyramid.layer_ids(l).reshape(pyramid.batch_size, -1).cpu().numpy() for l in pyramid.layers}
    batch = CorpusBatch(list(image_ids), list(sources), list(labels), ids)
    return build_table(batch, pyramid.vocabulary.words, texts=pyramid.to_text())


def empty_table(layers: Sequence[int]) -> pa.Table:
    return corpus_schema(layers).empty_table()


def jsonl_bytes(table: pa.Table) -> bytes:
    """The JSONL twin of a corpus table: ``{"image_id", "label", "text"}`` per line, UTF-8, with
    ``"caption"`` after ``"label"`` when the table has captions."""
    names = ["image_id", "label", *(["caption"] if "caption" in table.column_names else []), "text"]
    rows = zip(*(table.column(name).to_pylist() for name in names), strict=True)
    lines = (json.dumps(dict(zip(names, row, strict=True)), ensure_ascii=False) for row in rows)
    return "".join(line + "\n" for line in lines).encode("utf-8")


def parse_jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def ids_from_table(table: pa.Table, layers: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """``tokens_l<l>`` columns -> ``{l: [b, n_l] int64}``."""
    out = {}
    for l in layers or corpus_layers(table.schema):
        col = table.column(tokens_column(l)).combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        out[l] = flat.reshape(table.num_rows, -1)  # [b, n_l]
    return out


# ----------------------------------------------------------------------------- reading a corpus


def part_files(corpus: Location) -> list[Location]:
    """The committed Parquet shards of a corpus, sorted."""
    return [
        loc for loc in corpus.list() if loc.name.startswith(PART_PREFIX) and loc.name.endswith(PARQUET_SUFFIX)
    ]


def read_corpus(uri: str | Location, columns: Sequence[str] | None = None) -> pa.Table:
    """All committed rows of a corpus (``FileNotFoundError`` if it holds none)."""
    loc = as_location(uri)
    parts = part_files(loc)
    if not parts:
        raise FileNotFoundError(f"{loc.uri}: no corpus shards ({PART_PREFIX}*{PARQUET_SUFFIX}) found")
    tables = []
    for part in parts:
        with part.fs.open_input_file(part.path) as f:
            tables.append(pq.read_table(f, columns=list(columns) if columns else None))
    return pa.concat_tables(tables)


def safe_name(text: str) -> str:
    """A file stem for an image id (or any text): runs of characters other than ``A-Za-z0-9._-`` -> ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


def select_rows(table: pa.Table, image_ids: Sequence[str] = (), rows: Sequence[int] = ()) -> pa.Table:
    """Rows by image id (in the order asked) and/or by row index; ``ValueError`` names what is missing."""
    picked: list[int] = []
    if image_ids:
        index = {iid: i for i, iid in enumerate(table.column("image_id").to_pylist())}
        missing = [iid for iid in image_ids if iid not in index]
        if missing:
            raise ValueError(f"image ids not in the corpus: {', '.join(missing[:10])}")
        picked += [index[iid] for iid in image_ids]
    for r in rows:
        if not 0 <= r < table.num_rows:
            raise ValueError(f"row {r} is out of range; the corpus has {table.num_rows} rows")
        picked.append(int(r))
    return table.take(pa.array(picked, pa.int64()))


def read_manifest(uri: str | Location) -> dict[str, Any]:
    """The corpus manifest as written (either layout); ``CorpusManifest.read`` is its typed view."""
    return read_manifest_dict(uri, "is this a corpus folder?")


def token_pyramid(table: pa.Table, tokenizer: Any, layers: Sequence[int] | None = None) -> Any:
    """Corpus rows -> ``TokenPyramid`` ``[b, h_l, w_l]`` per layer, for ``tokenizer.decode``."""
    layers = tuple(layers or corpus_layers(table.schema))
    ids = ids_from_table(table, layers)
    grids = []
    for l in layers:
        size = tokenizer.pyramid.layer_size(l)  # (h_l, w_l), or (t_l, h_l, w_l) for clips
        if ids[l].shape[1] != math.prod(size):
            raise ValueError(
                f"layer {l}: rows hold {ids[l].shape[1]} tokens, the tokenizer's grid is "
                + "x".join(map(str, size))
            )
        grids.append(torch.from_numpy(ids[l]).view(-1, *size))  # [b, h_l, w_l] / [b, t_l, h_l, w_l]
    return TokenPyramid(grids, layers, tokenizer.vocabulary, tokenizer.pyramid)


def deepest_decodable(layers: Sequence[int], covering_layers: Sequence[int]) -> int | None:
    """The deepest covering prefix ``1..c`` whose layers are all in ``layers``, or None."""
    have = set(layers)
    ok = [c for c in covering_layers if all(l in have for l in range(1, c + 1))]
    return max(ok) if ok else None
