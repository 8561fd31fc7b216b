"""WebDataset tar shards, as img2dataset writes them: ``<key>.jpg|png|webp|...`` with ``<key>.json``,
``<key>.txt`` and ``<key>.cls`` beside it, the files of one sample next to each other in the tar.

A sample's key is its member name up to the first dot of the file name (``a/b/000123.jpg`` ->
``a/b/000123``), as in WebDataset. ``scan_tar`` reads a tar's headers once (listing) and returns one
``TarSample`` per sample with the byte offset of its first header; ``read_tar_range`` reads samples
``[start, stop)`` from that offset (a ranged read on S3, not the whole tar).

Bad input is a row, never an exception: a sample without an image member, an unreadable ``.cls``, or a
tar that ends inside a sample or holds a corrupt header. The unreadable rest of a tar is one sample (offset
-1, its ``reason`` set) named by the sample it broke in (``CORRUPT_TAIL`` when it broke between samples), so
rows in = rows out + errors holds.
Labels come from ``<key>.cls`` (an integer) or, failing that, from the ``label_key`` of ``<key>.json``;
captions, when asked (``caption_key``), from ``<key>.txt`` or, failing that, the ``caption_key`` of
``<key>.json`` (a string). A sample without such a sidecar or key has no label / caption: not an error.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

from pipeline.runtime.storage import Location

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # a sample's image member
READ_BUFFER = 4 << 20  # bytes per read from storage while streaming a tar
CORRUPT_TAIL = "<corrupt>"  # key of a tar's unreadable rest when no sample was being read


@dataclass(frozen=True)
class TarSample:
    key: str
    offset: int  # byte offset of the sample's first member header; -1 for the corrupt tail
    reason: str = ""  # why the sample cannot be read ("" = fine as far as the headers go)


@dataclass(frozen=True)
class SampleRow:
    key: str
    image: bytes  # b"" when there is none
    label: int | None
    member: str  # the image member's name ("" when none)
    error: str | None
    caption: str | None = None  # None when not asked or the sample has none


def sample_key(name: str) -> tuple[str, str]:
    """``dir/000123.seg.png`` -> (``dir/000123``, ``seg.png``)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _headers(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The member headers of a tar opened as a stream, without keeping them: ``tarfile`` would hold
    every ``TarInfo`` it read (``TarFile.members``, several hundred bytes each) until the tar closes."""
    while (info := tar.next()) is not None:
        tar.members = []
        yield info


def _members(stream: IO[bytes]) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in _headers(tar):
            if info.isfile():
                yield info, tar


@dataclass(frozen=True, eq=False)
class TarScan:
    """One tar's samples (``scan_tar``), compact: byte offsets, keys joined, the broken rest."""

    offsets: np.ndarray  # int64 [samples]: each sample's first header (-1: the tar's unreadable rest)
    keys: bytes  # the samples' keys, UTF-8 (names tarfile could not decode: surrogateescape), joined
    key_sizes: np.ndarray  # int64 [samples]: bytes of each key in ``keys``
    reason: str  # why the last sample (the tar's unreadable rest) cannot be read; "" = none

    @staticmethod
    def of(samples: list[TarSample]) -> TarScan:
        keys = [s.key.encode("utf-8", "surrogateescape") for s in samples]
        return TarScan(
            np.array([s.offset for s in samples], dtype=np.int64),
            b"".join(keys),
            np.array([len(k) for k in keys], dtype=np.int64),
            samples[-1].reason if samples else "",
        )


def scan_tar_file(root: Location, relpath: str) -> TarScan:
    """``scan_tar`` of the tar ``relpath`` under ``root``, compact (a listing's unit of work: it runs in
    threads or spawned processes, so it stays a module-level function of this light module)."""
    loc = root.join(relpath)
    size = loc.fs.get_file_info(loc.path).size
    if loc.fs.type_name == "local":  # seekable: the member data is skipped, not read
        with loc.fs.open_input_file(loc.path) as f:
            return TarScan.of(scan_tar(f, size))
    with loc.fs.open_input_stream(loc.path, buffer_size=READ_BUFFER) as f:  # object stores: one stream
        return TarScan.of(scan_tar(f, size))


def scan_tar(stream: IO[bytes], size: int) -> list[TarSample]:
    """Every sample of the tar of ``size`` bytes in ``stream`` (read from its start), in tar order.

    Reads the headers only (``_walk_headers``; member data is skipped: a seek where ``stream`` can, else
    read past): ~15 us a two-member sample on one core against ``tarfile``'s ~43 (``bench/tar_listing.py``;
    a million images are two million members)."""
    samples: list[TarSample] = []
    last = None
    try:
        for name, offset in _walk_headers(stream, size):
            key, _ = sample_key(name)
            if key != last:
                samples.append(TarSample(key, offset))
                last = key
        problem = ""
    except _Broken as e:
        problem = str(e)
    if problem:  # the sample being read when the tar broke cannot be trusted: it becomes the error row
        broken = samples.pop().key if samples else CORRUPT_TAIL
        samples.append(TarSample(broken, -1, f"corrupt tar after {len(samples)} whole samples: {problem}"))
    return samples


class _Broken(Exception):
    """The tar cannot be read on from here (its message is the reason)."""


_BLOCK = tarfile.BLOCKSIZE  # 512
_ZEROS = bytes(_BLOCK)
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)  # what ``TarInfo.isfile`` calls a file
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_GNU_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE)
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_CUT_DATA = "unexpected end of data"  # a member's data runs past the end (tarfile's words)


