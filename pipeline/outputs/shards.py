"""Exactly-once output for sharded jobs: one ``part-<shard_id>.parquet`` per input shard.

Layout under an output URI (local or ``s3://``; ``pipeline.outputs.contracts.Layout``, docs/CORPUS.md)::

    part-00000.parquet ...          one file per input shard, visible only complete: the commit point
    .spae/<ext>/part-00000.<ext>    sidecars of that shard (e.g. the corpus's JSONL twin), committed before it
    .spae/errors/part-00000.pq      failed rows of that shard (only when it has any; Parquet)
    .spae/errors.pq                 all failed rows (image_id, path, stage, reason), merged at the end
    .spae/manifest.json             input, counts, shard list, config, job identity
    .spae/README.md                 the dataset card: schema, counts, identity, config, command
    _tmp/                           files being written; committed by a move

So pandas, pyarrow.dataset, DuckDB (``<folder>/**/*.parquet``) and Hugging Face ``datasets`` read the
folder as exactly its data rows. An output of the old layout (``_manifest.json``, ``_errors.parquet``,
``_errors/``, sidecars beside the parts) is read, and resumed, in its own layout.

``ShardWriter`` runs on the driver. It receives output batches (numpy dicts carrying ``shard_id``,
``image_id``, ``path``, ``error``, ``error_stage`` and the output columns) in any order, buffers rows
per shard and commits a shard once it holds exactly the shard's row count (rows written +
errors). The commit protocol: every file of the shard (errors, sidecars, data) is first uploaded
complete under ``_tmp/``; then they are moved into place in that order, the data Parquet last. So a
``part-<id>.parquet`` is the shard's commit marker: its sidecars and errors are complete and in place
whenever it is visible, and a reader of sidecars (JSONL) takes only those whose Parquet twin exists
(``committed_sidecars``), or reads after the manifest is written. A commit that fails half way
deletes the files it moved (best effort), and the next run's ``pending`` deletes whatever such a
failure left (any sidecar ``part-<id>.*`` or errors file of a shard without its Parquet).

The data file's footer records the input digest, the job digest and the counts, so a re-run skips
committed shards, recomputes missing ones, and refuses to mix outputs of a changed input or a
different job configuration. ``pending(retry_errors=True)`` also returns the committed shards that
have error rows; their commit first removes the old Parquet (the shard is then uncommitted, so a crash
leaves it pending), then the old sidecars and errors, then commits the new files as above.

Every storage call goes through ``Location.call`` (transient S3 faults are retried with backoff, also
while committing; the rest raise ``StorageError`` naming the URI).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import sys
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.inputs.sources import Shard, source_info
from pipeline.outputs.contracts import Layout, layout_of, read_manifest_dict, top_entries
from pipeline.outputs.schemas import ERRORS_SCHEMA, concat_columns, error_mask, take_rows, to_table
from pipeline.runtime.storage import Location, as_location

TMP_DIR = "_tmp"
META_PREFIX = b"spae."


class ShardError(RuntimeError):
    """A shard's output is inconsistent (counts, duplicates, stale input); the message names it."""


def part_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


