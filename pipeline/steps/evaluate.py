"""Evaluate a tokenizer on a held-out source: reconstruction, codebook usage, semantics.

::

    tokenizer (dir | s3:// | runs:/ | models:/) + eval source (+ its pools table + the vocab table)
        -> for every covering prefix l: PSNR, SSIM of the reconstruction from layers 1..l
           (clips: per frame, averaged over every frame of every clip)
        -> for every layer: utilization and perplexity over the WHOLE set, distinct tokens,
           semantic relevance (mean normalised eq. 6 score of the emitted tokens; needs pools + vocab)
        -> layer 1: label-word accuracy (the top token is the class's word or numeral; needs labels)
        -> images with several known words (scenes://): per layer and prefix, concept recall / precision
           and the key words (the dominant object's colour and shape) found (``spae.concepts``)
        -> the same PSNR / SSIM / label-word accuracy per group, for a source whose ids carry one
           (``mnist-shifted://``: per shift; ``group/<g>/<metric>``)
        -> deepest prefix, on request: FID, IS, LPIPS (clips: per frame), FVD (clips)
           (``optional_metrics``, local ``weights`` files)
        -> metrics.json + reconstructions.png under ``output``; the same metrics to MLflow

It runs on the driver with plain torch (no Ray): the evaluation set is read shard by shard with
``pipeline.inputs.sources.read_shard`` and decoded with ``pipeline.inputs.images.decode_batch`` (clips of
``num_frames`` frames for a video tokenizer: ``pipeline.inputs.images.DecodeOptions.for_model``). That suits
the
held-out sets used here (thousands of images); the training job calls ``evaluate_tokenizer`` on
rank 0 the same way.

The evaluator itself (data, metrics, pictures) is ``pipeline.steps.evaluator``, shared with the training job;
the tokenizer, the vocab card and the pools manifest are read through ``pipeline.outputs.contracts``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.inputs.images import FIT, MAX_PIXELS, DecodeOptions, FitMode
from pipeline.inputs.sources import SourceConfig
from pipeline.outputs.contracts import PoolsManifest, load_tokenizer
from pipeline.runtime.storage import resolve
from pipeline.runtime.tracking import MlflowConfig
from pipeline.steps.evaluator import (
    class_token_rows,
    class_words,
    evaluate_tokenizer,
    load_eval_data,
    picture,
)
from pipeline.steps.vocab import load_text_features
from spae.devices import resolve_device
from spae.metrics import OptionalMetrics, check_optional_metrics

METRICS_JSON = "metrics.json"
PICTURE = "reconstructions.png"


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class EvaluateJobConfig:
    tokenizer: str = (
        "outputs/runs/spae-mnist/tokenizer"  # folder, s3://, runs:/<id>/tokenizer, models:/<name>/<v>
    )
    source: SourceConfig = field(default_factory=lambda: SourceConfig(uri="mnist://test"))
    pools: str = ""  # pools table of ``source`` (semantic relevance); "" = skip relevance
    vocab: str = ""  # vocab table the pools refer to (its text features); needed with ``pools``
    limit: int = 1000  # images (or clips, for a video tokenizer) evaluated (0 = all)
    batch_size: int = 64
    fit: FitMode = FIT  # resize policy, see pipeline.inputs.images
    max_pixels: int = MAX_PIXELS  # larger images are left out (decode errors)
    class_words: Literal["auto", "none"] = "auto"  # auto: MNIST word + numeral, folders: source.label_words
    # "fid", "is", "lpips" (clips: per frame), "fvd" (clips): each needs its local weights file
    optional_metrics: tuple[str, ...] = ()
    # local state dicts: fid / is -> torchvision inception_v3, lpips -> vgg16, lpips_linear -> LPIPS
    # lin0..4, fvd -> an I3D network (spae.metrics)
    weights: dict[str, str] = field(default_factory=dict)
    picture_images: int = 8
    output: str = "outputs/eval"  # metrics.json + reconstructions.png (local or s3://)
    device: str = "auto"  # auto = cuda if available
    run_name: str = ""  # MLflow run; "" = "evaluate:<tokenizer>"
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        if not self.tokenizer:
            raise ValueError("tokenizer: empty; give a save_pretrained folder or an MLflow/S3 URI")
        if self.pools and not self.vocab:
            raise ValueError(
                "pools is set but vocab is empty: semantic relevance needs the vocab table's text features"
            )
        if self.limit < 0 or self.batch_size < 1 or self.picture_images < 0:
            raise ValueError("limit >= 0, batch_size >= 1 and picture_images >= 0 are required")


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, float]
    output: str
    seconds: float


def run_evaluate(cfg: EvaluateJobConfig, tokenizer: Any | None = None, log: Any = print) -> EvaluateResult:
    """Load the tokenizer and the data, compute the metrics, write ``metrics.json`` and the picture."""
    check_optional_metrics(cfg.optional_metrics, cfg.weights)  # fail before loading anything
    start = time.perf_counter()
    device = str(resolve_device(cfg.device))
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer, device)
    if "fvd" in cfg.optional_metrics and not tok.config.num_frames:
        raise ValueError(
            "optional_metrics: fvd is a video metric but this tokenizer takes images (num_frames = 0); "
            "use fid, is or lpips"
        )
    text_features = None
    if cfg.pools:
        text_features, card = load_text_features(cfg.vocab)
        if card.codebook_hash != tok.codebook.hash:
            raise ValueError(
                f"vocab {cfg.vocab} has codebook {card.codebook_hash[:12]} but the tokenizer was "
                f"trained on {tok.codebook.hash[:12]}: its token ids are not the vocab's rows"
            )
        PoolsManifest.read(cfg.pools).check_vocab(card, cfg.pools)
    decode = DecodeOptions.for_model(tok.config, fit=cfg.fit, max_pixels=cfg.max_pixels)
    data = load_eval_data(cfg.source, decode, cfg.pools, cfg.limit)
    words = class_words(data) if cfg.class_words == "auto" else None
    rows = class_token_rows(words, tok.vocabulary.words) if words else None
    if rows is not None and not any(rows):
        log("evaluate: none of the class words is in the vocabulary; label-word accuracy skipped")
        rows = None
    optional = OptionalMetrics(cfg.optional_metrics, cfg.weights, device) if cfg.optional_metrics else None
    if data.frames:
        log(f"evaluate: {len(data)} clips of {data.frames} frames; PSNR/SSIM per frame, over all frames")
    metrics = evaluate_tokenizer(tok, data, text_features, rows, cfg.batch_size, optional)
    out = resolve(cfg.output)
    out.join(METRICS_JSON).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if cfg.picture_images:
        with tempfile.TemporaryDirectory() as tmp:
            png = picture(tok, data, Path(tmp) / PICTURE, cfg.picture_images, title=cfg.source.uri)
            out.join(PICTURE).write_bytes(png.read_bytes())
    return EvaluateResult(metrics, out.uri, time.perf_counter() - start)


def format_metrics(metrics: dict[str, float]) -> str:
    """A compact multi-line summary (prefix metrics, then layer metrics); for clips, a first line says
    that PSNR / SSIM (and FID / IS / LPIPS) are over frames."""
    lines = []
    if "clips" in metrics:
        lines.append(
            f"{int(metrics['clips'])} clips of {int(metrics['frames_per_clip'])} frames: psnr, ssim, fid, is "
            "and lpips are per frame, averaged over all frames; fvd over clips"
        )
    for group in (
        "psnr",
        "ssim",
        "utilization",
        "perplexity",
        "distinct",
        "relevance",
        "label_word_accuracy",
        "concept_recall",
        "concept_precision",
        "key_words",
        "fid",
        "is",
        "lpips",
        "lpips_uncalibrated",
        "fvd",
    ):
        items = [(k.split("/", 1)[1], v) for k, v in sorted(metrics.items()) if k.startswith(group + "/")]
        if items:
            lines.append(f"{group:<20} " + "  ".join(f"{k}={v:.4g}" for k, v in items))
    groups = [k.removeprefix("group/").removesuffix("/images") for k in sorted(metrics) if _is_group_count(k)]
    for g in groups:  # the per-group breakdown (evaluator.group_metrics), one line a group
        items = [
            (k.removeprefix(f"group/{g}/"), v)
            for k, v in sorted(metrics.items())
            if k.startswith(f"group/{g}/")
        ]
        lines.append(f"group {g:<14} " + "  ".join(f"{k}={v:.4g}" for k, v in items))
    return "\n".join(lines)


def _is_group_count(key: str) -> bool:
    return key.startswith("group/") and key.endswith("/images")