def _walk_headers(stream: IO[bytes], size: int) -> Iterator[tuple[str, int]]:
    """``(name, offset)`` of every regular file of a ustar / GNU / pax tar, ``offset`` being its first
    header (a pax or GNU long-name header before it included), as ``tarfile`` names and places them.
    Stops at the end-of-archive block; raises ``_Broken`` where the tar is cut short or a header is
    corrupt (``tarfile`` stops quietly at a corrupt header after the first and drops the rest)."""
    seek = getattr(stream, "seekable", lambda: False)()
    pos = 0
    first: int | None = None  # where the extended headers of the next member began
    extra: dict[str, str] = {}  # the pax / GNU long-name fields for the next member

    def skip(n: int) -> None:
        if seek:
            stream.seek(n, 1)
        elif len(stream.read(n)) != n:
            raise _Broken(_CUT_DATA)

    while True:
        block = stream.read(_BLOCK)
        if block == _ZEROS or (pos and len(block) < _BLOCK):  # the end, or a cut between members
            if pos + 2 * _BLOCK > size:  # a whole tar ends with two zero blocks
                raise _Broken(_cut_short(size, pos))
            return
        try:
            name, kind, length = _header(block)
        except _Broken as e:  # tarfile's words where it had them: a listing's reasons stay as they were
            if pos == 0:
                raise  # tarfile failed to open the tar with this reason
            if pos + 2 * _BLOCK > size:
                raise _Broken(_cut_short(size, pos)) from None  # tarfile stopped there, near the end
            raise _Broken(f"invalid header at byte {pos} ({e})") from None
        if kind not in _EXTENDED:
            name = extra.get("path", name)
            length = int(extra.get("size", length))
        end = pos + _BLOCK + -(-length // _BLOCK) * _BLOCK  # the next header's offset
        if kind in _EXTENDED:  # pax (x: the next member, g: global) or GNU long name / link
            if end > size:
                raise _Broken(_CUT_DATA)
            body = stream.read(end - pos - _BLOCK)[:length]
            first = pos if first is None else first  # tarfile gives the member its first header's offset
            if kind == tarfile.XHDTYPE:
                extra.update(_pax_records(body))
            elif kind == tarfile.GNUTYPE_LONGNAME:
                extra["path"] = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape").removesuffix("/")
            pos = end
            continue
        if kind == tarfile.GNUTYPE_SPARSE:  # its data layout needs more headers; never an image writer's
            raise _Broken(f"member {name!r} at byte {pos} is a GNU sparse file, which is not read")
        if kind in _FILE_TYPES and not (kind == tarfile.AREGTYPE and name.endswith("/")):
            yield name, pos if first is None else first  # before a cut: the sample it broke in
        if end > size:
            raise _Broken(_CUT_DATA)
        skip(end - pos - _BLOCK)
        pos, first, extra = end, None, {}


def _cut_short(size: int, pos: int) -> str:
    return f"the tar is cut short ({size} bytes; its members run to byte {pos})"


def _header(block: bytes) -> tuple[str, bytes, int]:
    """One 512-byte header -> (name, type flag, data size); ``_Broken`` when it is not one (tarfile's
    reasons: ``empty file``, ``truncated header``, ``invalid header``, ``bad checksum``)."""
    if len(block) < _BLOCK:
        raise _Broken("truncated header" if block else "empty file")
    stored = _number(block[148:156])
    unsigned = sum(block) - sum(block[148:156]) + 256  # the checksum field counts as 8 spaces
    if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in block[:148] + block[156:]):
        raise _Broken("bad checksum")
    kind = block[156:157]
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix and kind not in _GNU_TYPES:  # a ustar long name
        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
    return name, kind, _number(block[124:136])


