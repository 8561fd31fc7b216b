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
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

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


def scan_tar(stream: IO[bytes], size: int) -> list[TarSample]:
    """Every sample of the tar of ``size`` bytes in ``stream`` (read from its start), in tar order."""
    samples: list[TarSample] = []
    last, problem = None, ""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in _headers(tar):
                key, _ = sample_key(info.name)
                if info.isfile() and key != last:
                    samples.append(TarSample(key, info.offset))
                    last = key
            # tarfile stops quietly at a cut header or member; a whole tar ends with two zero blocks
            if tar.offset + 2 * tarfile.BLOCKSIZE > size:
                problem = f"the tar is cut short ({size} bytes; its members run to byte {tar.offset})"
    except (tarfile.TarError, EOFError, OSError) as e:
        problem = str(e) or type(e).__name__
    if problem:  # the sample being read when the tar broke cannot be trusted: it becomes the error row
        broken = samples.pop().key if samples else CORRUPT_TAIL
        samples.append(TarSample(broken, -1, f"corrupt tar after {len(samples)} whole samples: {problem}"))
    return samples


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
