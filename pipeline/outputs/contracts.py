"""Typed contracts between stages: what one stage's output folder promises the stages that read it.

- ``Layout``: where an output folder keeps its data rows and everything else (docs/CORPUS.md, "Layout").
  The data rows are ``part-<shard_id>.parquet`` at the top; the manifest, the errors, the sidecars and
  the dataset card live under the dot-folder ``.spae/``, which pandas, pyarrow.dataset and Hugging Face
  ``datasets`` skip; the errors are Parquet files named ``*.pq`` so that DuckDB's
  ``read_parquet('<folder>/**/*.parquet')`` (which does look into dot-folders) skips them too. Outputs
  written before (``_manifest.json``, ``_errors.parquet``, ``_errors/``, JSONL twins beside the parts,
  ``vocab_card.json``) are still read, and resumed in their own layout (``layout_of``).
- ``VocabCard`` (the vocab job's card), ``PoolsManifest`` and ``CorpusManifest`` (the manifests of the
  pools and tokenize jobs): frozen dataclasses, each with ONE reader (``read(uri)``) and one set of
  checks; a missing or ill-typed field is a ``ContractError`` naming the file and the field.
- ``load_tokenizer``: the one loader of a tokenizer for every URI kind (a local folder, ``file://``,
  ``s3://`` through ``pipeline.runtime.storage``, MLflow ``runs:/`` and ``models:/``).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.inputs.sources import Shard, SourceConfig
from pipeline.runtime.storage import Location, as_location, resolve
from spae.config import from_dict
from spae.devices import resolve_device
from spae.tokenizer import SPAETokenizer

META_DIR = ".spae"  # everything of an output folder that is not a data row (new layout)
ERRORS_EXT = ".pq"  # Parquet, but not ``*.parquet``: DuckDB's ``**/*.parquet`` glob enters dot-folders
CARD_NAME = "README.md"  # the dataset card (new layout)
PART_PREFIX = "part-"
PARQUET_SUFFIX = ".parquet"


class ContractError(ValueError):
    """An output's metadata file lacks a field or holds a wrong one; the message names the file and field."""


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Paths, relative to an output folder, of what is not a data row (see the module docstring)."""

    name: str  # "new" | "old"
    manifest: str
    errors: str  # all failed rows, merged at the end
    errors_dir: str  # failed rows per shard
    errors_ext: str
    vocab_card: str
    card: str  # the dataset card ("" = none: the old layout has none)
    meta_dir: str  # "" in the old layout: sidecars beside the parts

    def errors_part(self, shard_id: str) -> str:
        return f"{self.errors_dir}/{PART_PREFIX}{shard_id}{self.errors_ext}"

    def sidecar(self, name: str) -> str:
        """Where a shard's sidecar ``part-<id>.<ext>`` lives: ``.spae/<ext>/part-<id>.<ext>`` (new),
        beside the parts (old)."""
        if not self.meta_dir:
            return name
        return f"{self.sidecar_dir(name)}/{name}"

    def sidecar_dir(self, name_or_suffix: str) -> str:
        """The folder of the sidecars ending with ``name_or_suffix``'s extension ("" = the top)."""
        if not self.meta_dir:
            return ""
        return f"{self.meta_dir}/{name_or_suffix.rsplit('.', 1)[-1]}"


NEW_LAYOUT = Layout(
    name="new",
    manifest=f"{META_DIR}/manifest.json",
    errors=f"{META_DIR}/errors{ERRORS_EXT}",
    errors_dir=f"{META_DIR}/errors",
    errors_ext=ERRORS_EXT,
    vocab_card=f"{META_DIR}/vocab_card.json",
    card=f"{META_DIR}/{CARD_NAME}",
    meta_dir=META_DIR,
)
OLD_LAYOUT = Layout(
    name="old",
    manifest="_manifest.json",
    errors="_errors.parquet",
    errors_dir="_errors",
    errors_ext=PARQUET_SUFFIX,
    vocab_card="vocab_card.json",
    card="",
    meta_dir="",
)


def top_entries(out: Location) -> dict[str, bool]:
    """Names directly under ``out`` -> is a folder (an S3 prefix counts as a folder)."""
    selector = pafs.FileSelector(out.path.rstrip("/"), recursive=False, allow_not_found=True)
    infos = out.call("list", lambda: out.fs.get_file_info(selector))
    return {i.base_name: i.type == pafs.FileType.Directory for i in infos}


