"""Image sources -> deterministic input shards -> rows of image bytes.

A source is one URI:

- ``mnist://train|valid|test[?limit=N]``: the built-in MNIST asset (images PNG-encoded, so they take
  the same decode path as files);
- ``moving-mnist://train|valid|test[?limit=N&frames=16&digits=1&size=32&digit_size=0&seed=0]``: the
  built-in Moving MNIST generator (``spae.video``), one clip per row stored as ``.npy`` bytes of
  uint8 ``[T, H, W]``; ``label`` is the first digit shown (all of them are in the image id, e.g.
  ``mmnist-train-000003-d37``); ``limit`` defaults to the split's MNIST size;
- ``scenes://train|valid|test[?limit=N&size=64&seed=0&min_objects=1&max_objects=4]``: the built-in colour
  scenes (``spae.scenes``), PNG-encoded RGB; ``label`` is the dominant object's shape (a ``SHAPES`` index),
  and every row's words (count, colours, shapes, sizes, regions) come from ``image_words``; ``limit``
  defaults to ``spae.scenes.SPLIT_SIZES``;
- a folder of images or videos (``VIDEO_EXTENSIONS``: mp4, webm, ..., npy; GIFs count as images and
  decode as clips when the job asks for clips), local or ``s3://``, listed recursively and sorted;
  ImageFolder-style labels: the first folder under the root is the class name, classes map to
  ints in sorted order, files directly under the root have no label; ``label_words`` says which words
  name a class (``class_words``): the folder name (``names``), or for folders of digits (``mnist``) the
  digit's word and numeral, as for ``mnist://`` (a folder ``7`` or ``seven`` is named by ``seven`` and
  ``7``);
- WebDataset tar shards (one ``.tar``, or a folder / ``s3://`` prefix of them), as img2dataset writes them:
  ``<key>.jpg|png|webp`` with ``<key>.json|txt|cls`` beside it (``pipeline.inputs.webdataset``); image ids are
  ``<tar name>/<key>``, labels come from ``<key>.cls`` or the ``label_column`` key of ``<key>.json``;
  other files beside the tars (img2dataset's ``.parquet`` and ``_stats.json``) are ignored;
  with ``caption_column`` set, captions come from ``<key>.txt`` or that key of ``<key>.json``;
- Parquet files (one file, or a folder / ``s3://`` prefix of them) with an image column holding
  bytes or the image struct of Hugging Face datasets (``{"bytes": binary, "path": string}``; a row
  whose bytes are null reads its ``path`` relative to the Parquet file's folder, an error row naming
  the path when that cannot be read); for clips the bytes
  may be a video file or ``.npy`` frame tensor, or the column a ``list<binary>`` of per-frame image
  files (packed with ``pipeline.inputs.video.pack_frames``); with ``caption_column`` set, captions come from
  that string column.

Each kind is one ``SourceKind`` entry of ``SOURCE_KINDS`` (how it lists, packs a shard's items, cuts a
shard into row ranges and reads them); a new source is one entry plus its functions.
``list_shards`` groups the sorted items into shards of ``shard_size``. Parquet, MNIST and WebDataset list
their rows compactly, without a Python object per row (``FileRows``: row counts per file; ``TarListing``:
also each tar sample's byte offset and key, in numpy arrays and one joined string), so the driver's
memory does not grow by an object per input row; shard ids come from the
shard index (``00000``) and every shard carries a digest of its item list, so a changed input is
detected instead of silently mixed into an old output. ``read_shard`` turns one shard into a table
(``image_id``, ``source``, ``label``, ``image_bytes``, ``path``, ``error``, ``error_stage``, and
``caption`` when ``caption_column`` asks: ``row_schema``); a file that cannot be read gives a row with
empty bytes and the reason, never an exception. ``decode_source`` reads and decodes a whole (small)
source in this process (``pipeline.inputs.images.decode_table``), without Ray.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from pipeline.inputs import webdataset
from pipeline.inputs.images import DecodeOptions, decode_table
from pipeline.inputs.video import VIDEO_EXTENSIONS, clip_npy, pack_frames
from pipeline.outputs.schemas import error_mask
from pipeline.runtime.storage import Location, resolve
from spae.data import MNIST_CLASS_WORDS, load_mnist
from spae.scenes import SHAPES, SPLIT_SIZES, Scene, SceneConfig, scene_layout, scenes
from spae.shifts import SHIFTS, shift_digit
from spae.video import MovingMnistConfig, moving_mnist

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MNIST_SPLITS = ("train", "valid", "test")
MOVING_MNIST_KEYS = ("limit", "frames", "digits", "size", "digit_size", "seed")
SCENES_KEYS = ("limit", "size", "seed", "min_objects", "max_objects")

ROW_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("label", pa.int64()),  # null when the source has no labels
        ("image_bytes", pa.binary()),
        ("path", pa.string()),
        ("error", pa.string()),  # null, or why the row could not be read
        ("error_stage", pa.string()),
    ]
)
CAPTION_FIELD = pa.field("caption", pa.string())  # a row's caption, when SourceConfig.caption_column asks


LABEL_WORDS = ("names", "mnist")
LIST_WORKERS = 8  # threads (or processes) listing a source's files at once
LIST_PROCESSES_FROM = 16  # tars at which their listing runs in processes (header parsing holds the GIL)
LATER_FIELDS = ("caption_column",)  # SourceConfig fields Shard JSON holds only when set (_config_json)


@dataclass(frozen=True)
class SourceConfig:
    uri: str = "mnist://test"
    image_column: str = "image"  # Parquet: bytes, or a struct with a "bytes" field
    label_column: str = "label"  # Parquet: an integer column; absent -> no labels
    id_column: str = ""  # Parquet: image ids from this column instead of "<file>-<row>"
    shard_size: int = 1000
    limit: int = 0  # 0 = all; else the first N items in listing order
    # folders: the words naming a class (class_words): "names" = the folder name, "mnist" = for folders
    # named by a digit ("7") or its word ("seven"), the digit's word and numeral, as for mnist://
    label_words: str = "names"
    # "" = no captions; else a "caption" column: Parquet: this string column; WebDataset: <key>.txt, else
    # this key of <key>.json (a missing sidecar or key: a null caption)
    caption_column: str = ""

    def __post_init__(self) -> None:
        if not self.uri:
            raise ValueError("uri: empty; give mnist://<split>, a folder, Parquet file(s) or s3://...")
        if self.label_words not in LABEL_WORDS:
            raise ValueError(f"label_words: {self.label_words!r} is not one of {', '.join(LABEL_WORDS)}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size: must be >= 1, got {self.shard_size}")
        if self.limit < 0:
            raise ValueError(f"limit: must be >= 0 (0 = all), got {self.limit}")


@dataclass(frozen=True)
class Shard:
    """One unit of work and of output: ``items`` say exactly which rows it holds.

    ``items`` by ``kind``: mnist and moving-mnist ``[[split, start, stop]]``; folder
    ``[[relpath, size, label], ...]`` (label -1 = none); parquet ``[[relpath, row_start, row_stop], ...]``;
    webdataset ``[[relpath, start, stop, offset, first key, broken key, broken reason], ...]`` (the last two
    "" unless the range ends with a tar's unreadable rest).

    ``listed``: the listing's items of these rows (a slice of ``SourceKind.list_items``' items), kept (on
    the driver only: neither in the JSON nor in the digest) for kinds whose pieces need each row's
    position (``SourceKind.keeps_listed``: a tar sample's byte offset and key, in a ``TarListing``).
    """

    shard_id: str
    kind: str  # a SOURCE_KINDS name: "mnist" | "moving-mnist" | "folder" | "parquet" | "webdataset"
    root: str  # URI the relative paths in items are under
    items: tuple = field(repr=False)
    num_rows: int
    digest: str
    config: SourceConfig
    classes: tuple[str, ...] = ()
    listed: Sequence = field(default=(), repr=False, compare=False)

    def to_json(self) -> str:
        data = {
            "shard_id": self.shard_id,
            "kind": self.kind,
            "root": self.root,
            "items": [list(i) for i in self.items],
            "num_rows": self.num_rows,
            "digest": self.digest,
            "config": _config_json(self.config),
            "classes": list(self.classes),
        }
        return json.dumps(data)

    @staticmethod
    def from_json(text: str) -> Shard:
        d = json.loads(text)
        return Shard(
            shard_id=d["shard_id"],
            kind=d["kind"],
            root=d["root"],
            items=tuple(tuple(i) for i in d["items"]),
            num_rows=d["num_rows"],
            digest=d["digest"],
            config=SourceConfig(**d["config"]),
            classes=tuple(d["classes"]),
        )


def _config_json(cfg: SourceConfig) -> dict[str, Any]:
    """The config as Shard JSON holds it: fields added later (``LATER_FIELDS``) only when set, so the
    JSON of a shard that does not use them is what it was before they existed."""
    defaults = SourceConfig()
    return {k: v for k, v in cfg.__dict__.items() if k not in LATER_FIELDS or v != getattr(defaults, k)}


# ----------------------------------------------------------------------------- the kinds


@dataclass(frozen=True)
class Files:
    """The data files a file kind was found by: ``(relpath, size)`` under ``root``, sorted."""

    root: Location
    found: list[tuple[str, int]]


@dataclass(frozen=True, eq=False)
class FileRows:
    """Rows listed as the rows of files in order, without an object per row: file ``i`` holds listing
    rows ``[starts[i], starts[i + 1])``. ``len`` and slices as a sequence of ``(name, row)`` items; a
    slice is a view (the window ``[lo, hi)`` of listing rows), packed by ``ranges``."""

    names: tuple[str, ...]
    starts: np.ndarray  # int64 [files + 1]: the listing row each file starts at; starts[-1] = rows
    lo: int
    hi: int

    @staticmethod
    def of(names: Sequence[str], counts: Sequence[int]) -> FileRows:
        starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)
        return FileRows(tuple(names), starts, 0, int(starts[-1]))

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, rows: slice) -> FileRows:
        start, stop, step = rows.indices(len(self))
        assert step == 1, f"{rows}: a listing slices into consecutive rows only"
        return dataclasses.replace(self, lo=self.lo + start, hi=self.lo + max(start, stop))

    def spans(self) -> Iterator[tuple[int, int, int]]:
        """``(file, first row, end row)`` of each file with rows in the window (listing rows)."""
        f = int(np.searchsorted(self.starts, self.lo, side="right")) - 1
        while f < len(self.names) and self.starts[f] < self.hi:
            a, b = max(self.lo, int(self.starts[f])), min(self.hi, int(self.starts[f + 1]))
            if a < b:
                yield f, a, b
            f += 1

    def ranges(self) -> tuple:
        """The window as ``(name, row_start, row_stop)`` ranges of its files' own rows."""
        return tuple(
            (self.names[f], a - int(self.starts[f]), b - int(self.starts[f])) for f, a, b in self.spans()
        )


@dataclass(frozen=True, eq=False)
class TarListing:
    """Every sample of the tars (``FileRows`` of the tars), with each sample's byte offset and key: about
    16 bytes and the key's per sample, no object per sample. ``len``, slices (views, as ``FileRows``) and
    iteration as the samples' ``(relpath, index in its tar, offset, key, reason)``; ``ranges`` packs a
    slice into ``Shard.items`` (the webdataset layout)."""

    tars: FileRows
    reasons: tuple[str, ...]  # per tar: why its last sample (its unreadable rest) cannot be read, or ""
    offsets: np.ndarray  # int64 [samples]
    keys: bytes  # every sample's key, UTF-8, joined
    key_starts: np.ndarray  # int64 [samples + 1]: sample i's key is keys[key_starts[i]:key_starts[i + 1]]

    @staticmethod
    def of(names: Sequence[str], scans: Sequence[webdataset.TarScan]) -> TarListing:
        sizes = np.concatenate([np.zeros(1, np.int64), *(s.key_sizes for s in scans)])
        return TarListing(
            FileRows.of(names, [len(s.offsets) for s in scans]),
            tuple(s.reason for s in scans),
            np.concatenate([np.zeros(0, np.int64), *(s.offsets for s in scans)]),
            b"".join(s.keys for s in scans),
            np.cumsum(sizes),
        )

    def __len__(self) -> int:
        return len(self.tars)

    def __getitem__(self, rows: slice) -> TarListing:
        return dataclasses.replace(self, tars=self.tars[rows])

    def __iter__(self) -> Iterator[tuple[str, int, int, str, str]]:
        for f, a, b in self.tars.spans():
            yield from (self._sample(f, i) for i in range(a, b))

    def key(self, i: int) -> str:
        """Listing row ``i``'s sample key."""
        return self.keys[self.key_starts[i] : self.key_starts[i + 1]].decode("utf-8", "surrogateescape")

    def _sample(self, f: int, i: int) -> tuple[str, int, int, str, str]:
        start, end = int(self.tars.starts[f]), int(self.tars.starts[f + 1])
        reason = self.reasons[f] if i == end - 1 else ""
        return self.tars.names[f], i - start, int(self.offsets[i]), self.key(i), reason

    def ranges(self) -> tuple:
        """``(relpath, start, stop, offset of start, key of start, broken key, reason)`` per tar in the
        window; the last two "" unless the range ends with the tar's unreadable rest."""
        ranges = []
        for f, a, b in self.tars.spans():
            start = int(self.tars.starts[f])
            ends_broken = self.reasons[f] and b == int(self.tars.starts[f + 1])
            broken = (self.key(b - 1), self.reasons[f]) if ends_broken else ("", "")
            ranges.append(
                (self.tars.names[f], a - start, b - start, int(self.offsets[a]), self.key(a), *broken)
            )
        return tuple(ranges)


@dataclass(frozen=True)
class SourceKind:
    """One kind of source: how it lists, packs, cuts and reads. A new source is one entry of
    ``SOURCE_KINDS`` plus these functions.

    - ``list_items(cfg, files) -> (items, classes)``: one item per row, in order (``files`` is None for
      a kind selected by its URI scheme): a list of tuples, or a compact sequence whose slices are
      views (``FileRows``, ``TarListing``) for kinds with many rows;
    - ``pack(items) -> Shard.items``: a shard's items (a slice of ``list_items``' items), compact
      (``Shard`` says the layouts);
    - ``cut(shard, start, stop) -> items``: the items of rows ``[start, stop)``, or None where this shard
      cannot be cut (then it stays one task);
    - ``read(shard) -> rows``: the columns of ``row_schema``, one entry per row;
    - ``digest_keys(cfg)``: config values that change which rows are read, beside the items;
    - ``words(classes, label_words)``: the words that name each class (``class_words``);
    - ``image_words(cfg, image_ids)``: each row's own words, for kinds whose rows carry several
      (``image_words``); None for the others; ``word_weights(cfg, image_ids)``: each of them with its
      salience in (0, 1] (``image_word_weights``), or None.
    - ``group(image_id)``: the group an image belongs to, read from its id (``mnist-shifted``: its shift),
      for the evaluator's per-group breakdown; "" = no group.
    """

    name: str
    list_items: Callable[[SourceConfig, Files | None], tuple[Sequence, list[str]]]
    pack: Callable[[Sequence], tuple]
    cut: Callable[[Shard, int, int], tuple | None]
    read: Callable[[Shard], dict[str, list]]
    scheme: str = ""  # selected by the URI scheme (mnist://); "" = found by its files under a location
    extensions: tuple[str, ...] = ()  # a file kind's data files
    noun: str = ""  # its data files, in messages ("Parquet files")
    exclusive: bool = False  # found: its data, and any other files beside it are its metadata
    digest_keys: Callable[[SourceConfig], list] = lambda cfg: []
    words: Callable[[Sequence[str], str], list[list[str]] | None] = lambda classes, label_words: (
        _folder_words(classes, label_words)
    )
    captions: bool = False  # reads a caption per row when SourceConfig.caption_column asks
    keeps_listed: bool = False  # cut needs the listing's items (Shard.listed)
    holds: str = ""  # "images" or "clips" when every row is one of them ("" = either, by the files)
    image_words: Callable[[SourceConfig, Sequence[str]], list[tuple[str, ...]]] | None = None
    word_weights: Callable[[SourceConfig, Sequence[str]], list[dict[str, float]]] | None = None
    group: Callable[[str], str] = lambda image_id: ""


def source_kind(name: str) -> SourceKind:
    try:
        return SOURCE_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown source kind '{name}'; known: {', '.join(SOURCE_KINDS)}") from None


# ----------------------------------------------------------------------------- listing


def list_shards(cfg: SourceConfig) -> list[Shard]:
    """Deterministic: the same input gives the same shard ids, contents and digests."""
    by_scheme = {k.scheme: k for k in SOURCE_KINDS.values() if k.scheme}
    scheme = cfg.uri.split("://", 1)[0] if "://" in cfg.uri else ""
    kind, files = (by_scheme[scheme], None) if scheme in by_scheme else _find_kind(resolve(cfg.uri), cfg)
    if cfg.caption_column and not kind.captions:
        raise ValueError(
            f"caption_column={cfg.caption_column!r}: {kind.name} sources have no captions "
            f"(captions come from {', '.join(k.name for k in SOURCE_KINDS.values() if k.captions)})"
        )
    root = cfg.uri if files is None else files.root.uri
    items, classes = kind.list_items(cfg, files)
    if cfg.limit:
        items = items[: cfg.limit]
    if not items:
        raise FileNotFoundError(
            f"{cfg.uri}: no images or videos found "
            f"(looked for {', '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)}, .parquet)"
        )
    shards = []
    for index, start in enumerate(range(0, len(items), cfg.shard_size)):
        chunk = items[start : start + cfg.shard_size]
        packed = kind.pack(chunk)
        digest = _digest(kind, cfg, packed)
        listed = chunk if kind.keeps_listed else ()
        shards.append(
            Shard(f"{index:05d}", kind.name, root, packed, len(chunk), digest, cfg, tuple(classes), listed)
        )
    return shards


def source_info(shards: list[Shard]) -> dict[str, Any]:
    """What a manifest records about the input."""
    first = shards[0]
    return {
        "uri": first.config.uri,
        "kind": first.kind,
        "root": first.root,
        "rows": sum(s.num_rows for s in shards),
        "classes": list(first.classes),
    }


def cut_shard(shard: Shard, start: int, stop: int) -> Shard | None:
    """Rows ``[start, stop)`` of ``shard`` as a shard of its own (same id and digest), or None where
    its kind cannot cut this shard."""
    assert 0 <= start < stop <= shard.num_rows, (shard.shard_id, start, stop, shard.num_rows)
    if start == 0 and stop == shard.num_rows:
        return shard
    items = source_kind(shard.kind).cut(shard, start, stop)
    if items is None:
        return None
    listed = shard.listed[start:stop]
    return dataclasses.replace(shard, items=tuple(items), num_rows=stop - start, listed=listed)


def mnist_class_words() -> list[list[str]]:
    """``[["zero", "0"], ["one", "1"], ...]``: a digit's word and numeral, per MNIST label."""
    return [[word, str(i)] for i, word in enumerate(MNIST_CLASS_WORDS)]


def class_words(kind: str, classes: Sequence[str], label_words: str = "names") -> list[list[str]] | None:
    """The words that name each class (label ``i`` -> ``words[i]``), or None for a source without
    classes. MNIST and Moving MNIST: the digit's word and numeral. Folders: the class (folder) name; with
    ``label_words="mnist"`` a folder named by a digit or its word gets that digit's word and numeral."""
    return source_kind(kind).words(classes, label_words)


def image_words(cfg: SourceConfig, image_ids: Sequence[str]) -> list[tuple[str, ...]] | None:
    """Each row's own words (several per image: ``scenes://``), or None for a kind whose rows carry
    at most a class label."""
    scheme = cfg.uri.split("://", 1)[0] if "://" in cfg.uri else ""
    kind = next((k for k in SOURCE_KINDS.values() if k.scheme and k.scheme == scheme), None)
    return kind.image_words(cfg, image_ids) if kind is not None and kind.image_words else None


def image_word_weights(cfg: SourceConfig, image_ids: Sequence[str]) -> list[dict[str, float]] | None:
    """Each row's words with their salience in (0, 1] (``spae.scenes.Scene.salience``), or None."""
    scheme = cfg.uri.split("://", 1)[0] if "://" in cfg.uri else ""
    kind = next((k for k in SOURCE_KINDS.values() if k.scheme and k.scheme == scheme), None)
    return kind.word_weights(cfg, image_ids) if kind is not None and kind.word_weights else None


def _folder_words(classes: Sequence[str], label_words: str) -> list[list[str]] | None:
    if not classes:
        return None
    if label_words == "names":
        return [[name] for name in classes]
    if label_words != "mnist":
        raise ValueError(f"label_words: {label_words!r} is not one of {', '.join(LABEL_WORDS)}")
    digits = mnist_class_words()
    by_name = {name: words for words in digits for name in words}
    unknown = [name for name in classes if name.lower() not in by_name]
    if unknown:
        raise ValueError(
            f"label_words=mnist: class folders {unknown[:5]} are neither a digit 0-9 nor a digit's word "
            "(zero..nine); use label_words=names"
        )
    return [list(by_name[name.lower()]) for name in classes]


def _parse_mnist_uri(uri: str) -> tuple[str, int]:
    parsed = urlparse(uri)
    split = parsed.netloc or parsed.path.strip("/")
    if split not in MNIST_SPLITS:
        raise ValueError(f"{uri}: unknown MNIST split '{split}'; allowed: {', '.join(MNIST_SPLITS)}")
    query = parse_qs(parsed.query)
    unknown = sorted(set(query) - {"limit"})
    if unknown:
        raise ValueError(f"{uri}: unknown query key(s) {', '.join(unknown)}; allowed: limit")
    limit = int(query["limit"][0]) if "limit" in query else 0
    return split, limit


SHIFTED_KEYS = ("limit", "shift", "seed")


def _split_and_query(uri: str, keys: Sequence[str], what: str = "MNIST") -> tuple[str, dict[str, str]]:
    """``<scheme>://split?k=v&...`` of a generated source -> (split, {key: value}); an unknown split or
    key is a ``ValueError`` naming the URI and what is allowed."""
    parsed = urlparse(uri)
    split = parsed.netloc or parsed.path.strip("/")
    if split not in MNIST_SPLITS:
        raise ValueError(f"{uri}: unknown {what} split '{split}'; allowed: {', '.join(MNIST_SPLITS)}")
    query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
    unknown = sorted(set(query) - set(keys))
    if unknown:
        raise ValueError(f"{uri}: unknown query key(s) {', '.join(unknown)}; allowed: {', '.join(keys)}")
    return split, query


def _parse_shifted_uri(uri: str) -> tuple[str, int, str, int]:
    """``mnist-shifted://split?shift=all|<name>&limit=N&seed=S`` -> (split, limit, shift, seed)."""
    split, query = _split_and_query(uri, SHIFTED_KEYS)
    shift = query.get("shift", "all")
    if shift != "all" and shift not in SHIFTS:
        raise ValueError(f"{uri}: shift={shift!r} is not 'all' or one of {', '.join(SHIFTS)}")
    try:
        limit, seed = int(query.get("limit", 0)), int(query.get("seed", 0))
    except ValueError as e:
        raise ValueError(f"{uri}: limit and seed must be integers ({e})") from e
    return split, limit, shift, seed


def group_of(kind: str, image_id: str) -> str:
    """The group of an image of a ``kind`` source, from its id (``SourceKind.group``); "" = none."""
    return source_kind(kind).group(image_id)


def _shift_of_id(image_id: str) -> str:
    """``mnist-shifted-{split}-{shift}-{i:06d}`` -> the shift."""
    return image_id.rsplit("-", 2)[1]


def shift_of(shift: str, index: int) -> str:
    """The shift of item ``index`` of an ``mnist-shifted://`` source: ``shift``, or with ``all`` each
    shift in turn (item i gets the (i mod 9)-th), so every shift covers every part of the split."""
    return shift if shift != "all" else tuple(SHIFTS)[index % len(SHIFTS)]


def _parse_moving_mnist_uri(uri: str) -> tuple[str, dict[str, int]]:
    """``moving-mnist://split?k=v`` -> (split, {limit, frames, digits, size, digit_size, seed})."""
    split, query = _split_and_query(uri, MOVING_MNIST_KEYS)
    defaults = {"limit": 0, **{k: getattr(MovingMnistConfig(), k) for k in MOVING_MNIST_KEYS[1:]}}
    params = {}
    for key, default in defaults.items():
        raw = query.get(key, str(default))
        try:
            params[key] = int(raw)
        except ValueError as e:
            raise ValueError(f"{uri}: {key}={raw!r} is not an integer") from e
    MovingMnistConfig(**{k: params[k] for k in MOVING_MNIST_KEYS[1:]})  # ValueError for bad values
    return split, params


def _list_mnist(cfg: SourceConfig, files: Files | None) -> tuple[FileRows, list[str]]:
    split, limit = _parse_mnist_uri(cfg.uri)
    limit = min(x for x in (limit, cfg.limit, _mnist_size(split)) if x > 0)
    return FileRows.of([split], [limit]), []


def _list_mnist_shifted(cfg: SourceConfig, files: Files | None) -> tuple[FileRows, list[str]]:
    split, limit, _, _ = _parse_shifted_uri(cfg.uri)
    limit = min(x for x in (limit, cfg.limit, _mnist_size(split)) if x > 0)
    return FileRows.of([split], [limit]), []


def _list_moving_mnist(cfg: SourceConfig, files: Files | None) -> tuple[FileRows, list[str]]:
    split, params = _parse_moving_mnist_uri(cfg.uri)
    limit = min(x for x in (params.pop("limit"), cfg.limit, _mnist_size(split)) if x > 0)
    return FileRows.of([split], [limit]), []


def _parse_scenes_uri(uri: str) -> tuple[str, int, SceneConfig]:
    """``scenes://split?k=v`` -> (split, limit, SceneConfig)."""
    split, query = _split_and_query(uri, SCENES_KEYS, "scenes")
    params = {}
    for key in SCENES_KEYS:
        if key in query:
            try:
                params[key] = int(query[key])
            except ValueError as e:
                raise ValueError(f"{uri}: {key}={query[key]!r} is not an integer") from e
    limit = params.pop("limit", 0)
    try:
        cfg = SceneConfig(**params)
    except ValueError as e:
        raise ValueError(f"{uri}: {e}") from e
    return split, limit, cfg


def _list_scenes(cfg: SourceConfig, files: Files | None) -> tuple[FileRows, list[str]]:
    split, limit, _ = _parse_scenes_uri(cfg.uri)
    limit = min(x for x in (limit, cfg.limit, SPLIT_SIZES[split]) if x > 0)
    return FileRows.of([split], [limit]), list(SHAPES)


def _scene_id(split: str, index: int) -> str:
    return f"scenes-{split}-{index:06d}"


def _scene_layouts(cfg: SourceConfig, image_ids: Sequence[str]) -> list[Scene]:
    """Each ``scenes-<split>-<index>`` row's layout (no drawing)."""
    split, _, scene_cfg = _parse_scenes_uri(cfg.uri)
    out = []
    for image_id in image_ids:
        prefix, _, index = str(image_id).rpartition("-")
        if prefix != f"scenes-{split}" or not index.isdigit():
            raise ValueError(f"{cfg.uri}: image id {image_id!r} is not a scene of this source")
        out.append(scene_layout(split, int(index), scene_cfg))
    return out


def _find_kind(loc: Location, cfg: SourceConfig) -> tuple[SourceKind, Files]:
    """The file kind of a location (one file, or a folder listed recursively) and its data files."""
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{cfg.uri} does not exist")
    if info.type == pafs.FileType.File:
        base, files = loc.path.rsplit("/", 1)[0], [info]
    else:
        base = loc.path.rstrip("/")
        selector = pafs.FileSelector(base, recursive=True)
        files = [i for i in loc.fs.get_file_info(selector) if i.type == pafs.FileType.File]
    rel = sorted(
        (f.path[len(base) + 1 :], f.size or 0)
        for f in files
        if not any(part.startswith((".", "_")) for part in f.path[len(base) + 1 :].split("/"))
    )
    root = resolve(loc.uri if info.type == pafs.FileType.Directory else loc.uri.rsplit("/", 1)[0])
    found = [
        (kind, [(p, s) for p, s in rel if p.lower().endswith(kind.extensions)])
        for kind in SOURCE_KINDS.values()
        if kind.extensions
    ]
    found = [(kind, mine) for kind, mine in found if mine]
    if found and found[0][0].exclusive:  # e.g. tars: img2dataset's .parquet / .json beside them are metadata
        found = found[:1]
    if len(found) > 1:
        (a, a_files), (b, b_files) = found[:2]
        raise ValueError(
            f"{cfg.uri}: holds both {a.noun} and {b.noun}; point the source at one kind "
            f"(e.g. {a_files[0][0]} or {b_files[0][0]})"
        )
    if info.type == pafs.FileType.File and not found:
        raise ValueError(f"{cfg.uri}: not an image, tar or Parquet file")
    if not found:  # an empty folder: list_shards says what it looked for
        return SOURCE_KINDS["folder"], Files(root, [])
    kind, mine = found[0]
    return kind, Files(root, mine)


def _list_folder(cfg: SourceConfig, files: Files | None) -> tuple[list[tuple], list[str]]:
    """ImageFolder-style: the first folder under the root is the class."""
    images = files.found
    classes = sorted({p.split("/", 1)[0] for p, _ in images if "/" in p})
    index = {c: i for i, c in enumerate(classes)}
    items = [(p, size, index[p.split("/", 1)[0]] if "/" in p else -1) for p, size in images]
    return items, classes


def _list_parquet(cfg: SourceConfig, files: Files | None) -> tuple[FileRows, list[str]]:
    """Every row of every file, as its file's row count (``FileRows``; read from the footers)."""
    counts = []
    for relpath, _ in files.found:
        loc = files.root.join(relpath)
        with loc.fs.open_input_file(loc.path) as f:
            meta = pq.read_metadata(f)
        _check_parquet_schema(meta.schema.to_arrow_schema(), cfg, loc.uri)
        counts.append(meta.num_rows)
    return FileRows.of([p for p, _ in files.found], counts), []


def _list_tars(cfg: SourceConfig, files: Files | None) -> tuple[TarListing, list[str]]:
    """Every sample of every tar (``TarListing``): tars scanned in parallel and folded into the listing
    in order as their scans arrive, so only the tars being scanned exist as per-sample objects; the scan
    stops once ``cfg.limit`` samples are listed."""

    tars = [p for p, _ in files.found]
    scans: list[webdataset.TarScan] = []
    rows = 0
    scan = functools.partial(webdataset.scan_tar_file, files.root)
    workers = min(LIST_WORKERS, os.cpu_count() or 1, len(tars))
    for one in _in_order(scan, tars, workers, processes=len(tars) >= LIST_PROCESSES_FROM):
        scans.append(one)
        rows += len(one.offsets)
        if cfg.limit and rows >= cfg.limit:
            break
    return TarListing.of(tars[: len(scans)], scans), []


def _in_order(
    fn: Callable[[str], Any], args: Sequence[str], workers: int, processes: bool = False
) -> Iterator[Any]:
    """``fn(arg)`` for each of ``args``, in order, run by ``workers`` threads (``processes``: spawned
    processes, for work that holds the GIL; ``fn`` and its results must pickle); at most ``2 * workers``
    calls are started ahead of the one the caller waits for (results do not pile up)."""
    workers = max(1, workers)
    spawn = multiprocessing.get_context("spawn")  # never fork: the caller may hold Ray's threads
    pool = ProcessPoolExecutor(workers, mp_context=spawn) if processes else ThreadPoolExecutor(workers)
    with pool:
        ahead: deque[Future] = deque()
        todo = iter(args)
        try:
            for arg in todo:
                ahead.append(pool.submit(fn, arg))
                if len(ahead) >= 2 * workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:  # the caller stopped early (a limit) or failed: start no more calls
            for future in ahead:
                future.cancel()


def _check_parquet_schema(schema: pa.Schema, cfg: SourceConfig, uri: str) -> None:
    names = schema.names
    if cfg.image_column not in names:
        raise ValueError(f"{uri}: no image column '{cfg.image_column}'; columns: {', '.join(names)}")
    t = schema.field(cfg.image_column).type
    ok = pa.types.is_binary(t) or pa.types.is_large_binary(t)
    ok = ok or (  # the image struct of Hugging Face datasets: {"bytes": binary, "path": string}
        pa.types.is_struct(t)
        and t.get_field_index("bytes") >= 0
        and (pa.types.is_binary(t.field("bytes").type) or pa.types.is_large_binary(t.field("bytes").type))
    )
    ok = ok or (
        pa.types.is_list(t) and (pa.types.is_binary(t.value_type) or pa.types.is_large_binary(t.value_type))
    )
    if not ok:
        raise ValueError(
            f"{uri}: column '{cfg.image_column}' is {t}; expected binary, a struct with 'bytes' or "
            "list<binary> (one image file per frame of a clip)"
        )
    if cfg.id_column and cfg.id_column not in names:
        raise ValueError(f"{uri}: no id column '{cfg.id_column}'; columns: {', '.join(names)}")
    if cfg.label_column in names and not pa.types.is_integer(schema.field(cfg.label_column).type):
        raise ValueError(f"{uri}: label column '{cfg.label_column}' must hold integers")
    if cfg.caption_column:
        if cfg.caption_column not in names:
            raise ValueError(f"{uri}: no caption column '{cfg.caption_column}'; columns: {', '.join(names)}")
        t = schema.field(cfg.caption_column).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise ValueError(f"{uri}: caption column '{cfg.caption_column}' is {t}; expected strings")


# ----------------------------------------------------------------------------- packing and cutting


def _pack_each(chunk: list[tuple]) -> tuple:
    """One item per row (folders)."""
    return tuple(chunk)


def _pack_ranges(chunk: list[tuple]) -> tuple:
    """``(name, row)`` items -> contiguous ``(name, start, stop)`` row ranges (``FileRows.ranges`` does
    this for a compact listing)."""
    ranges: list[list] = []  # [name, start, stop]
    for name, row in chunk:
        if ranges and ranges[-1][0] == name and ranges[-1][2] == row:
            ranges[-1][2] = row + 1
        else:
            ranges.append([name, row, row + 1])
    return tuple(tuple(r) for r in ranges)


def _pack_listing(chunk: FileRows | TarListing) -> tuple:
    """A slice of a compact listing -> its row ranges (``FileRows.ranges``, ``TarListing.ranges``)."""
    return chunk.ranges()


def _cut_each(shard: Shard, start: int, stop: int) -> tuple:
    return shard.items[start:stop]


def _cut_ranges(shard: Shard, start: int, stop: int) -> tuple:
    items, offset = [], 0
    for name, a, b in shard.items:
        lo, hi = max(start - offset, 0), min(stop - offset, b - a)
        if lo < hi:
            items.append((name, a + lo, a + hi))
        offset += b - a
    return tuple(items)


def _cut_tar_ranges(shard: Shard, start: int, stop: int) -> tuple | None:
    """From the listing's samples (their byte offsets and keys): None for a shard rebuilt from JSON."""
    return shard.listed[start:stop].ranges() if shard.listed else None


def _digest(kind: SourceKind, cfg: SourceConfig, items: tuple) -> str:
    keys = [kind.name, items, *kind.digest_keys(cfg)]
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- reading


def read_shard(shard: Shard) -> pa.Table:
    """All rows of one shard, in item order, as a ``row_schema(shard.config)`` table."""
    rows = source_kind(shard.kind).read(shard)
    schema = row_schema(shard.config)
    table = pa.Table.from_pydict({name: rows[name] for name in schema.names}, schema=schema)
    assert table.num_rows == shard.num_rows, (shard.shard_id, table.num_rows, shard.num_rows)
    return table


def row_schema(cfg: SourceConfig) -> pa.Schema:
    """``ROW_SCHEMA``, and ``caption`` (string, null when a row has none) when ``caption_column`` asks."""
    return ROW_SCHEMA.append(CAPTION_FIELD) if cfg.caption_column else ROW_SCHEMA


def _empty_rows() -> dict[str, list]:
    return {name: [] for name in (*ROW_SCHEMA.names, CAPTION_FIELD.name)}


def _add(
    rows: dict,
    image_id: str,
    source: str,
    label: int | None,
    data: bytes,
    path: str,
    error: str | None = None,
    caption: str | None = None,
) -> None:
    rows["caption"].append(caption)
    rows["image_id"].append(image_id)
    rows["source"].append(source)
    rows["label"].append(label)
    rows["image_bytes"].append(data)
    rows["path"].append(path)
    rows["error"].append(error)
    rows["error_stage"].append("read" if error else None)


@lru_cache(maxsize=1)
def _mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    return load_mnist(split)


def _mnist_size(split: str) -> int:
    return len(_mnist_arrays(split)[1])


def _read_mnist(shard: Shard) -> dict[str, list]:
    rows = _empty_rows()
    for split, start, stop in shard.items:
        images, labels = _mnist_arrays(split)  # uint8 [n, 28, 28], int64 [n]
        for i in range(start, stop):
            buf = io.BytesIO()
            Image.fromarray(images[i], mode="L").save(buf, format="PNG")
            uri = f"mnist://{split}#{i}"
            _add(rows, f"mnist-{split}-{i:06d}", shard.config.uri, int(labels[i]), buf.getvalue(), uri)
    return rows


def _read_mnist_shifted(shard: Shard) -> dict[str, list]:
    _, _, shift, seed = _parse_shifted_uri(shard.config.uri)
    rows = _empty_rows()
    for split, start, stop in shard.items:
        images, labels = _mnist_arrays(split)  # uint8 [n, 28, 28], int64 [n]
        for i in range(start, stop):
            name = shift_of(shift, i)
            digit = shift_digit(images[i], int(labels[i]), name, seed, i)  # uint8 [28, 28]
            buf = io.BytesIO()
            Image.fromarray(digit, mode="L").save(buf, format="PNG")
            uri = f"mnist-shifted://{split}#{i}"
            image_id = f"mnist-shifted-{split}-{name}-{i:06d}"
            _add(rows, image_id, shard.config.uri, int(labels[i]), buf.getvalue(), uri)
    return rows


def _read_moving_mnist(shard: Shard) -> dict[str, list]:
    _, params = _parse_moving_mnist_uri(shard.config.uri)
    cfg = MovingMnistConfig(**{k: params[k] for k in MOVING_MNIST_KEYS[1:]})
    rows = _empty_rows()
    for split, start, stop in shard.items:
        clips = moving_mnist(split, start, stop, cfg)
        for j, i in enumerate(range(start, stop)):
            digits = "".join(str(int(d)) for d in clips.labels[j])
            uri = f"moving-mnist://{split}#{i}"
            data = clip_npy(clips.clips[j])  # [T, H, W] uint8
            _add(
                rows,
                f"mmnist-{split}-{i:06d}-d{digits}",
                shard.config.uri,
                int(clips.labels[j, 0]),
                data,
                uri,
            )
    return rows


def _read_scenes(shard: Shard) -> dict[str, list]:
    _, _, scene_cfg = _parse_scenes_uri(shard.config.uri)
    rows = _empty_rows()
    for split, start, stop in shard.items:
        batch = scenes(split, start, stop, scene_cfg)  # uint8 [n, S, S, 3]
        for j, i in enumerate(range(start, stop)):
            buf = io.BytesIO()
            Image.fromarray(batch.images[j], mode="RGB").save(buf, format="PNG")
            label = SHAPES.index(batch.scenes[j].dominant.shape)
            _add(rows, _scene_id(split, i), shard.config.uri, label, buf.getvalue(), f"scenes://{split}#{i}")
    return rows


def _read_folder(shard: Shard) -> dict[str, list]:
    root = resolve(shard.root)
    rows = _empty_rows()
    for relpath, _, label in shard.items:
        loc = root.join(relpath)
        try:
            with loc.fs.open_input_stream(loc.path) as f:
                data, error = f.read(), None
        except Exception as e:  # noqa: BLE001 - any read failure becomes an error row
            data, error = b"", f"unreadable: {type(e).__name__}: {e}"
        _add(rows, relpath, shard.config.uri, None if label < 0 else label, data, loc.uri, error)
    return rows


def _read_parquet(shard: Shard) -> dict[str, list]:
    cfg = shard.config
    root = resolve(shard.root)
    rows = _empty_rows()
    for relpath, start, stop in shard.items:
        loc = root.join(relpath)
        with loc.fs.open_input_file(loc.path) as f:
            pf = pq.ParquetFile(f)
            wanted = (cfg.image_column, cfg.label_column, cfg.id_column, cfg.caption_column)
            columns = [c for c in wanted if c and c in pf.schema_arrow.names]
            table = _read_row_range(pf, columns, start, stop)
        images = table.column(cfg.image_column)
        paths = [None] * table.num_rows  # the image struct's file paths, for rows without bytes
        if pa.types.is_struct(images.type):
            images, paths = _image_struct(images)
        elif pa.types.is_list(images.type):  # one image file per frame: pack each clip into one blob
            images = [None if v is None else pack_frames(v) for v in images.to_pylist()]
        else:
            images = images.to_pylist()
        labels = (
            table.column(cfg.label_column).to_pylist()
            if cfg.label_column in columns
            else [None] * len(images)
        )
        captions = (
            table.column(cfg.caption_column).to_pylist() if cfg.caption_column else [None] * len(images)
        )
        stem = relpath[: -len(".parquet")]
        if cfg.id_column:
            ids = [str(x) for x in table.column(cfg.id_column).to_pylist()]
        else:
            ids = [f"{stem}-{row}" for row in range(start, stop)]
        folder = resolve(loc.uri.rsplit("/", 1)[0])
        for j, (image_id, data, label, caption) in enumerate(zip(ids, images, labels, captions, strict=True)):
            error = "missing image bytes (null)" if data is None else None
            if data is None and paths[j]:
                data, error = _read_beside(folder, paths[j])
            _add(rows, image_id, cfg.uri, label, data or b"", f"{loc.uri}#{start + j}", error, caption)
    return rows


def _image_struct(column: pa.ChunkedArray) -> tuple[list[bytes | None], list[str | None]]:
    """The image struct of Hugging Face datasets, ``{"bytes": binary, "path": string}`` (``path``
    optional) -> (bytes, path) per row; a null struct has neither."""
    kind = column.type
    data, paths = [], []
    for chunk in column.chunks:
        fields = dict(zip([kind.field(i).name for i in range(kind.num_fields)], chunk.flatten(), strict=True))
        data += fields["bytes"].to_pylist()
        path = fields.get("path")
        named = path is not None and (pa.types.is_string(path.type) or pa.types.is_large_string(path.type))
        paths += path.to_pylist() if named else [None] * len(chunk)
    return data, paths


def _read_beside(folder: Location, path: str) -> tuple[bytes, str | None]:
    """An image struct's file, for a row whose bytes are null: ``path`` relative to the Parquet
    file's folder -> (bytes, None), or (b"", the reason naming the path)."""
    loc = folder.join(path)
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read(), None
    except Exception as e:  # noqa: BLE001 - any read failure becomes an error row
        return b"", f"missing image bytes (null) and its path {path!r} is unreadable: {type(e).__name__}: {e}"


def _read_webdataset(shard: Shard) -> dict[str, list]:
    root = resolve(shard.root)
    rows = _empty_rows()
    for relpath, start, stop, offset, key, broken, reason in shard.items:
        loc = root.join(relpath)
        stem = relpath[: -len(".tar")]
        whole = stop - start - (1 if reason else 0)  # samples before the tar's unreadable rest
        if whole:
            with loc.fs.open_input_file(loc.path) as raw:
                raw.seek(offset)
                stream = pa.input_stream(raw, buffer_size=webdataset.READ_BUFFER)
                samples = webdataset.read_tar_range(
                    stream,
                    whole,
                    shard.config.label_column,
                    first_key=key,
                    caption_key=shard.config.caption_column,
                )
            for sample in samples:
                path = f"{loc.uri}#{sample.member or sample.key}"
                _add(
                    rows,
                    f"{stem}/{sample.key}",
                    shard.config.uri,
                    sample.label,
                    sample.image,
                    path,
                    sample.error,
                    sample.caption,
                )
        if reason:
            _add(rows, f"{stem}/{broken}", shard.config.uri, None, b"", loc.uri, reason)
    return rows


def _read_row_range(pf: pq.ParquetFile, columns: list[str], start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    groups, offset, first = [], 0, None
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - first, stop - start)


def _parquet_keys(cfg: SourceConfig) -> list:
    return [cfg.image_column, cfg.label_column, cfg.id_column, *_caption_keys(cfg)]


def _caption_keys(cfg: SourceConfig) -> list:
    """Asking for captions adds a column: a changed digest, so old outputs without it are not resumed."""
    return [{"caption_column": cfg.caption_column}] if cfg.caption_column else []


# file kinds are looked for in this order (the first exclusive one found wins)
SOURCE_KINDS: dict[str, SourceKind] = {
    k.name: k
    for k in (
        SourceKind(
            "mnist",
            _list_mnist,
            _pack_listing,
            _cut_ranges,
            _read_mnist,
            holds="images",
            scheme="mnist",
            words=lambda classes, label_words: mnist_class_words(),
        ),
        SourceKind(
            "mnist-shifted",
            _list_mnist_shifted,
            _pack_listing,
            _cut_ranges,
            _read_mnist_shifted,
            holds="images",
            scheme="mnist-shifted",
            digest_keys=lambda cfg: list(_parse_shifted_uri(cfg.uri)[2:]),  # the shift and the seed
            words=lambda classes, label_words: mnist_class_words(),
            group=_shift_of_id,
        ),
        SourceKind(
            "moving-mnist",
            _list_moving_mnist,
            _pack_listing,
            _cut_ranges,
            _read_moving_mnist,
            holds="clips",
            scheme="moving-mnist",
            words=lambda classes, label_words: mnist_class_words(),
        ),
        SourceKind(
            "webdataset",
            _list_tars,
            _pack_listing,
            _cut_tar_ranges,
            _read_webdataset,
            extensions=(".tar",),
            noun="tar files",
            exclusive=True,
            digest_keys=_caption_keys,
            captions=True,
            keeps_listed=True,
        ),
        SourceKind(
            "parquet",
            _list_parquet,
            _pack_listing,
            _cut_ranges,
            _read_parquet,
            extensions=(".parquet",),
            noun="Parquet files",
            digest_keys=_parquet_keys,
            captions=True,
        ),
        SourceKind(
            "folder",
            _list_folder,
            _pack_each,
            _cut_each,
            _read_folder,
            extensions=IMAGE_EXTENSIONS + VIDEO_EXTENSIONS,
            noun="image files",
        ),
        SourceKind(
            "scenes",
            _list_scenes,
            _pack_listing,
            _cut_ranges,
            _read_scenes,
            holds="images",
            scheme="scenes",
            digest_keys=lambda cfg: [repr(_parse_scenes_uri(cfg.uri)[2])],  # size, seed, objects
            words=lambda classes, label_words: [[name] for name in classes],  # the dominant shape
            image_words=lambda cfg, ids: [scene.words for scene in _scene_layouts(cfg, ids)],
            word_weights=lambda cfg, ids: [scene.salience for scene in _scene_layouts(cfg, ids)],
        ),
    )
}


# ----------------------------------------------------------------------------- decoding in this process


@dataclass(frozen=True)
class DecodedImages:
    """A whole (small) source decoded in this process: the rows that decoded, and why others did not."""

    image_ids: list[str]
    labels: np.ndarray  # int64 [n], -1 = no label
    pixels: np.ndarray  # uint8 [n, size, size, 3] (clips: [n, T, size, size, 3])
    errors: dict[str, str]  # image_id -> reason, for rows left out


def decode_source(cfg: SourceConfig, decode: DecodeOptions) -> DecodedImages:
    """Every image (clip, for ``decode.frames > 0``) of a source, without Ray (probe training, evaluation
    sets)."""
    ids, labels, pixels, errors = [], [], [], {}
    for shard in list_shards(cfg):
        out = decode_table(read_shard(shard), decode)
        bad = error_mask(out["error"])
        errors.update({out["image_id"][i]: out["error"][i] for i in np.flatnonzero(bad)})
        ids += [str(x) for x in out["image_id"][~bad]]
        labels.append(np.array([-1 if x is None else x for x in out["label"][~bad]], dtype=np.int64))
        pixels.append(out["pixels"][~bad])
    return DecodedImages(ids, np.concatenate(labels), np.concatenate(pixels), errors)
