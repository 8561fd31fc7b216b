"""Image sources -> deterministic input shards -> rows of image bytes.

A source is one URI:

- ``mnist://train|valid|test[?limit=N]``: the built-in MNIST asset (images PNG-encoded, so they take
  the same decode path as files);
- ``moving-mnist://train|valid|test[?limit=N&frames=16&digits=1&size=32&digit_size=0&seed=0]``: the
  built-in Moving MNIST generator (``spae.video``), one clip per row stored as ``.npy`` bytes of
  uint8 ``[T, H, W]``; ``label`` is the first digit shown (all of them are in the image id, e.g.
  ``mmnist-train-000003-d37``); ``limit`` defaults to the split's MNIST size;
- a folder of images or videos (``VIDEO_EXTENSIONS``: mp4, webm, ..., npy; GIFs count as images and
  decode as clips when the job asks for clips), local or ``s3://``, listed recursively and sorted;
  ImageFolder-style labels: the first folder under the root is the class name, classes map to
  ints in sorted order, files directly under the root have no label; ``label_words`` says which words
  name a class (``class_words``): the folder name (``names``), or for folders of digits (``mnist``) the
  digit's word and numeral, as for ``mnist://`` (a folder ``7`` or ``seven`` is named by ``seven`` and
  ``7``);
- WebDataset tar shards (one ``.tar``, or a folder / ``s3://`` prefix of them), as img2dataset writes them:
  ``<key>.jpg|png|webp`` with ``<key>.json|txt|cls`` beside it (``pipeline.webdataset``); image ids are
  ``<tar name>/<key>``, labels come from ``<key>.cls`` or the ``label_column`` key of ``<key>.json``;
  other files beside the tars (img2dataset's ``.parquet`` and ``_stats.json``) are ignored;
- Parquet files (one file, or a folder / ``s3://`` prefix of them) with an image column holding
  bytes or a struct with a ``bytes`` field (as Hugging Face datasets write it); for clips the bytes
  may be a video file or ``.npy`` frame tensor, or the column a ``list<binary>`` of per-frame image
  files (packed with ``pipeline.video.pack_frames``).

``list_shards`` groups the sorted items into shards of ``shard_size``: shard ids come from the
shard index (``00000``) and every shard carries a digest of its item list, so a changed input is
detected instead of silently mixed into an old output. ``read_shard`` turns one shard into a table
(``image_id``, ``source``, ``label``, ``image_bytes``, ``path``, ``error``, ``error_stage``); a file
that cannot be read gives a row with empty bytes and the reason, never an exception.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import webdataset
from pipeline.storage import Location, resolve
from pipeline.video import VIDEO_EXTENSIONS, clip_npy, pack_frames

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MNIST_SPLITS = ("train", "valid", "test")
MOVING_MNIST_KEYS = ("limit", "frames", "digits", "size", "digit_size", "seed")

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


LABEL_WORDS = ("names", "mnist")


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
    """

    shard_id: str
    kind: str  # "mnist" | "moving-mnist" | "folder" | "parquet" | "webdataset"
    root: str  # URI the relative paths in items are under
    items: tuple = field(repr=False)
    num_rows: int
    digest: str
    config: SourceConfig
    classes: tuple[str, ...] = ()

    def to_json(self) -> str:
        data = {
            "shard_id": self.shard_id,
            "kind": self.kind,
            "root": self.root,
            "items": [list(i) for i in self.items],
            "num_rows": self.num_rows,
            "digest": self.digest,
            "config": self.config.__dict__,
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


# ----------------------------------------------------------------------------- listing


def list_shards(cfg: SourceConfig) -> list[Shard]:
    """Deterministic: the same input gives the same shard ids, contents and digests."""
    if cfg.uri.startswith("mnist://"):
        split, limit = _parse_mnist_uri(cfg.uri)
        n = _mnist_size(split)
        limit = min(x for x in (limit, cfg.limit, n) if x > 0)
        kind, root, items, classes = "mnist", cfg.uri, [(split, i) for i in range(limit)], ()
    elif cfg.uri.startswith("moving-mnist://"):
        split, params = _parse_moving_mnist_uri(cfg.uri)
        limit = min(x for x in (params.pop("limit"), cfg.limit, _mnist_size(split)) if x > 0)
        kind, root, items, classes = "moving-mnist", cfg.uri, [(split, i) for i in range(limit)], ()
    else:
        loc = resolve(cfg.uri)
        kind, root, items, classes = _list_location(loc, cfg)
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
        packed = _pack(kind, chunk)
        num_rows = len(chunk)
        digest = _digest(kind, cfg, packed)
        shard_id = f"{index:05d}"
        shards.append(Shard(shard_id, kind, root, packed, num_rows, digest, cfg, tuple(classes)))
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


def mnist_class_words() -> list[list[str]]:
    """``[["zero", "0"], ["one", "1"], ...]``: a digit's word and numeral, per MNIST label."""
    from spae.data import MNIST_CLASS_WORDS

    return [[word, str(i)] for i, word in enumerate(MNIST_CLASS_WORDS)]


def class_words(kind: str, classes: Sequence[str], label_words: str = "names") -> list[list[str]] | None:
    """The words that name each class (label ``i`` -> ``words[i]``), or None for a source without
    classes. MNIST and Moving MNIST: the digit's word and numeral. Folders: the class (folder) name; with
    ``label_words="mnist"`` a folder named by a digit or its word gets that digit's word and numeral."""
    if kind in ("mnist", "moving-mnist"):
        return mnist_class_words()
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


def _parse_moving_mnist_uri(uri: str) -> tuple[str, dict[str, int]]:
    """``moving-mnist://split?k=v`` -> (split, {limit, frames, digits, size, digit_size, seed})."""
    from spae.video import MovingMnistConfig

    parsed = urlparse(uri)
    split = parsed.netloc or parsed.path.strip("/")
    if split not in MNIST_SPLITS:
        raise ValueError(f"{uri}: unknown MNIST split '{split}'; allowed: {', '.join(MNIST_SPLITS)}")
    query = parse_qs(parsed.query)
    unknown = sorted(set(query) - set(MOVING_MNIST_KEYS))
    if unknown:
        raise ValueError(
            f"{uri}: unknown query key(s) {', '.join(unknown)}; allowed: {', '.join(MOVING_MNIST_KEYS)}"
        )
    defaults = {"limit": 0, **{k: getattr(MovingMnistConfig(), k) for k in MOVING_MNIST_KEYS[1:]}}
    params = {}
    for key, default in defaults.items():
        raw = query.get(key, [str(default)])[0]
        try:
            params[key] = int(raw)
        except ValueError as e:
            raise ValueError(f"{uri}: {key}={raw!r} is not an integer") from e
    MovingMnistConfig(**{k: params[k] for k in MOVING_MNIST_KEYS[1:]})  # ValueError for bad values
    return split, params


def _list_location(loc: Location, cfg: SourceConfig) -> tuple[str, str, list[tuple], list[str]]:
    """-> (kind, root URI the item paths are relative to, items, class names)."""
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
    root_uri = loc.uri if info.type == pafs.FileType.Directory else loc.uri.rsplit("/", 1)[0]
    tars = [p for p, _ in rel if p.lower().endswith(".tar")]
    if tars:  # WebDataset: the tars are the data; img2dataset's .parquet / .json beside them are metadata
        return "webdataset", root_uri, _list_tars(resolve(root_uri), tars), []
    parquet = [(p, s) for p, s in rel if p.lower().endswith(".parquet")]
    images = [(p, s) for p, s in rel if p.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)]
    if parquet and images:
        raise ValueError(
            f"{cfg.uri}: holds both Parquet files and image files; point the source at one kind "
            f"(e.g. {parquet[0][0]} or {images[0][0]})"
        )
    if info.type == pafs.FileType.File and not parquet and not images:
        raise ValueError(f"{cfg.uri}: not an image, tar or Parquet file")
    if parquet:
        items = []
        for relpath, _ in parquet:
            with loc.fs.open_input_file(f"{base}/{relpath}") as f:
                meta = pq.read_metadata(f)
            _check_parquet_schema(meta.schema.to_arrow_schema(), cfg, f"{root_uri}/{relpath}")
            items += [(relpath, row) for row in range(meta.num_rows)]
        return "parquet", root_uri, items, []
    classes = sorted({p.split("/", 1)[0] for p, _ in images if "/" in p})
    index = {c: i for i, c in enumerate(classes)}
    items = [(p, size, index[p.split("/", 1)[0]] if "/" in p else -1) for p, size in images]
    return "folder", root_uri, items, classes


