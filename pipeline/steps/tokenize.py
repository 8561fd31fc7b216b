"""The tokenize job: a dataset of images -> a lexical corpus (see docs/CORPUS.md), exactly once.

    input shards -> read + decode (tasks) -> TokenizeStage, ids only (actor pool, CPU or GPU)
        -> on the driver: WordsStage (words and text), then ShardWriter: per shard, errors, then
           .spae/jsonl/part-<id>.jsonl, then part-<id>.parquet
           (all uploaded to _tmp/ first; the Parquet part is the commit marker: pipeline.outputs.shards)

Read and decode failures of an image are error rows (``.spae/errors.pq``); an exception of
``encode`` is not a property of the images (out of memory, a device or storage fault, a bug): the
batch is retried ``model_retries`` times, then the job fails with the reason and that shard is not
committed (``pipeline.runtime.stages``). ``max_error_fraction`` fails a job with too many error rows;
``retry_errors=true`` recomputes the shards of an existing corpus that have error rows.

``TokenizeStage`` is Ray-free: built from its ``TokenizeStageConfig``, it loads the tokenizer once and
maps a numpy batch (``KEEP`` columns + ``pixels``) to corpus columns (``words=False``: the token ids
only; ``WordsStage`` adds the rest). The job hands ``tokenize_spec`` (a ``pipeline.runtime.stages.StageSpec``)
to ``run_sharded_job``, or, with ``in_process=true``, the same spec to ``run_in_process``.
The driver then checks the corpus (counts, token histograms and utilization per layer, a round trip
on a sample: the emitted ids are re-derived with the library and decoded, PSNR against the
originals) and logs everything to one MLflow run per output.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.inputs.images import (
    FIT,
    FIT_MODES,
    MAX_PIXELS,
    DecodeOptions,
    FitMode,
    decode_table,
    pixels_to_device,
    to_float,
)
from pipeline.inputs.sources import Shard, SourceConfig, list_shards, read_shard
from pipeline.outputs.contracts import load_tokenizer
from pipeline.outputs.corpus import (
    JSONL_SUFFIX,
    PART_PREFIX,
    corpus_schema,
    deepest_decodable,
    jsonl_bytes,
    part_files,
    token_pyramid,
    tokens_column,
    words_column,
)
from pipeline.runtime.ray_utils import RayConfig, init_ray
from pipeline.runtime.stages import (
    CALLS_PER_ACTOR,
    MAX_ERROR_FRACTION,
    MODEL_RETRIES,
    TASK_ROWS,
    StageFailure,
    StageSpec,
    batch_shards,
    call_with_retries,
    carry,
    check_error_fraction,
    check_reliability,
    mark_fatal,
    run_in_process,
    run_sharded_job,
)
from pipeline.runtime.storage import resolve
from pipeline.runtime.tracking import MlflowConfig, log_params_flat, start_run, tracking_dir
from spae.config import to_dict
from spae.encode_options import EncodeOptions
from spae.fonts import add_stand_in_legend, legible, words_font
from spae.metrics import psnr
from spae.video import clips_to_uint8, frames_as_images

TOKENIZE_STAGE = "tokenize"
HISTOGRAM_TOP = 40

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizeJobConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    tokenizer: str = ""  # save_pretrained folder (local, s3://) or an MLflow URI (runs:/, models:/)
    layers: tuple[int, ...] = ()  # pyramid layers to emit (1-indexed); () = all
    output: str = ""  # corpus folder, local or s3://
    batch_size: int = 64
    actors: int = 1
    num_gpus_per_actor: float = 0.0
    calls_per_actor: int = CALLS_PER_ACTOR  # Ray Data calls in flight per actor (pipeline.runtime.stages)
    device: str = "auto"  # "auto" = cuda when the actor sees a GPU, else cpu (spae.devices)
    # how the encoder runs (spae.encode_options.EncodeOptions): fp32 eager by default, the training
    # forward's tokens; encode.compile=true / encode.dtype=bfloat16 are faster on a GPU (docs/BENCHMARKS.md)
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    fit: FitMode = FIT  # pipeline.inputs.images fit policy
    max_pixels: int = MAX_PIXELS  # larger images become error rows
    roundtrip_sample: int = 8  # images decoded back for the round-trip check (0 = skip)
    run_name: str = ""  # MLflow run name; "" = derived from the output URI (a re-run resumes it)
    progress: bool = True
    fail_after_shards: int = 0  # test hook: die while committing shard N+1 (0 = never)
    fail_encode_at: str = ""  # test hook: a batch holding a row of this shard id or image id fails encode
    model_retries: int = MODEL_RETRIES  # retries of a failing encode call before the job fails
    max_error_fraction: float = MAX_ERROR_FRACTION  # error rows above this fraction fail the job
    retry_errors: bool = False  # recompute the shards of an existing corpus that have error rows
    in_process: bool = False  # no Ray: read, decode, tokenize and commit here (small inputs, debugging)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        if min(self.batch_size, self.actors, self.calls_per_actor) < 1:
            raise ValueError(
                f"batch_size ({self.batch_size}), actors ({self.actors}) and calls_per_actor "
                f"({self.calls_per_actor}) must be >= 1"
            )
        if self.num_gpus_per_actor < 0 or self.roundtrip_sample < 0 or self.fail_after_shards < 0:
            raise ValueError("num_gpus_per_actor, roundtrip_sample and fail_after_shards must be >= 0")
        check_reliability(self.model_retries, self.max_error_fraction)
        if self.fit not in FIT_MODES:
            raise ValueError(f"fit: {self.fit!r} is not one of {', '.join(FIT_MODES)}")
        if any(l < 1 for l in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(
                f"layers: {list(self.layers)} must be distinct 1-indexed layers (or empty for all)"
            )


class InjectedFailure(RuntimeError):
    """Raised by the ``fail_after_shards`` test hook."""


INJECTED_DEVICE_ERROR = "CUDA error: an illegal memory access was encountered (injected: fail_encode_at)"


# ----------------------------------------------------------------------------- the tokenizer


def resolve_layers(layers: Sequence[int], pyramid: Any) -> tuple[int, ...]:
    """``()`` -> every layer; else the sorted layers, each checked against the pyramid."""
    if not layers:
        return tuple(range(1, pyramid.num_layers + 1))
    for l in layers:
        pyramid.layer_size(l)  # ValueError naming the allowed range
    return tuple(sorted(layers))


# ----------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class TokenizeStageConfig:
    """What a ``TokenizeStage`` is built from (the job's ``tokenize_spec`` derives it from its config)."""

    tokenizer: str  # save_pretrained folder (local, s3://) or an MLflow URI (runs:/, models:/)
    layers: tuple[int, ...] = ()  # pyramid layers to emit (1-indexed); () = all
    device: str = "auto"  # spae.devices.resolve_device
    words: bool = True  # also words_l<l> and text (False: ids only, WordsStage on the driver)
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    retries: int = MODEL_RETRIES  # retries of a failing encode call before the rows are marked fatal
    fail_at: str = ""  # test hook: a shard id or image id whose batches fail encode
    warmup: int = 0  # rows of a blank batch encoded when the stage is built (a compiled encoder's first call)


class TokenizeStage:
    """Ray-free: ``KEEP`` columns + ``pixels`` uint8 ``[n, H, W, 3]`` (clips of a video tokenizer:
    ``[n, T, H, W, 3]``) -> ``KEEP`` + corpus columns.

    Rows with an error pass through (empty tokens). An encode failure is not a property of the
    images: it is retried ``retries`` times, then its rows are marked ``FATAL_STAGE`` (the driver
    stops the job with that reason; the shard is not committed). ``fail_at`` (a test hook: a shard
    id or an image id) makes encode raise a CUDA-like ``RuntimeError`` on every batch holding a row
    of that shard or that image. The uint8
    pixels go to the device as they are and become floats there (``pixels_to_device``).
    ``words=False`` emits the token ids only (``tokens_l<l>``, no ``words_l<l>`` / ``text``): the Ray
    job then builds words and text with ``WordsStage`` on the driver, off the GPU actor.
    """

    def __init__(self, config: TokenizeStageConfig):
        self.retries = config.retries
        self.fail_at = config.fail_at
        self.tokenizer = load_tokenizer(config.tokenizer, config.device)
        self.tokenizer.encode_options = config.encode
        self.layers = resolve_layers(config.layers, self.tokenizer.pyramid)
        self.words = WordsStage(self.tokenizer.vocabulary.words, self.layers) if config.words else None
        if config.warmup:  # compile now, before the actor takes its first batch (and time it apart)
            cfg = self.tokenizer.config
            frames = (cfg.num_frames,) if cfg.num_frames else ()
            start = time.perf_counter()
            self._encode(np.zeros((config.warmup, *frames, cfg.image_size, cfg.image_size, 3), np.uint8), {})
            log.info("tokenize stage: first encode call (warm-up) took %.1f s", time.perf_counter() - start)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = carry(batch)
        n = len(batch["image_id"])
        error = np.array([_reason(e) for e in batch["error"]], dtype=object)
        stage = np.array([_reason(s) for s in batch.get("error_stage", [None] * n)], dtype=object)
        ok = error == ""
        tokens = {l: np.zeros((n, self.tokenizer.pyramid.token_counts[l - 1]), np.int32) for l in self.layers}
        rows = np.flatnonzero(ok)
        if len(rows):
            pixels = np.asarray(batch["pixels"])
            pixels = pixels if len(rows) == n else pixels[rows]  # no host copy when every row is ok
            try:
                what = f"tokenize (shard {batch_shards(batch)})"
                pyramid = call_with_retries(lambda: self._encode(pixels, batch), what, self.retries)
            except StageFailure as e:  # never an error row of the images: the job stops (stages.py)
                mark_fatal(error, stage, rows, e)
            else:
                for l in self.layers:
                    tokens[l][rows] = pyramid.layer_ids(l).reshape(len(rows), -1).numpy()  # [k, n_l]
        out.update(error=error, error_stage=stage)
        for l in self.layers:
            out[tokens_column(l)] = tokens[l]
        return self.words(out) if self.words is not None else out

    def _encode(self, pixels: np.ndarray, batch: dict[str, np.ndarray]) -> Any:
        if self.fail_at and any(
            self.fail_at in {str(v) for v in batch.get(key, ())} for key in ("shard_id", "image_id")
        ):
            raise RuntimeError(INJECTED_DEVICE_ERROR)
        images = pixels_to_device(pixels, self.tokenizer.device)  # [k, 3, (T,) H, W] in [0, 1]
        return self.tokenizer.encode(images, layers=self.layers)


class WordsStage:
    """Ray-free, CPU: ``tokens_l<l>`` int ``[n, n_l]`` + ``error`` -> + ``words_l<l>`` (a list of words
    per row) and ``text`` (``"[L1] w [L2] w w w w ..."``, as ``TokenPyramid.to_text``), both as Arrow
    arrays (``list<string>``, ``string``). Rows with an error get ``[]`` and ``""``.

    Vectorised in Arrow: one ``take`` of the vocabulary per layer and one per batch for the text, whose
    rows are the layer tags (extra rows of the lookup table) and words joined by ``binary_join``; no
    Python object per token (a ``paper`` corpus row holds 597 words: the driver builds them for every
    row the GPU encodes).
    """

    def __init__(self, words: Sequence[str], layers: Sequence[int]):
        self.layers = tuple(layers)
        v = len(words)
        # [v + L]: the vocabulary, then "[L<l>]" for each emitted layer (ids v, v+1, ...)
        self.table = pa.array([*words, *(f"[L{l}]" for l in self.layers)], type=pa.string())
        self.tags = {l: v + i for i, l in enumerate(self.layers)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        ok = np.array([_reason(e) == "" for e in batch["error"]], dtype=bool)  # [n]
        out = dict(batch)
        parts = []
        for l in self.layers:
            ids = np.asarray(batch[tokens_column(l)])[ok].astype(np.int64)  # [k, n_l]
            assert ids.shape[1] > 0, "every pyramid layer has at least one token"
            out[words_column(l)] = self._lists(ids, ok)
            parts += [np.full((len(ids), 1), self.tags[l]), ids]
        out["text"] = pc.binary_join(self._lists(np.concatenate(parts, axis=1), ok), " ")  # [n]
        return out

    def _lists(self, ids: np.ndarray, ok: np.ndarray) -> pa.ListArray:
        """ids ``[k, m]`` of the ``ok`` rows -> ``[n]`` lists of their words, ``[]`` for the other rows."""
        lengths = np.where(ok, ids.shape[1], 0)  # [n]
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        return pa.ListArray.from_arrays(offsets, self.table.take(pa.array(ids.reshape(-1))))


def tokenize_spec(cfg: TokenizeJobConfig, layers: Sequence[int]) -> StageSpec:
    """The job's model stage: ``TokenizeStage`` emitting token ids only, on an actor pool. Words and text
    are built on the driver by ``WordsStage`` (``run_sharded_job``'s ``driver_stage``): as Ray Data tasks
    they were starved by the read tasks on the 2-CPU test cluster (``backpressured: ResourceBudget``)
    and held every actor output until the end, so a fault at 83% of a 3-shard job had committed 0
    shards; on the driver, 2."""
    config = TokenizeStageConfig(
        tokenizer=cfg.tokenizer,
        layers=tuple(layers),
        device=cfg.device,
        words=False,
        encode=cfg.encode,
        retries=cfg.model_retries,
        fail_at=cfg.fail_encode_at,
        warmup=cfg.batch_size if cfg.encode.compile else 0,
    )
    return StageSpec(
        TokenizeStage,
        config,
        actors=cfg.actors,
        batch_size=cfg.batch_size,
        num_gpus=cfg.num_gpus_per_actor,
        calls_per_actor=cfg.calls_per_actor,
    )


def _reason(value: Any) -> str:
    """An error cell -> its reason, ``""`` for none. Ray hands an all-null string column back as a
    float NaN array, so anything but a string means "no error" (as ``pipeline.outputs.schemas.error_mask``);
    emitting ``""`` keeps the column a string column."""
    return value if isinstance(value, str) else ""


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class TokenizeResult:
    manifest: dict[str, Any]
    shards_total: int
    shards_run: int
    rows_run: int
    seconds: float
    metrics: dict[str, float]
    run_id: str | None


def jsonl_sidecar(shard_id: str, table: pa.Table) -> dict[str, bytes]:
    """The JSONL twin of a shard, committed before its Parquet part."""
    return {f"{PART_PREFIX}{shard_id}{JSONL_SUFFIX}": jsonl_bytes(table)}


def run_name_for(cfg: TokenizeJobConfig, output_uri: str) -> str:
    """One MLflow run per corpus: a re-run (after a crash) resumes it."""
    return cfg.run_name or f"tokenize:{output_uri}"


def run_tokenize_job(cfg: TokenizeJobConfig) -> TokenizeResult:
    if not cfg.output:
        raise ValueError("output: empty; give the corpus folder (local path or s3://bucket/prefix)")
    started = time.perf_counter()
    out = resolve(cfg.output)
    tokenizer = load_tokenizer(cfg.tokenizer, "cpu")
    layers = resolve_layers(cfg.layers, tokenizer.pyramid)
    decode = DecodeOptions.for_model(tokenizer.config, fit=cfg.fit, max_pixels=cfg.max_pixels)
    listing = time.perf_counter()
    shards = list_shards(cfg.source)
    startup = {"startup/load_s": listing - started, "startup/list_s": time.perf_counter() - listing}
    fingerprint = tokenizer.fingerprint()
    card = dict(tokenizer.codebook.card)
    identity = {
        "tokenizer_fingerprint": fingerprint,
        "codebook_hash": card.get("hash", ""),
        "layers": list(layers),
        "image_size": tokenizer.config.image_size,
        **({"num_frames": tokenizer.config.num_frames} if tokenizer.config.num_frames else {}),
        "fit": cfg.fit,
        "max_pixels": cfg.max_pixels,
        # the encoder's options change tokens: part of the identity when they are not the default
        **({"encode": to_dict(cfg.encode)} if cfg.encode != EncodeOptions() else {}),
    }
    manifest_extra = {
        "tokenizer": {"uri": cfg.tokenizer, "fingerprint": fingerprint, "codebook_card": card},
        "layers": list(layers),
        "text_format": "[L<l>] w w ... per layer, ascending; row-major within a layer (docs/CORPUS.md)",
    }
    if not cfg.in_process:
        ray_start = time.perf_counter()
        init_ray(cfg.ray)
        startup["startup/ray_s"] = time.perf_counter() - ray_start
    committing = 0

    def sidecars(shard_id: str, table: pa.Table) -> dict[str, bytes]:
        nonlocal committing
        committing += 1
        if cfg.fail_after_shards and committing > cfg.fail_after_shards:  # dies inside the next commit
            raise InjectedFailure(
                f"fail_after_shards={cfg.fail_after_shards}: stopping while committing {shard_id}"
            )
        return jsonl_sidecar(shard_id, table)

    run_name = run_name_for(cfg, out.uri)
    tags = {
        "spae.job": "tokenize",
        "spae.output": out.uri,
        "spae.tokenizer": cfg.tokenizer,  # also a tag: runs are searchable by tokenizer
        "spae.tokenizer_fingerprint": fingerprint,
    }
    with start_run(cfg.mlflow, run_name, default_dir=tracking_dir(cfg.output), tags=tags) as run:
        if run is not None:
            _log_params(cfg, run)
            _log_dataset(
                cfg.source.uri, "input", digest=_shards_digest(shards), rows=sum(s.num_rows for s in shards)
            )
        runner = run_in_process if cfg.in_process else run_sharded_job
        result = runner(
            shards,
            out,
            corpus_schema(layers, caption=bool(cfg.source.caption_column)),
            decode=decode,
            stages=[tokenize_spec(cfg, layers)],
            identity=identity,
            config=to_dict(cfg),
            progress=cfg.progress,
            manifest_extra=manifest_extra,
            sidecars=sidecars,
            task_rows=max(TASK_ROWS, cfg.batch_size),
            max_error_fraction=1.0,  # checked below, once the corpus is logged
            retry_errors=cfg.retry_errors,
            driver_stage=WordsStage(tokenizer.vocabulary.words, layers),
        )
        manifest = result.manifest
        metrics: dict[str, float] = {
            "rows_in": manifest["rows_in"],
            "rows_written": manifest["rows_written"],
            "errors": manifest["errors"],
            "shards_total": result.shards_total,
            "shards_run": result.shards_run,
            "rows_run": result.rows_run,
            "seconds": result.seconds,
            "images_per_s": result.images_per_s,
            **startup,
            **({"startup/first_batch_s": result.first_batch_s} if result.first_batch_s is not None else {}),
        }
        counts = token_counts(out, layers, len(tokenizer.vocabulary))
        for l, c in counts.items():
            metrics.update(_usage_metrics(l, c))
        check = (
            roundtrip_check(tokenizer, out, shards, layers, decode, cfg.roundtrip_sample)
            if cfg.roundtrip_sample
            else None
        )
        if check is not None:
            metrics.update(check.metrics)
        if run is not None:
            _log_run(metrics, counts, tokenizer.vocabulary.words, check, out.uri, manifest)
        check_error_fraction(out.uri, manifest, cfg.max_error_fraction)
        return TokenizeResult(
            manifest=manifest,
            shards_total=result.shards_total,
            shards_run=result.shards_run,
            rows_run=result.rows_run,
            seconds=result.seconds,
            metrics=metrics,
            run_id=run.info.run_id if run is not None else None,
        )


def _shards_digest(shards: list[Shard]) -> str:
    return hashlib.sha256("".join(s.digest for s in shards).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- corpus checks


def token_counts(out: Any, layers: Sequence[int], vocab_size: int) -> dict[int, np.ndarray]:
    """Per layer, ``[v]`` counts of every token over the whole corpus (read one part at a time)."""
    counts = {l: np.zeros(vocab_size, np.int64) for l in layers}
    for part in part_files(out):
        table = pq.read_table(part.path, columns=[tokens_column(l) for l in layers], filesystem=part.fs)
        for l in layers:
            flat = pc.list_flatten(table.column(tokens_column(l))).to_numpy(zero_copy_only=False)
            counts[l] += np.bincount(flat.astype(np.int64), minlength=vocab_size)
    return counts


def _usage_metrics(layer: int, counts: np.ndarray) -> dict[str, float]:
    total = int(counts.sum())
    if total == 0:
        return {}
    p = counts[counts > 0] / total
    return {
        f"layer{layer}/utilization": float((counts > 0).mean()),
        f"layer{layer}/distinct_tokens": int((counts > 0).sum()),
        f"layer{layer}/perplexity": float(np.exp(-(p * np.log(p)).sum())),
    }


@dataclass(frozen=True)
class RoundTrip:
    image_ids: list[str]
    originals: np.ndarray  # [k, H, W, 3] uint8 (clips: [k, T, H, W, 3])
    decodes: np.ndarray | None  # like originals, None if no covering prefix was emitted
    metrics: dict[str, float]


def roundtrip_check(
    tokenizer: Any, out: Any, shards: list[Shard], layers: Sequence[int], decode: DecodeOptions, count: int
) -> RoundTrip | None:
    """Re-derive the ids of ``count`` rows (decoded as the job did) with the library, compare with the
    corpus, decode them, PSNR."""
    sample, originals = [], []
    for shard in shards:  # the first committed rows in shard order
        part = out.join(f"{PART_PREFIX}{shard.shard_id}.parquet")
        if not part.exists():
            continue
        table = pq.read_table(part.path, filesystem=part.fs)
        if table.num_rows == 0:
            continue
        take = table.slice(0, count - sum(t.num_rows for t in sample))
        raw = read_shard(shard)
        index = {iid: i for i, iid in enumerate(raw.column("image_id").to_pylist())}
        raw = raw.take(pa.array([index[i] for i in take.column("image_id").to_pylist()], pa.int64()))
        decoded = decode_table(raw, decode)  # the sampled rows only
        sample.append(take)
        originals.append(decoded["pixels"])
        if sum(t.num_rows for t in sample) >= count:
            break
    if not sample:
        return None
    table = pa.concat_tables(sample)
    pixels = np.concatenate(originals)  # [k, H, W, 3]
    images = torch.from_numpy(to_float(pixels))  # [k, 3, H, W]
    stored = token_pyramid(table, tokenizer, layers)
    fresh = tokenizer.encode(images, layers=layers)
    same = sum(int((stored.layer_ids(l) == fresh.layer_ids(l)).sum()) for l in layers)
    total = sum(stored.layer_ids(l).numel() for l in layers)
    # fraction of the sample's tokens the library gives again (on the driver's CPU; a GPU actor's
    # float rounding can flip near-ties, so slightly below 1 there is not by itself a bug)
    metrics = {"roundtrip/images": table.num_rows, "roundtrip/ids_match": same / total}
    texts_ok = table.column("text").to_pylist() == stored.to_text(layers)
    metrics["roundtrip/text_match"] = float(texts_ok)
    prefix = deepest_decodable(layers, tokenizer.pyramid.covering_layers)
    decodes = None
    if prefix is not None:
        recon = tokenizer.decode(stored, up_to_layer=prefix)  # [k, 3, H, W]
        if recon.dim() == 5:  # clips: PSNR per frame, decodes as uint8 [k, T, H, W, 3]
            metrics["roundtrip/psnr"] = float(
                psnr(frames_as_images(recon), frames_as_images(images)).clamp(max=100.0).mean()
            )
            decodes = clips_to_uint8(recon)
        else:
            metrics["roundtrip/psnr"] = float(psnr(recon, images).clamp(max=100.0).mean())
            decodes = (recon.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
        metrics["roundtrip/prefix"] = prefix
    return RoundTrip(table.column("image_id").to_pylist(), pixels, decodes, metrics)


# ----------------------------------------------------------------------------- MLflow


# do not change the corpus: not params (a resumed run re-logs its params)
VOLATILE_PARAMS = (
    "fail_after_shards",
    "fail_encode_at",
    "progress",
    "retry_errors",
    "max_error_fraction",
    "model_retries",
)


def _log_params(cfg: TokenizeJobConfig, run: Any) -> None:
    """Params of the job (a resumed run keeps its params: see ``log_params_flat``)."""
    log_params_flat(cfg, skip=VOLATILE_PARAMS)


def _log_dataset(uri: str, context: str, digest: str, rows: int | None = None) -> None:
    """Lineage: an MLflow dataset whose source is ``uri`` (input or output of the run)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    try:
        source = resolve_dataset_source(uri)
    except Exception:  # noqa: BLE001 - e.g. mnist://: no resolver; keep the URI as an opaque source
        source = HTTPDatasetSource(url=uri)
    name = f"{context}:{uri}" if rows is None else f"{context}:{uri} ({rows} rows)"
    mlflow.log_input(MetaDataset(source=source, name=name[:500], digest=digest), context=context)


def histogram_figure(layer: int, counts: np.ndarray, words: Sequence[str]) -> Any:
    """Bar chart of a layer's most frequent tokens (count per word) + utilization in the title."""
    from matplotlib.figure import Figure

    top = np.argsort(-counts, kind="stable")[:HISTOGRAM_TOP]
    top = top[counts[top] > 0]
    with words_font() as stack:
        fig = Figure(figsize=(8, 3.2), dpi=100)
        ax = fig.subplots()
        ax.bar(range(len(top)), counts[top], color="#c06010")
        labels = [legible(words[i]) for i in top]
        ax.set_xticks(range(len(top)), labels, rotation=70, fontsize=7, family=list(stack.families))
        used = int((counts > 0).sum())
        ax.set_title(f"layer {layer}: {used} of {len(counts)} tokens used; top {len(top)}", fontsize=9)
        ax.set_ylabel("count")
        legend = add_stand_in_legend(fig, [words[i] for i in top])
        fig.tight_layout(rect=(0, 0.04, 1, 1) if legend else None)
    return fig


def roundtrip_picture(check: RoundTrip) -> np.ndarray:
    """Originals (top row) over decodes (bottom row), uint8 ``[2H, k*W, 3]``; clips show their frames
    side by side (``[2H, k*T*W, 3]``)."""

    def row(pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim == 5:  # [k, T, H, W, 3] -> frames in a row
            pixels = pixels.reshape(-1, *pixels.shape[2:])
        return np.concatenate(list(pixels), axis=1)

    top = row(check.originals)
    if check.decodes is None:
        return top
    return np.concatenate([top, row(check.decodes)], axis=0)


def _log_run(metrics, counts, words, check, output_uri, manifest) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    _log_dataset(output_uri, "output", digest=manifest["job_digest"], rows=manifest["rows_written"])
    for l, c in counts.items():
        mlflow.log_figure(histogram_figure(l, c, words), f"histograms/layer_{l}.png")
    mlflow.log_dict(manifest, "corpus_manifest.json")
    if check is not None:
        picture = roundtrip_picture(check)
        scale = max(1, 128 // picture.shape[0])
        mlflow.log_image(picture.repeat(scale, 0).repeat(scale, 1), artifact_file="roundtrip.png")
        mlflow.log_dict({"image_ids": check.image_ids, **check.metrics}, "roundtrip.json")


__all__ = [
    "InjectedFailure",
    "TokenizeJobConfig",
    "TokenizeResult",
    "TokenizeStage",
    "TokenizeStageConfig",
    "WordsStage",
    "tokenize_spec",
    "load_tokenizer",
    "run_tokenize_job",
]