def layout_of(output: Location | str) -> Layout:
    """The layout of an output folder: old when it holds a file only the old layout writes (and no
    ``.spae/``), new otherwise (a new or empty folder too). A job resuming an old output keeps writing
    the old layout, so one folder never mixes the two."""
    out = as_location(output)
    entries = top_entries(out)
    if META_DIR in entries:
        return NEW_LAYOUT
    old_marks = (OLD_LAYOUT.manifest, OLD_LAYOUT.errors, OLD_LAYOUT.errors_dir, OLD_LAYOUT.vocab_card)
    if any(n in entries for n in old_marks):
        return OLD_LAYOUT
    if any(n.startswith(PART_PREFIX) and not n.endswith(PARQUET_SUFFIX) for n in entries):
        return OLD_LAYOUT  # a JSONL twin beside its part
    return NEW_LAYOUT


def meta_file(output: Location | str, which: str) -> Location:
    """Where an output keeps ``which`` (``manifest``, ``errors``, ``vocab_card``, ``card``) in its layout."""
    out = as_location(output)
    return out.join(getattr(layout_of(out), which))


def read_json(loc: Location, what: str, hint: str) -> dict[str, Any]:
    """A JSON object from ``loc``; ``FileNotFoundError`` with ``hint`` if absent, ``ContractError`` if
    it is not a JSON object."""
    if not loc.exists():
        raise FileNotFoundError(f"{loc.uri}: no {what}; {hint}")
    try:
        data = json.loads(loc.read_text())
    except json.JSONDecodeError as e:
        raise ContractError(f"{loc.uri}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise ContractError(f"{loc.uri}: expected a JSON object, found {type(data).__name__}")
    return data


def read_manifest_dict(output: Location | str, hint: str = "is this an output folder of a spae job?") -> dict:
    """The raw manifest of an output folder (either layout)."""
    out = as_location(output)
    return read_json(out.join(layout_of(out).manifest), "manifest", hint)


# ----------------------------------------------------------------------------- field checks


_MISSING = object()


def _get(
    data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = _MISSING
):
    """``data[key]`` checked to be a ``kind``; ``key`` may be dotted (``tokenizer.uri``)."""
    value: Any = data
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            if default is not _MISSING:
                return default
            raise ContractError(f"{where}: field {key!r} is missing")
        value = value[part]
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int,)))
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ContractError(f"{where}: field {key!r} must be {names}, found {value!r}")
    return value


# ----------------------------------------------------------------------------- vocab card