def _list_tars(root: Location, tars: list[str]) -> list[tuple]:
    """One item per sample of every tar: (relpath, index, offset, key, reason); tars scanned in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    def scan(relpath: str) -> list[tuple]:
        loc = root.join(relpath)
        size = loc.fs.get_file_info(loc.path).size
        with loc.fs.open_input_stream(loc.path, buffer_size=webdataset.READ_BUFFER) as f:
            samples = webdataset.scan_tar(f, size)
        return [(relpath, i, s.offset, s.key, s.reason) for i, s in enumerate(samples)]

    with ThreadPoolExecutor(max_workers=min(8, len(tars))) as pool:
        return [item for items in pool.map(scan, tars) for item in items]


def _check_parquet_schema(schema: pa.Schema, cfg: SourceConfig, uri: str) -> None:
    names = schema.names
    if cfg.image_column not in names:
        raise ValueError(f"{uri}: no image column '{cfg.image_column}'; columns: {', '.join(names)}")
    t = schema.field(cfg.image_column).type
    ok = pa.types.is_binary(t) or pa.types.is_large_binary(t)
    ok = ok or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
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


def _pack(kind: str, chunk: list[tuple]) -> tuple:
    """Compact item lists: contiguous row ranges instead of one entry per row."""
    if kind == "folder":
        return tuple(chunk)
    if kind == "webdataset":  # [relpath, start, stop, offset of start, key of start, broken key, reason]
        ranges = []
        for relpath, index, offset, key, reason in chunk:
            broken = (key, reason) if reason else ("", "")
            if ranges and ranges[-1][0] == relpath and ranges[-1][2] == index:
                ranges[-1][2], ranges[-1][5:] = index + 1, broken
            else:
                ranges.append([relpath, index, index + 1, offset, key, *broken])
        return tuple(tuple(r) for r in ranges)
    ranges: list[list] = []  # [name, start, stop]
    for name, row in chunk:
        if ranges and ranges[-1][0] == name and ranges[-1][2] == row:
            ranges[-1][2] = row + 1
        else:
            ranges.append([name, row, row + 1])
    return tuple(tuple(r) for r in ranges)


def _digest(kind: str, cfg: SourceConfig, items: tuple) -> str:
    keys = [kind, items]
    if kind == "parquet":
        keys += [cfg.image_column, cfg.label_column, cfg.id_column]
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- reading


def read_shard(shard: Shard) -> pa.Table:
    """All rows of one shard, in item order, as a ``ROW_SCHEMA`` table."""
    if shard.kind == "mnist":
        rows = _read_mnist(shard)
    elif shard.kind == "moving-mnist":
        rows = _read_moving_mnist(shard)
    elif shard.kind == "folder":
        rows = _read_folder(shard)
    elif shard.kind == "parquet":
        rows = _read_parquet(shard)
    elif shard.kind == "webdataset":
        rows = _read_webdataset(shard)
    else:
        raise ValueError(f"shard {shard.shard_id}: unknown kind '{shard.kind}'")
    table = pa.Table.from_pydict({name: rows[name] for name in ROW_SCHEMA.names}, schema=ROW_SCHEMA)
    assert table.num_rows == shard.num_rows, (shard.shard_id, table.num_rows, shard.num_rows)
    return table


def _empty_rows() -> dict[str, list]:
    return {name: [] for name in ROW_SCHEMA.names}


def _add(rows: dict, image_id: str, source: str, label: int | None, data: bytes, path: str, error=None):
    rows["image_id"].append(image_id)
    rows["source"].append(source)
    rows["label"].append(label)
    rows["image_bytes"].append(data)
    rows["path"].append(path)
    rows["error"].append(error)
    rows["error_stage"].append("read" if error else None)


@lru_cache(maxsize=1)
def _mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    from spae.data import load_mnist

    return load_mnist(split)


def _mnist_size(split: str) -> int:
    return len(_mnist_arrays(split)[1])


def _read_mnist(shard: Shard) -> dict[str, list]:
    from PIL import Image

    rows = _empty_rows()
    for split, start, stop in shard.items:
        images, labels = _mnist_arrays(split)  # uint8 [n, 28, 28], int64 [n]
        for i in range(start, stop):
            buf = io.BytesIO()
            Image.fromarray(images[i], mode="L").save(buf, format="PNG")
            uri = f"mnist://{split}#{i}"
            _add(rows, f"mnist-{split}-{i:06d}", shard.config.uri, int(labels[i]), buf.getvalue(), uri)
    return rows


def _read_moving_mnist(shard: Shard) -> dict[str, list]:
    from spae.video import MovingMnistConfig, moving_mnist

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
            columns = [
                c for c in (cfg.image_column, cfg.label_column, cfg.id_column) if c in pf.schema_arrow.names
            ]
            table = _read_row_range(pf, columns, start, stop)
        images = table.column(cfg.image_column)
        if pa.types.is_struct(images.type):
            images = pa.chunked_array(
                [c.field("bytes") for c in images.chunks], images.type.field("bytes").type
            )
        if pa.types.is_list(images.type):  # one image file per frame: pack each clip into one blob
            images = [None if v is None else pack_frames(v) for v in images.to_pylist()]
        else:
            images = images.to_pylist()
        labels = (
            table.column(cfg.label_column).to_pylist()
            if cfg.label_column in columns
            else [None] * len(images)
        )
        stem = relpath[: -len(".parquet")]
        if cfg.id_column:
            ids = [str(x) for x in table.column(cfg.id_column).to_pylist()]
        else:
            ids = [f"{stem}-{row}" for row in range(start, stop)]
        for j, (image_id, data, label) in enumerate(zip(ids, images, labels, strict=True)):
            error = "missing image bytes (null)" if data is None else None
            _add(rows, image_id, cfg.uri, label, data or b"", f"{loc.uri}#{start + j}", error)
    return rows


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
                samples = webdataset.read_tar_range(stream, whole, shard.config.label_column, first_key=key)
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