def job_digest(identity: Mapping[str, Any]) -> str:
    """A short hash of what determines the output's content (model, vocab, output config)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CommittedPart:
    shard_id: str
    input_digest: str
    job_digest: str
    rows_in: int
    rows_written: int
    errors: int


def read_part_meta(out: Location, shard_id: str) -> CommittedPart | None:
    """The footer record of a committed part, or None if the part does not exist."""
    path = out.join(part_name(shard_id)).path

    def read() -> Any:
        with out.fs.open_input_file(path) as f:
            return pq.read_metadata(f)

    try:
        meta = out.join(part_name(shard_id)).call("read footer", read)
    except FileNotFoundError:
        return None
    kv = {k.decode(): v.decode() for k, v in (meta.metadata or {}).items() if k.startswith(META_PREFIX)}
    return CommittedPart(
        shard_id=shard_id,
        input_digest=kv.get("spae.input_digest", ""),
        job_digest=kv.get("spae.job_digest", ""),
        rows_in=int(kv.get("spae.rows_in", -1)),
        rows_written=meta.num_rows,
        errors=int(kv.get("spae.errors", -1)),
    )


def pending(
    out: Location | str, shards: list[Shard], identity: Mapping[str, Any], retry_errors: bool = False
) -> list[Shard]:
    """The shards whose part is not committed yet (``retry_errors``: and the committed ones with error
    rows), in shard order; raises ``ShardError`` on a stale or foreign part."""
    todo, found = _scan(out, shards, identity, retry_errors)
    if not retry_errors:
        return todo
    redo = {s.shard_id for s in todo} | {sid for sid, p in found.items() if p.errors > 0}
    return [s for s in shards if s.shard_id in redo]


def committed_sidecars(output: Location | str, suffix: str) -> list[Location]:
    """Sidecar files ``part-<id><suffix>`` whose shard is committed (its Parquet exists), sorted:
    what a reader of sidecars (e.g. the JSONL twins of a corpus) should read while a job may run."""
    out = as_location(output)
    folder = layout_of(out).sidecar_dir(suffix)
    names = _names(out)
    sidecars = _names(out.join(folder)) if folder else names
    return [
        out.join(folder, n) if folder else out.join(n)
        for n in sorted(sidecars)
        if n.startswith("part-") and n.endswith(suffix) and n[: -len(suffix)] + ".parquet" in names
    ]


def _scan(
    out: Location | str, shards: list[Shard], identity: Mapping[str, Any], retry_errors: bool = False
) -> tuple[list[Shard], dict[str, CommittedPart]]:
    """``pending``'s shards and the committed parts it read (by shard id): each footer is read once.
    ``retry_errors``: a part with error rows whose input changed (images fixed) is pending, not stale."""
    out = as_location(out)
    existing = _names(out)
    digest = job_digest(identity)
    todo, found = [], {}
    for shard in shards:
        if part_name(shard.shard_id) not in existing:
            todo.append(shard)
            continue
        part = read_part_meta(out, shard.shard_id)
        if part is None:
            todo.append(shard)
            continue
        found[shard.shard_id] = part
        if part.input_digest != shard.digest and retry_errors and part.errors > 0:
            todo.append(shard)
        elif part.input_digest != shard.digest:
            raise ShardError(
                f"{out.uri}/{part_name(shard.shard_id)}: written from different input items "
                f"(digest {part.input_digest} != {shard.digest}); the input changed since. "
                "Write to a new output or delete the old one."
            )
        elif part.job_digest != digest:
            raise ShardError(
                f"{out.uri}/{part_name(shard.shard_id)}: written by a job with a different configuration "
                f"(job digest {part.job_digest} != {digest}). Write to a new output or delete the old one."
            )
    return todo, found


class ShardWriter:
    """Driver-side committer; see the module docstring.

    ``schema``: the output columns (taken from the ok rows of each batch). ``identity``: what
    determines the content (e.g. scorer, vocab card, top_k); it goes into every part and the manifest.
    ``config``: the job config for the manifest. ``sidecars(shard_id, table) -> {name: bytes}``:
    extra per-shard files (e.g. a JSONL twin), committed before the shard's data file.
    ``on_commit(shard_id)``: called right after each commit (progress; tests that kill a run).
    """

    def __init__(
        self,
        output: Location | str,
        shards: list[Shard],
        schema: pa.Schema,
        *,
        identity: Mapping[str, Any],
        config: Mapping[str, Any] | None = None,
        sidecars: Callable[[str, pa.Table], Mapping[str, bytes]] | None = None,
        on_commit: Callable[[str], None] | None = None,
        threads: int = 0,
    ) -> None:
        self.out = as_location(output)
        self.shards = {s.shard_id: s for s in shards}
        assert len(self.shards) == len(shards), "duplicate shard ids"
        self.schema = schema
        self.identity = dict(identity)
        self.digest = job_digest(self.identity)
        self.config = dict(config or {})
        self.sidecars = sidecars
        self.on_commit = on_commit
        self.committed: list[str] = []  # committed by this writer, in order
        self._buffers: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)
        self._counts: dict[str, int] = defaultdict(int)
        self._replacing: set[str] = set()  # committed shards recomputed now (pending(retry_errors=True))
        self._layout: Layout | None = None
        # threads > 0: shards' Parquet bytes are encoded on that many threads (Arrow's writer releases
        # the GIL) while the driver goes on; commits still happen on this thread, in order (``_drain``)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-encode") if threads else None
        self._inflight: deque[tuple[str, Future[list[tuple[str, bytes]]]]] = deque()
        self._depth = 2 * threads  # encoded shards waiting to commit, at most

    @property
    def layout(self) -> Layout:
        """The output's layout, decided once (``pipeline.outputs.contracts.layout_of``): an old output is
        resumed
        in the old layout, anything else is written in the new one."""
        if self._layout is None:
            self._layout = layout_of(self.out)
        return self._layout

    def pending(self, retry_errors: bool = False) -> list[Shard]:
        """``pending`` for this output; deletes what failed commits of the pending shards left
        (orphan sidecars and errors files of shards without a Parquet part)."""
        todo = pending(self.out, list(self.shards.values()), self.identity, retry_errors)
        names = _names(self.out)
        self._replacing = {s.shard_id for s in todo if part_name(s.shard_id) in names}
        self._clean_orphans({s.shard_id for s in todo} - self._replacing)
        return todo

    def _clean_orphans(self, shard_ids: set[str]) -> list[str]:
        """Delete the sidecars ``part-<id>.*`` and the errors file of shards without a Parquet part."""
        if not shard_ids:
            return []
        layout = self.layout
        names = _names(self.out)
        errors = _names(self.out.join(layout.errors_dir))
        folders = [""]  # where sidecars live: beside the parts (old), under .spae/<ext>/ (new)
        if layout.meta_dir:
            meta = self.out.join(layout.meta_dir)
            folders = [
                f"{layout.meta_dir}/{n}"
                for n, is_dir in sorted(top_entries(meta).items())
                if is_dir and f"{layout.meta_dir}/{n}" != layout.errors_dir
            ]
        listed = {folder: (names if not folder else _names(self.out.join(folder))) for folder in folders}
        orphans = []
        for shard_id in sorted(shard_ids):
            if part_name(shard_id) in names:
                continue
            stem = f"part-{shard_id}."
            for folder, found in listed.items():
                orphans += sorted(f"{folder}/{n}" if folder else n for n in found if n.startswith(stem))
            if f"part-{shard_id}{layout.errors_ext}" in errors:
                orphans.append(layout.errors_part(shard_id))
        for name in orphans:
            self._delete(name)
        return orphans

    def _delete(self, name: str) -> None:
        loc = self.out.join(name)

        def delete() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.out.fs.delete_file(loc.path)

        loc.call("delete", delete)

    def add(self, batch: Mapping[str, np.ndarray]) -> list[str]:
        """Buffer a batch; commit every shard it completes. Returns the shard ids committed now."""
        shard_ids = np.asarray(batch["shard_id"]).astype(str)
        done = []
        for shard_id in np.unique(shard_ids).tolist():
            if shard_id not in self.shards:
                raise ShardError(f"batch row for unknown shard {shard_id!r}")
            rows = np.flatnonzero(shard_ids == shard_id)
            self._buffers[shard_id].append({k: take_rows(v, rows) for k, v in batch.items()})
            self._counts[shard_id] += len(rows)
            expected = self.shards[shard_id].num_rows
            if self._counts[shard_id] > expected:
                raise ShardError(
                    f"shard {shard_id}: received {self._counts[shard_id]} rows, expected {expected}"
                )
            if self._counts[shard_id] == expected:
                self._commit(shard_id)
                done.append(shard_id)
        return done

    def incomplete(self) -> dict[str, tuple[int, int]]:
        """Shards with buffered rows but not all of them: ``{shard_id: (received, expected)}``."""
        return {s: (n, self.shards[s].num_rows) for s, n in self._counts.items() if s not in self.committed}

    def _commit(self, shard_id: str) -> None:
        parts = self._buffers.pop(shard_id)
        batch = {k: concat_columns([p[k] for p in parts]) for k in parts[0]}
        errors = error_mask(batch["error"])
        ids = np.asarray(batch["image_id"]).astype(str)
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ShardError(f"shard {shard_id}: duplicate image_id(s) {', '.join(uniq[counts > 1][:5])}")
        order = np.argsort(ids, kind="stable")
        ok = order[~errors[order]]
        bad = order[errors[order]]
        data = to_table(
            {k: take_rows(v, ok) for k, v in batch.items() if k in self.schema.names}, self.schema
        )
        shard = self.shards[shard_id]
        assert data.num_rows + len(bad) == shard.num_rows
        err = None
        if len(bad):
            stage = batch.get("error_stage")
            err = pa.table(
                {
                    "image_id": ids[bad].tolist(),
                    "path": [str(p) for p in np.asarray(batch["path"])[bad]],
                    "stage": [
                        stage[i] if stage is not None and isinstance(stage[i], str) else "unknown"
                        for i in bad
                    ],
                    "reason": [str(batch["error"][i]) for i in bad],
                },
                schema=ERRORS_SCHEMA,
            )
        meta = {
            "spae.input_digest": shard.digest,
            "spae.job_digest": self.digest,
            "spae.rows_in": str(shard.num_rows),
            "spae.errors": str(len(bad)),
        }
        layout = self.layout
        sidecars = self.sidecars(shard_id, data) if self.sidecars else {}  # here: its faults keep their order
        data = data.replace_schema_metadata({**(data.schema.metadata or {}), **meta})
        tables = [(layout.errors_part(shard_id), err)] if err is not None else []
        blobs = [(layout.sidecar(name), blob) for name, blob in sidecars.items()]

        def encode() -> list[tuple[str, bytes]]:  # errors, sidecars, then the data: the commit point, last
            files = [(name, _parquet_bytes(table)) for name, table in tables]
            return [*files, *blobs, (part_name(shard_id), _parquet_bytes(data))]

        if self._pool is None:
            self._apply(shard_id, encode())
            return
        self._inflight.append((shard_id, self._pool.submit(encode)))
        self._drain(block=False)

    def _drain(self, block: bool) -> None:
        """Commit the encoded shards at the head of the queue, in order: all of them (``block``), else
        those done and any beyond the queue's depth. An encoding that failed raises here."""
        while self._inflight:
            shard_id, future = self._inflight[0]
            if not (block or future.done() or len(self._inflight) > self._depth):
                return
            self._inflight.popleft()
            self._apply(shard_id, future.result())

    def flush(self) -> None:
        """Commit every shard already computed (those still being encoded on the writer's threads)."""
        try:
            self._drain(block=True)
        finally:
            self._inflight.clear()

    def _apply(self, shard_id: str, files: list[tuple[str, bytes]]) -> None:
        self._commit_files(shard_id, files)
        self.committed.append(shard_id)
        self._counts.pop(shard_id, None)
        if self.on_commit is not None:
            self.on_commit(shard_id)

    def _commit_files(self, shard_id: str, files: list[tuple[str, bytes]]) -> None:
        """Upload every file under ``_tmp/``, then move them into place in order (the Parquet part
        last); see the module docstring. A failure before the Parquet is in place deletes the files
        already moved (best effort: the next ``pending`` deletes what is left)."""
        staged = [(self._upload(name, blob), name) for name, blob in files]
        if shard_id in self._replacing:  # uncommit the old version first: a crash now leaves it pending
            self._delete(part_name(shard_id))
            self._clean_orphans({shard_id})
        moved: list[str] = []
        try:
            for tmp, name in staged:
                self._move(tmp, name)
                moved.append(name)
        except BaseException:
            if part_name(shard_id) not in moved:
                for name in moved:
                    with contextlib.suppress(Exception):  # else the next run's pending() cleans it
                        self._delete(name)
            raise

    def _put(self, name: str, table: pa.Table) -> None:
        self._put_bytes(name, _parquet_bytes(table))

    def _put_bytes(self, name: str, blob: bytes) -> None:
        """Write ``blob`` under ``_tmp/`` and move it to ``name`` (atomic on local disks and S3)."""
        self._move(self._upload(name, blob), name)

    def _upload(self, name: str, blob: bytes) -> Location:
        """``blob`` complete under ``_tmp/`` (retried on transient faults); returns its location."""
        tmp = self.out.join(TMP_DIR, f"{name.replace('/', '__')}.{uuid.uuid4().hex[:12]}")

        def upload() -> None:
            if not self.out.is_s3:
                self.out.fs.create_dir(tmp.path.rsplit("/", 1)[0], recursive=True)
            with self.out.fs.open_output_stream(tmp.path) as f:
                f.write(blob)

        tmp.call("upload", upload)
        return tmp

    def _move(self, tmp: Location, name: str) -> None:
        """Move a staged file to ``name``; a retry after a move that did land (its answer lost) is done."""
        final = self.out.join(name)
        tries = 0

        def move() -> None:
            nonlocal tries
            tries += 1
            if not self.out.is_s3:
                self.out.fs.create_dir(final.path.rsplit("/", 1)[0], recursive=True)
            try:
                self.out.fs.move(tmp.path, final.path)
            except FileNotFoundError:
                if tries > 1 and self.out.fs.get_file_info(final.path).type == pafs.FileType.File:
                    return
                raise

        final.call("commit", move)

    def finish(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Check every shard is committed and counts add up; merge errors; write the manifest.

        Writes nothing when nothing changed since the last finish (same manifest content).
        Returns the manifest.
        """
        self.flush()
        incomplete = self.incomplete()
        if incomplete:
            missing = ", ".join(f"shard {s} has {n} of {e} rows" for s, (n, e) in incomplete.items())
            raise ShardError(f"{self.out.uri}: incomplete shards: {missing}")
        todo, found = _scan(self.out, list(self.shards.values()), self.identity)
        if todo:
            raise ShardError(f"{self.out.uri}: shards not committed: {', '.join(s.shard_id for s in todo)}")
        parts = []
        for shard in self.shards.values():
            part = found[shard.shard_id]
            if part.rows_in != shard.num_rows or part.rows_written + part.errors != shard.num_rows:
                raise ShardError(
                    f"{self.out.uri}/{part_name(shard.shard_id)}: rows in {shard.num_rows} != "
                    f"rows written {part.rows_written} + errors {part.errors}"
                )
            parts.append(part)
        shards = list(self.shards.values())
        manifest = {
            "input": source_info(shards),
            "output": self.out.uri,
            "rows_in": sum(s.num_rows for s in shards),
            "rows_written": sum(p.rows_written for p in parts),
            "errors": sum(p.errors for p in parts),
            "shards": [
                {
                    "shard_id": p.shard_id,
                    "file": part_name(p.shard_id),
                    "input_digest": p.input_digest,
                    "rows_in": p.rows_in,
                    "rows_written": p.rows_written,
                    "errors": p.errors,
                }
                for p in parts
            ],
            "job_digest": self.digest,
            "identity": self.identity,
            "config": self.config,
            **(extra or {}),
        }
        manifest = json.loads(json.dumps(manifest, default=str))
        layout = self.layout
        manifest_loc = self.out.join(layout.manifest)
        card_loc = self.out.join(layout.card) if layout.card else None
        if (
            not self.committed
            and manifest_loc.exists()
            and json.loads(manifest_loc.read_text()) == manifest
            and (card_loc is None or card_loc.exists())
        ):
            return manifest  # a re-run of a finished job: nothing to write
        self._check_unique(parts)
        errors = [_read_table(self.out, layout.errors_part(p.shard_id)) for p in parts if p.errors]
        merged = pa.concat_tables(errors) if errors else ERRORS_SCHEMA.empty_table()
        self._put(layout.errors, merged.cast(ERRORS_SCHEMA))
        manifest_loc.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if card_loc is not None:
            card_loc.write_text(dataset_card(manifest, self.schema, layout, command()))
        self._clean_tmp()
        return manifest

    def _check_unique(self, parts: list[CommittedPart]) -> None:
        """image_id unique across the whole output (data parts and errors)."""
        seen: dict[str, str] = {}
        for p in parts:
            ids = _read_table(self.out, part_name(p.shard_id), columns=["image_id"])
            names = ids.column("image_id").to_pylist()
            if p.errors:
                err = _read_table(self.out, self.layout.errors_part(p.shard_id), columns=["image_id"])
                names += err.column("image_id").to_pylist()
            for name in names:
                if name in seen:
                    raise ShardError(
                        f"image_id {name!r} appears in shard {seen[name]} and shard {p.shard_id}"
                    )
                seen[name] = p.shard_id

    def _clean_tmp(self) -> None:
        tmp = self.out.join(TMP_DIR)
        try:
            if tmp.exists():
                tmp.delete()
        except OSError:
            pass  # leftovers of temporary files never count as output


def read_manifest(output: Location | str) -> dict[str, Any]:
    """The manifest of an output (either layout), as written (the typed views are in
    pipeline.outputs.contracts)."""
    return read_manifest_dict(output)


def read_output(output: Location | str, columns: list[str] | None = None) -> pa.Table:
    """All committed parts of an output, in shard order (for tests and small outputs)."""
    out = as_location(output)
    names = sorted(n for n in _names(out) if n.startswith("part-") and n.endswith(".parquet"))
    tables = [_read_table(out, n, columns) for n in names]
    return pa.concat_tables(tables) if tables else pa.table({})


def read_errors(output: Location | str) -> pa.Table:
    """All failed rows of a finished output (either layout)."""
    out = as_location(output)
    return _read_table(out, layout_of(out).errors)


def command() -> str:
    """The command line of this process, as the dataset card records it."""
    return shlex.join(sys.argv)


def dataset_card(manifest: Mapping[str, Any], schema: pa.Schema, layout: Layout, cmd: str) -> str:
    """The README.md of an output: what it holds, its schema, counts, identity, config and command."""
    kinds = {"text": "corpus", "topk_ids": "pools", "text_feature": "vocab"}  # a column only it has
    kind = next((k for column, k in kinds.items() if column in schema.names), "output")
    tokenizer = manifest.get("tokenizer") or {}
    lines = [
        f"# spae {kind}: {manifest['output']}",
        "",
        f"Written by `spae` from `{manifest['input'].get('uri', '')}`. The data rows are the Parquet files",
        "`part-<shard>.parquet` at the top of this folder; read the folder with pandas, pyarrow, DuckDB",
        "(`read_parquet('<folder>/**/*.parquet')`) or `datasets.load_dataset('parquet', data_dir=<folder>)`.",
        f"This card, the manifest (`{layout.manifest}`) and the failed rows (`{layout.errors}`, Parquet)",
        f"live under `{layout.meta_dir}/`, which those readers skip (docs/CORPUS.md).",
        "",
        "## Counts",
        "",
        "| rows in | rows out | errors | shards |",
        "|---|---|---|---|",
        f"| {manifest['rows_in']} | {manifest['rows_written']} | {manifest['errors']} "
        f"| {len(manifest['shards'])} |",
        "",
        "## Schema",
        "",
        "| column | type |",
        "|---|---|",
        *[f"| `{f.name}` | `{f.type}` |" for f in schema],
        "",
        "## Identity",
        "",
        f"- job digest: `{manifest['job_digest']}`",
    ]
    if tokenizer:
        lines += [
            f"- tokenizer: `{tokenizer.get('uri', '')}`, fingerprint `{tokenizer.get('fingerprint', '')}`",
            f"- codebook: `{(tokenizer.get('codebook_card') or {}).get('hash', '')}`",
            f"- layers: {manifest.get('layers')}",
        ]
    lines += [
        "",
        "```json",
        json.dumps(manifest["identity"], indent=2, sort_keys=True),
        "```",
        "",
        "## Made by",
        "",
        "```",
        cmd,
        "```",
        "",
        "with this config:",
        "",
        "```json",
        json.dumps(manifest["config"], indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()  # an Arrow buffer: the writer runs without the GIL (a BytesIO takes it)
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _read_table(out: Location, name: str, columns: list[str] | None = None) -> pa.Table:
    loc = out.join(name)
    return loc.call("read", lambda: pq.read_table(loc.path, columns=columns, filesystem=out.fs))


def _names(out: Location) -> set[str]:
    return {name for name, is_dir in top_entries(out).items() if not is_dir}