@dataclass(frozen=True)
class VocabCard:
    """``vocab_card.json`` of a vocab table (``pipeline.steps.vocab``): the codebook card, the scorer, the
    rows.

    ``rows`` and ``job_digest`` are required (every reader checks them); the codebook's ``hash`` and
    ``dim`` are checked where they are used (``codebook_hash``, ``codebook_dim``): a table built by hand
    for the pools stage only needs its rows and scorer."""

    uri: str  # the card file
    codebook: dict[str, Any]  # FrozenCodebook.card: hash, dim, size, source, ...
    rows: int
    dim: int | None  # text feature dimension d
    job_digest: str
    scorer: dict[str, Any]  # {} = not recorded
    templates: tuple[str, ...]
    shards: tuple[str, ...]
    raw: dict[str, Any]  # the file as written (MLflow logs it as it is)

    @property
    def codebook_hash(self) -> str:
        return _get(self.codebook, "hash", str, f"{self.uri} (codebook)")

    @property
    def codebook_dim(self) -> int:
        return _get(self.codebook, "dim", int, f"{self.uri} (codebook)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> VocabCard:
        return cls(
            uri=where,
            codebook=dict(_get(data, "codebook", dict, where, {})),
            rows=_get(data, "rows", int, where),
            dim=_get(data, "dim", int, where, None),
            job_digest=_get(data, "job_digest", str, where),
            scorer=dict(_get(data, "scorer", dict, where, {})),
            templates=tuple(_get(data, "templates", list, where, [])),
            shards=tuple(_get(data, "shards", list, where, [])),
            raw=dict(data),
        )

    @classmethod
    def read(cls, vocab: Location | str) -> VocabCard:
        out = as_location(vocab)
        loc = out.join(layout_of(out).vocab_card)
        data = read_json(loc, "vocab_card.json", "run the vocab job (spae vocab) first")
        return cls.from_dict(data, loc.uri)


# ----------------------------------------------------------------------------- pools manifest


@dataclass(frozen=True)
class PoolsShard:
    shard_id: str
    input_digest: str


@dataclass(frozen=True)
class PoolsManifest:
    """The manifest of a pools table (``pipeline.steps.pools``): its shards and the vocab rows its ids refer
    to."""

    uri: str  # the manifest file
    output: str
    shards: tuple[PoolsShard, ...]
    vocab_job_digest: str
    vocab_rows: int
    top_k: int | None
    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str, output: str = "") -> PoolsManifest:
        shards = []
        for i, entry in enumerate(_get(data, "shards", list, where)):
            at = f"{where} (shards[{i}])"
            if not isinstance(entry, Mapping):
                raise ContractError(f"{at}: expected an object, found {entry!r}")
            shards.append(PoolsShard(_get(entry, "shard_id", str, at), _get(entry, "input_digest", str, at)))
        return cls(
            uri=where,
            output=_get(data, "output", str, where, output),
            shards=tuple(shards),
            vocab_job_digest=_get(data, "identity.vocab_job_digest", str, where),
            vocab_rows=_get(data, "identity.vocab_rows", int, where),
            top_k=_get(data, "identity.top_k", int, where, None),
            raw=dict(data),
        )

    @classmethod
    def read(cls, pools: Location | str) -> PoolsManifest:
        out = as_location(pools)
        loc = out.join(layout_of(out).manifest)
        data = read_json(loc, "manifest", "run the pools job (spae pools) on this source first")
        return cls.from_dict(data, loc.uri, out.uri)

    def check_covers(self, shards: Sequence[Shard]) -> None:
        """Refuse a pools table computed from another listing of the source."""
        by_id = {s.shard_id: s for s in self.shards}
        for shard in shards:
            entry = by_id.get(shard.shard_id)
            if entry is None:
                raise ValueError(
                    f"pools {self.output}: no part for input shard {shard.shard_id} of "
                    f"{shard.config.uri}; compute pools for this source with the same shard_size and limit"
                )
            if entry.input_digest != shard.digest:
                raise ValueError(
                    f"pools {self.output}: shard {shard.shard_id} was computed from other images "
                    f"(digest {entry.input_digest} != {shard.digest}); the source, its shard_size or "
                    "limit differ from the pools job's"
                )

    def check_vocab(self, card: VocabCard, pools_uri: str) -> None:
        """The pools' token ids must be rows of this vocab table (same job digest and row count)."""
        if card.job_digest != self.vocab_job_digest or self.vocab_rows != card.rows:
            raise ValueError(
                f"pools {pools_uri} were computed against vocab digest {self.vocab_job_digest} "
                f"({self.vocab_rows} rows) but the vocab table has digest {card.job_digest} "
                f"({card.rows} rows); their token ids would not be the same codebook rows"
            )


def check_pools_cover(shards: Sequence[Shard], pools: str | Location) -> PoolsManifest:
    """Read the pools manifest and refuse it if it was computed from another listing of the source."""
    manifest = PoolsManifest.read(pools)
    manifest.check_covers(shards)
    return manifest


# ----------------------------------------------------------------------------- corpus manifest


DEFAULT_FIT = "auto"  # what tokenize wrote before its manifests recorded ``fit`` / ``max_pixels``
DEFAULT_MAX_PIXELS = 50_000_000