def _number(field: bytes) -> int:
    """A header's number field: octal ASCII, or base-256 (GNU) when its first byte says so."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _Broken("invalid header") from None


def _pax_records(body: bytes) -> dict[str, str]:
    """``"<length> <keyword>=<value>\\n"`` records of a pax header (the fields a listing needs)."""
    out, i = {}, 0
    while (m := _PAX_RECORD.match(body, i)) is not None:
        length = int(m.group(1))
        if length == 0:
            raise _Broken("invalid header")
        key = m.group(2).decode("utf-8", "surrogateescape")
        if key in ("path", "size"):
            out[key] = body[m.end(2) + 1 : i + length - 1].decode("utf-8", "surrogateescape")
        i += length
    return out


def read_tar_range(
    stream: IO[bytes],
    count: int,
    label_key: str = "label",
    first_key: str | None = None,
    caption_key: str = "",
) -> list[SampleRow]:
    """``count`` samples from ``stream`` positioned at a sample's first header (``TarSample.offset``).

    ``first_key``, when given, is checked against the first sample read: a tar changed since it was
    listed fails loudly instead of mislabelling rows. ``caption_key`` "" reads no captions."""
    rows: list[SampleRow] = []
    current: dict[str, bytes] = {}
    key = None
    error = None

    def flush() -> None:
        if key is not None:
            rows.append(_row(key, current, label_key, caption_key))

    try:
        for info, tar in _members(stream):
            k, ext = sample_key(info.name)
            if k != key:
                flush()
                if len(rows) == count:
                    break
                if key is None and first_key is not None and k != first_key:
                    raise ValueError(
                        f"the tar changed since it was listed: sample {first_key!r} is now {k!r}"
                    )
                key, current = k, {}
            data = tar.extractfile(info)
            current[ext] = data.read() if data is not None else b""
        else:
            flush()
    except (tarfile.TarError, EOFError, OSError) as e:  # the tar ends inside this range
        error = f"corrupt tar: {e}"
        if key is not None and len(rows) < count:
            rows.append(SampleRow(key, b"", None, "", f"{error} (inside sample {key})"))
    if len(rows) != count:
        why = error or "the tar holds fewer samples than when it was listed"
        raise ValueError(f"read {len(rows)} of {count} samples: {why}")
    return rows


def _row(key: str, files: dict[str, bytes], label_key: str, caption_key: str = "") -> SampleRow:
    image_ext = next((ext for ext in IMAGE_EXTS if ext in files), None)
    label, error = _label(key, files, label_key)
    caption, caption_error = _caption(key, files, caption_key) if caption_key else (None, None)
    error = error or caption_error
    if image_ext is None:
        have = ", ".join(sorted(files)) or "nothing"
        return SampleRow(key, b"", label, "", f"no image member for {key} (has: {have})", caption)
    return SampleRow(key, files[image_ext], label, f"{key}.{image_ext}", error, caption)


def _label(key: str, files: dict[str, bytes], label_key: str) -> tuple[int | None, str | None]:
    if "cls" in files:
        text = files["cls"].decode("utf-8", "replace").strip()
        try:
            return int(text), None
        except ValueError:
            return None, f"{key}.cls is not an integer class: {text[:40]!r}"
    if "json" in files:
        try:
            value = json.loads(files["json"]).get(label_key)
        except (ValueError, AttributeError):
            return None, f"{key}.json is not a JSON object"
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
    return None, None  # no label sidecar: an unlabelled sample, not an error


def _caption(key: str, files: dict[str, bytes], caption_key: str) -> tuple[str | None, str | None]:
    if "txt" in files:
        return files["txt"].decode("utf-8", "replace").strip(), None
    if "json" in files:
        try:
            value = json.loads(files["json"]).get(caption_key)
        except (ValueError, AttributeError):
            return None, f"{key}.json is not a JSON object"
        if isinstance(value, str):
            return value, None
    return None, None  # no caption sidecar or key: a sample without a caption, not an error
