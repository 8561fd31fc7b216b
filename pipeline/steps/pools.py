"""The candidate-pool job: for every image, its top-K vocabulary tokens by semantic score (eq. 4-6).

::

    source shards -> read + decode (tasks) -> PoolStage on an actor pool (scorer + TokenSearch)
        -> driver: ShardWriter (one part-<shard>.parquet each, exactly once) -> .spae/manifest.json

Per image (``POOLS_SCHEMA``): the image feature ``f_I(I)`` (float16), ``s_min`` / ``s_max`` of
``s'(I, k) = f_I(I) . f'_T(k)`` over the WHOLE vocabulary, the top-K token ids (codebook rows) and
their eq. 6 normalised scores ``(s' - s_min) / (s_max - s_min)``, and ``n_above_min_threshold``:
how many of the top-K reach ``min_threshold`` (the lowest rho of eq. 4). When it equals K the pool
is truncated (``pool_truncated``): more tokens may pass, raise ``top_k``. Thresholds are applied at
training time, so rho can change without recomputing pools.

Clips (video SPAE, ``frames > 0``): rows decode to ``[T, S, S, 3]`` clips; the scorer sees
``sample_frames`` frames spread evenly over each clip and the clip's feature is the mean of their
image features, L2-normalised again; s', top-K and eq. 6 then run as for an image.

Failures: unreadable or undecodable images are error rows; an exception of the scorer or the search
is retried ``model_retries`` times and then stops the job (``pipeline.runtime.stages``: that shard is not
committed, a re-run resumes). ``max_error_fraction`` fails a job with too many error rows;
``retry_errors=true`` recomputes the committed shards that have error rows.

Label-probe scorer: when ``scorer.probe_path`` does not exist, the probe is trained first on
``probe_train_uri`` (a labelled source: MNIST, or an ImageFolder-style folder) and saved there. The word
probe (several words per image) is trained the same way on a source whose rows carry their words
(``scenes://``, ``pipeline.inputs.sources.image_words``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.inputs.images import FIT, MAX_PIXELS, DecodeOptions, FitMode, pixels_to_device, to_float
from pipeline.inputs.sources import (
    SourceConfig,
    _parse_moving_mnist_uri,
    class_words,
    decode_source,
    image_word_weights,
    list_shards,
)
from pipeline.outputs.contracts import VocabCard
from pipeline.outputs.schemas import POOLS_SCHEMA
from pipeline.runtime.ray_utils import RayConfig
from pipeline.runtime.stages import (
    MAX_ERROR_FRACTION,
    MODEL_RETRIES,
    TASK_ROWS,
    ShardedJobResult,
    StageFailure,
    StageSpec,
    batch_shards,
    call_with_retries,
    carry,
    check_reliability,
    mark_fatal,
    ok_rows,
    run_sharded_job,
)
from pipeline.runtime.tracking import MlflowConfig
from pipeline.steps.search import SearchConfig, TokenSearch, normalize_scores
from pipeline.steps.vocab import load_text_features
from spae.codebook import CodebookConfig, load_codebook
from spae.config import to_dict
from spae.scenes import WORDS as SCENE_WORDS
from spae.scenes import word_matrix
from spae.scorers import (
    PROBE_KINDS,
    ScorerConfig,
    build_scorer,
    describe_scorer,
    train_label_probe,
    train_word_probe,
)
from spae.video import sample_frame_indices

STAGE = "pools"
FORMAT = "spae-pools-v1"
SAMPLE_FRAMES = 4  # clips: frames per clip the scorer sees, by default


@dataclass(frozen=True)
class PoolsJobConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    vocab: str = "outputs/vocab"  # URI of the vocab table (spae vocab)
    scorer: ScorerConfig = field(
        default_factory=lambda: ScorerConfig(kind="label_probe", probe_path="outputs/probe")
    )
    search: SearchConfig = field(default_factory=SearchConfig)
    top_k: int = 64  # clamped to the vocabulary size
    min_threshold: float = 0.8  # the lowest rho of eq. 4, for n_above_min_threshold
    output: str = "outputs/pools"  # local path, file:// or s3://bucket/prefix
    image_size: int = 0  # decode size; 0 = the scorer's input size
    frames: int = 0  # clips: decode T frames per row (video SPAE); 0 = images
    sample_frames: int = SAMPLE_FRAMES  # clips: frames the scorer sees (evenly spread), features averaged
    fit: FitMode = FIT  # resize policy, see pipeline.inputs.images
    max_pixels: int = MAX_PIXELS  # larger images become error rows
    batch_size: int = 256  # images per actor call
    actors: int = 1
    num_gpus_per_actor: float = 0
    num_cpus_per_actor: float = 1
    probe_train_uri: str = "mnist://train?limit=5000"  # label probe: trained here when probe_path is missing
    probe_steps: int = 300
    # word probe: the words its directions keep low (spae.scorers.word_directions): the top N whole words of
    # the MiniLM vocabulary (the default codebook filter); 0 = none (g_w = f'_T(w))
    probe_contrast_words: int = 4096
    progress: bool = True
    model_retries: int = MODEL_RETRIES  # retries of a failing scorer/search call before the job fails
    max_error_fraction: float = MAX_ERROR_FRACTION  # error rows above this fraction fail the job
    retry_errors: bool = False  # recompute the committed shards that have error rows
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        check_reliability(self.model_retries, self.max_error_fraction)
        if not self.output:
            raise ValueError("output: empty; give a local path or s3://bucket/prefix")
        if not self.vocab:
            raise ValueError("vocab: empty; give the URI of a vocab table (spae vocab)")
        if self.probe_contrast_words < 0:
            raise ValueError(f"probe_contrast_words: must be >= 0, got {self.probe_contrast_words}")
        for name in ("top_k", "batch_size", "actors", "probe_steps", "sample_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.min_threshold <= 1.0:
            raise ValueError(
                f"min_threshold: must lie in [0, 1] (a normalised score), got {self.min_threshold}"
            )
        if self.frames < 0:
            raise ValueError(f"frames: must be >= 0 (0 = images, else frames per clip), got {self.frames}")
        if self.image_size < 0:
            raise ValueError(f"image_size: must be >= 0 (0 = the scorer's), got {self.image_size}")


# ----------------------------------------------------------------------------- the stage (Ray-free)


@dataclass(frozen=True)
class PoolStageConfig:
    """What a ``PoolStage`` is built from (the job's ``pool_spec`` derives it from its config)."""

    scorer: ScorerConfig
    vocab: str  # URI of the vocab table (its text features)
    search: SearchConfig
    top_k: int  # clamped to the vocabulary size
    min_threshold: float  # the lowest rho of eq. 4, for n_above_min_threshold
    sample_frames: int = SAMPLE_FRAMES  # clips: frames per clip the scorer sees
    retries: int = MODEL_RETRIES  # retries of a failing scorer/search call before the rows are marked fatal


class PoolStage:
    """``pixels`` uint8 ``[n, H, W, 3]`` (clips ``[n, T, H, W, 3]``) -> the pool columns of ``POOLS_SCHEMA``
    (+ ``KEEP`` columns)."""

    def __init__(self, config: PoolStageConfig):
        self.retries = config.retries
        self.scorer = build_scorer(config.scorer)
        text_features, _ = load_text_features(config.vocab)  # [v, d]
        self.search = TokenSearch(text_features, config.search)
        self.k = min(config.top_k, len(text_features))
        self.min_threshold = config.min_threshold
        self.sample_frames = config.sample_frames

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[b, H, W, 3]`` -> ``f_I`` ``[b, d]``; clips ``[b, T, H, W, 3]``: the mean over sampled
        frames, L2-normalised."""
        if pixels.ndim == 4:
            images = pixels_to_device(pixels, self.scorer.device)  # [b, 3, H, W] in [0, 1], uint8 across
            return self.scorer.embed_images(images).float().cpu().numpy()  # [b, d]
        b, t = pixels.shape[:2]
        idx = sample_frame_indices(t, self.sample_frames)
        frames = pixels[:, idx].reshape(b * len(idx), *pixels.shape[2:])  # [b*k, H, W, 3]
        f = self.embed(frames).reshape(b, len(idx), -1).mean(1)  # [b, d]: averaged image features
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = ok_rows(batch)  # [n]
        n, k, d = len(ok), self.k, self.scorer.dim
        feats = np.zeros((n, d), np.float16)
        s_min = np.zeros(n, np.float32)
        s_max = np.zeros(n, np.float32)
        ids = np.zeros((n, k), np.int32)
        scores = np.zeros((n, k), np.float32)
        error = np.array([e if isinstance(e, str) else None for e in batch["error"]], dtype=object)
        stage = np.array(
            [e if isinstance(e, str) else None for e in batch.get("error_stage", [None] * n)], dtype=object
        )
        if ok.any():
            pixels = np.asarray(batch["pixels"])
            pixels = pixels if ok.all() else pixels[ok]  # no host copy if all ok

            def score() -> tuple[np.ndarray, Any]:
                f = self.embed(pixels)  # [b, d]  f_I(I)
                return f, self.search.search(f, k)  # eq. 4's s'(I, k) for the top-K, min and max

            try:
                f, result = call_with_retries(score, f"pools (shard {batch_shards(batch)})", self.retries)
            except StageFailure as e:  # never an error row of the images: the job stops (stages.py)
                mark_fatal(error, stage, np.flatnonzero(ok), e)
            else:
                feats[ok] = f.astype(np.float16)
                s_min[ok], s_max[ok] = result.s_min, result.s_max
                ids[ok] = result.topk_ids.astype(np.int32)
                scores[ok] = normalize_scores(result)  # eq. 6
        above = (scores >= self.min_threshold).sum(axis=1).astype(np.int32)  # [n]
        return {
            **carry(batch),
            "error": error,
            "error_stage": stage,
            "image_feature": feats,
            "s_min": s_min,
            "s_max": s_max,
            "topk_ids": ids,
            "topk_scores": scores,
            "n_above_min_threshold": above,
            "pool_truncated": above == k,
        }


# ----------------------------------------------------------------------------- label probe


def ensure_probe(cfg: PoolsJobConfig, log: Callable[[str], None] = print) -> bool:
    """Train and save the label probe at ``scorer.probe_path`` if it is missing; True if trained now."""
    scorer = cfg.scorer
    if scorer.kind not in PROBE_KINDS:
        return False
    if not scorer.probe_path:
        raise ValueError(f"scorer.probe_path: the {scorer.kind} needs a folder (trained there if missing)")
    path = Path(scorer.probe_path)
    if (path / "probe.json").is_file():
        return False
    source = SourceConfig(uri=cfg.probe_train_uri, shard_size=10_000)
    if scorer.kind == "word_probe":
        return _train_word_probe(cfg, source, path, log)
    first = list_shards(source)[0]
    words = class_words(first.kind, first.classes)
    if not words:
        raise ValueError(
            f"probe_train_uri: {cfg.probe_train_uri} has no labels; the label probe needs mnist://... or "
            "an ImageFolder-style folder (one subfolder per class)"
        )
    size = cfg.image_size or 32
    frames = _probe_frames(source.uri)
    data = decode_source(source, DecodeOptions(size, frames, fit=cfg.fit, max_pixels=cfg.max_pixels))
    keep = data.labels >= 0
    pixels, labels = data.pixels[keep], data.labels[keep]
    if frames:  # clips: the sampled frames, each with its clip's label
        idx = sample_frame_indices(frames, cfg.sample_frames)
        pixels = pixels[:, idx].reshape(-1, size, size, 3)
        labels = np.repeat(labels, len(idx))
    x = torch.from_numpy(to_float(pixels))  # [n, 3, s, s]
    y = torch.from_numpy(labels)  # [n]
    log(
        f"label probe: {path} is missing; training it on {cfg.probe_train_uri} "
        f"({len(y)} images, {cfg.probe_steps} steps)"
    )
    probe = train_label_probe(
        x, y, words, steps=cfg.probe_steps, image_size=size, renormalize_text=scorer.renormalize_text
    )
    probe.save(path)
    log(f"label probe: saved to {path} (held-out accuracy {probe.meta.get('accuracy')})")
    return True


def _train_word_probe(
    cfg: PoolsJobConfig, source: SourceConfig, path: Path, log: Callable[[str], None]
) -> bool:
    """The word probe of ``ensure_probe``: trained on the words of every row of ``probe_train_uri``."""
    size = cfg.image_size or 64
    data = decode_source(source, DecodeOptions(size, fit=cfg.fit, max_pixels=cfg.max_pixels))
    words = image_word_weights(source, data.image_ids)  # soft targets: each word's salience
    if words is None:
        raise ValueError(
            f"probe_train_uri: {cfg.probe_train_uri} does not say each image's words; the word probe needs a "
            "source whose rows carry several words (scenes://train)"
        )
    x = torch.from_numpy(to_float(data.pixels))  # [n, 3, s, s]
    y = torch.from_numpy(word_matrix(words))  # [n, len(SCENE_WORDS)]
    log(
        f"word probe: {path} is missing; training it on {cfg.probe_train_uri} "
        f"({len(y)} images, {len(SCENE_WORDS)} words, {cfg.probe_steps} steps)"
    )
    n = cfg.probe_contrast_words
    contrast = load_codebook(CodebookConfig(top_n=n)).words if n else ()  # the words kept low
    probe = train_word_probe(
        x,
        y,
        SCENE_WORDS,
        steps=cfg.probe_steps,
        image_size=size,
        renormalize_text=cfg.scorer.renormalize_text,
        contrast_words=contrast,
    )
    probe.save(path)
    log(f"word probe: saved to {path} (held-out mAP {probe.meta.get('map')})")
    return True


def _probe_frames(uri: str) -> int:
    """Frames per clip of a Moving MNIST probe source (0 for image sources)."""
    if not uri.startswith("moving-mnist://"):
        return 0
    return _parse_moving_mnist_uri(uri)[1]["frames"]


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class PoolsJobResult:
    output: str
    manifest: dict[str, Any]
    run: ShardedJobResult
    probe_trained: bool


def scorer_image_size(cfg: ScorerConfig) -> int:
    """The side the scorer reads images at, without building it."""
    if cfg.kind in PROBE_KINDS:
        import json

        return int(json.loads((Path(cfg.probe_path) / "probe.json").read_text())["image_size"])
    import open_clip

    arch = cfg.arch
    if arch.startswith("local-dir:"):
        import json

        model_cfg = json.loads((Path(arch[len("local-dir:") :]) / "open_clip_config.json").read_text())
        model_cfg = model_cfg.get("model_cfg", model_cfg)
    else:
        model_cfg = open_clip.get_model_config(arch) or {}
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, list | tuple) else size)


def check_same_space(
    vocab_scorer: Mapping[str, Any] | None, scorer: Mapping[str, Any], vocab_uri: str
) -> None:
    """The vocab's text features and our image features must come from one embedding space."""
    if not vocab_scorer:
        return
    keys = ("kind", "text_encoder") if scorer["kind"] in PROBE_KINDS else ("kind", "arch", "weights")
    diff = [k for k in keys if vocab_scorer.get(k) != scorer.get(k)]
    if diff:
        theirs = ", ".join(f"{k}={vocab_scorer.get(k)!r}" for k in diff)
        ours = ", ".join(f"{k}={scorer.get(k)!r}" for k in diff)
        raise ValueError(
            f"vocab {vocab_uri} was computed with another scorer ({theirs} vs {ours}); its text features and "
            "these image features live in different spaces. Run spae vocab with this scorer."
        )


def job_identity(cfg: PoolsJobConfig, scorer: Mapping[str, Any], vocab_card: VocabCard, k: int, size: int):
    """What determines the pools' content (the job digest of every part)."""
    clips = {"frames": cfg.frames, "sample_frames": cfg.sample_frames} if cfg.frames else {}
    return {
        **clips,
        "format": FORMAT,
        "scorer": dict(scorer),
        "vocab_job_digest": vocab_card.job_digest,
        "vocab_rows": vocab_card.rows,
        "top_k": k,
        "min_threshold": cfg.min_threshold,
        "image_size": size,
        "fit": cfg.fit,
        "max_pixels": cfg.max_pixels,
    }


def pool_spec(cfg: PoolsJobConfig, k: int) -> StageSpec:
    """The job's model stage: ``PoolStage`` with the top ``k`` (``top_k`` clamped to the vocabulary) on
    an actor pool."""
    config = PoolStageConfig(
        scorer=cfg.scorer,
        vocab=cfg.vocab,
        search=cfg.search,
        top_k=k,
        min_threshold=cfg.min_threshold,
        sample_frames=cfg.sample_frames,
        retries=cfg.model_retries,
    )
    return StageSpec(
        PoolStage,
        config,
        actors=cfg.actors,
        batch_size=cfg.batch_size,
        num_gpus=cfg.num_gpus_per_actor,
        num_cpus=cfg.num_cpus_per_actor,
    )


def run_pools_job(
    cfg: PoolsJobConfig, on_commit: Callable[[str], None] | None = None, log: Callable[[str], None] = print
) -> PoolsJobResult:
    """Compute the missing shards of ``cfg.output``; Ray must be initialised (``init_ray``)."""
    trained = ensure_probe(cfg, log)
    scorer = describe_scorer(cfg.scorer)
    card = VocabCard.read(cfg.vocab)
    check_same_space(card.scorer, scorer, cfg.vocab)
    k = min(cfg.top_k, card.rows)
    if k < cfg.top_k:
        log(f"pools: top_k {cfg.top_k} > vocabulary size {card.rows}; using k={k}")
    size = cfg.image_size or scorer_image_size(cfg.scorer)
    shards = list_shards(cfg.source)
    start = time.perf_counter()
    result = run_sharded_job(
        shards,
        cfg.output,
        POOLS_SCHEMA,
        decode=DecodeOptions(size, cfg.frames, fit=cfg.fit, max_pixels=cfg.max_pixels),
        stages=[pool_spec(cfg, k)],
        identity=job_identity(cfg, scorer, card, k, size),
        config=to_dict(cfg),
        progress=cfg.progress,
        on_commit=on_commit,
        task_rows=max(TASK_ROWS, cfg.batch_size),
        max_error_fraction=cfg.max_error_fraction,
        retry_errors=cfg.retry_errors,
        manifest_extra={"stage": STAGE, "vocab": cfg.vocab, "vocab_card": card.job_digest},
    )
    log(
        f"pools: {result.shards_run}/{result.shards_total} shards computed now, {result.rows_run} images "
        f"in {time.perf_counter() - start:.1f}s ({result.images_per_s:.0f} img/s); "
        f"{result.manifest['rows_written']} rows, {result.manifest['errors']} errors in total"
    )
    return PoolsJobResult(result.manifest["output"], result.manifest, result, trained)