@dataclass(frozen=True)
class CorpusManifest:
    """The manifest of a corpus (``pipeline.steps.tokenize``): its tokenizer, layers, counts and source."""

    uri: str  # the manifest file
    output: str
    input_uri: str
    rows_written: int
    errors: int
    tokenizer_uri: str
    tokenizer_fingerprint: str
    codebook_card: dict[str, Any]
    layers: tuple[int, ...]
    source: SourceConfig | None  # None: not recorded (the originals cannot be read again)
    fit: str
    max_pixels: int
    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> CorpusManifest:
        layers = _get(data, "layers", list, where)
        if not layers or not all(isinstance(l, int) and not isinstance(l, bool) and l >= 1 for l in layers):
            raise ContractError(f"{where}: field 'layers' must be a list of layers >= 1, found {layers!r}")
        config = _get(data, "config", dict, where, {})
        source_dict = _get(config, "source", dict, f"{where} (config)", None)
        try:
            source = from_dict(SourceConfig, source_dict) if source_dict is not None else None
        except (TypeError, ValueError) as e:
            raise ContractError(f"{where}: field 'config.source' is not a source config: {e}") from e
        return cls(
            uri=where,
            output=_get(data, "output", str, where),
            input_uri=_get(data, "input.uri", str, where, ""),
            rows_written=_get(data, "rows_written", int, where),
            errors=_get(data, "errors", int, where),
            tokenizer_uri=_get(data, "tokenizer.uri", str, where),
            tokenizer_fingerprint=_get(data, "tokenizer.fingerprint", str, where),
            codebook_card=dict(_get(data, "tokenizer.codebook_card", dict, where, {})),
            layers=tuple(layers),
            source=source,
            fit=_get(config, "fit", str, f"{where} (config)", DEFAULT_FIT),
            max_pixels=_get(config, "max_pixels", int, f"{where} (config)", DEFAULT_MAX_PIXELS),
            raw=dict(data),
        )

    @classmethod
    def read(cls, corpus: Location | str) -> CorpusManifest:
        out = as_location(corpus)
        loc = out.join(layout_of(out).manifest)
        return cls.from_dict(read_json(loc, "manifest", "is this a corpus folder?"), loc.uri)

    def check_tokenizer(self, tokenizer: Any, tokenizer_uri: str, corpus_uri: str) -> None:
        """Refuse a tokenizer other than the one that wrote the corpus (its ids would decode to noise)."""
        theirs, ours = tokenizer.fingerprint(), self.tokenizer_fingerprint
        if theirs != ours:
            raise ValueError(
                f"tokenizer {tokenizer_uri} (fingerprint {theirs[:12]}) is not the one that wrote "
                f"{corpus_uri} ({ours[:12]}); its token ids would decode to noise"
            )


# ----------------------------------------------------------------------------- the tokenizer


_DOWNLOADS: dict[str, Path] = {}  # s3:// URI -> its local copy (once per process)
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/")
_DRIVE = re.compile(r"^[a-zA-Z]:[\\/]")


def tokenizer_folder(uri: str) -> Path:
    """A local folder holding the tokenizer at ``uri``: a local path or ``file://`` as it is; ``s3://``
    copied with ``pipeline.runtime.storage`` (once per process); ``runs:/`` / ``models:/`` (any other MLflow
    artifact URI) downloaded with mlflow."""
    if not uri:
        raise ValueError(
            "tokenizer: empty; give a save_pretrained folder (local or s3://) or runs:/, models:/"
        )
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if not _URI.match(uri) or _DRIVE.match(uri):
        return Path(uri)
    if not uri.startswith("s3://"):
        return _download_mlflow(uri)
    if uri not in _DOWNLOADS:
        _DOWNLOADS[uri] = _copy_s3(uri)
    return _DOWNLOADS[uri]


def load_tokenizer(uri: str, device: str = "cpu") -> SPAETokenizer:
    """``SPAETokenizer`` (in eval mode) from any tokenizer URI (``tokenizer_folder``) on ``device``
    (``auto``: cuda when available)."""
    folder = tokenizer_folder(uri)
    return SPAETokenizer.from_pretrained(folder, map_location=resolve_device(device, "device")).eval()


def _copy_s3(uri: str) -> Path:
    src = resolve(uri)
    files = [loc for loc in src.list(recursive=True) if not loc.is_dir()]
    if not files:
        raise FileNotFoundError(f"tokenizer {uri}: no files under this prefix")
    dest = Path(tempfile.mkdtemp(prefix="spae-tokenizer-"))
    base = src.path.rstrip("/") + "/"
    for loc in files:
        target = dest / loc.path[len(base) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(loc.read_bytes())
    return dest


def _download_mlflow(uri: str) -> Path:
    import mlflow  # a dependency of pipeline/, but slow to import: only when an MLflow URI is loaded

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
