"""The evaluator shared by the evaluate job (``pipeline.steps.evaluate``) and the training job's rank 0
(``pipeline.steps.train``): a held-out set in memory (``EvalData``), pools joined per input shard, the metrics
(``evaluate_tokenizer``) and the reconstruction pictures.

Pools are joined to images per input shard: the pools job writes ``part-<shard_id>.parquet`` for
the shard of the same id, and its manifest records each shard's input digest, so a pools table
computed from a different listing (another ``shard_size`` or ``limit``) is refused, not mixed
(``pipeline.outputs.contracts.PoolsManifest``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from pipeline.inputs.images import DecodeOptions, decode_table
from pipeline.inputs.sources import (
    Shard,
    SourceConfig,
    group_of,
    image_words,
    list_shards,
    read_shard,
    source_kind,
)
from pipeline.inputs.sources import class_words as source_class_words
from pipeline.outputs.contracts import check_pools_cover
from pipeline.outputs.shards import part_name
from pipeline.runtime.storage import Location, resolve
from spae.concepts import ConceptTally
from spae.fonts import add_stand_in_legend, legible, words_font
from spae.metrics import (
    OptionalMetrics,
    TokenUsage,
    label_word_accuracy,
    psnr,
    semantic_relevance,
    ssim,
)
from spae.report import frame_strip
from spae.video import frames_as_images
from spae.viz import save_reconstruction_figure

# ----------------------------------------------------------------------------- pools <-> image shards


def read_pools_part(pools: Location, shard_id: str, columns: Sequence[str]) -> pa.Table:
    return pq.read_table(pools.join(part_name(shard_id)).path, columns=list(columns), filesystem=pools.fs)


def shard_pixels(shard: Shard, decode: DecodeOptions) -> dict[str, np.ndarray]:
    """One input shard read and decoded: ``image_id``, ``label`` (-1 none), ``pixels`` uint8 [n, H, W, 3]
    or clips [n, T, H, W, 3] (``decode.frames > 0``); rows that failed to read or decode are dropped."""
    decoded = decode_table(read_shard(shard), decode)
    ok = np.array([not e for e in decoded["error"]], dtype=bool)
    labels = np.array([-1 if v is None else int(v) for v in decoded["label"]], dtype=np.int64)
    return {
        "image_id": np.asarray(decoded["image_id"][ok], dtype=object),
        "label": labels[ok],
        "pixels": decoded["pixels"][ok],
    }


def check_source_kind(shard: Shard, decode: DecodeOptions, key: str) -> None:
    """Refuse a source that cannot suit the model: one that holds only images (``mnist://``) for a video
    model, only clips (``moving-mnist://``) for an image model (``SourceKind.holds``; folders and Parquet
    may hold either)."""
    video = decode.frames > 0
    holds = source_kind(shard.kind).holds
    if video and holds == "images":
        raise ValueError(
            f"{key}={shard.config.uri}: the model takes clips of {decode.frames} frames (num_frames > 0) but "
            "this source holds images; use a video source, e.g. moving-mnist://train"
        )
    if not video and holds == "clips":
        raise ValueError(
            f"{key}={shard.config.uri}: the model takes images (num_frames = 0) but this source holds clips; "
            "use an image source or a video model (e.g. preset=moving-mnist)"
        )


def join_on_image_id(left_ids: np.ndarray, right: pa.Table) -> np.ndarray:
    """Row of ``right`` for every id in ``left_ids`` (-1 where missing)."""
    index = {v: i for i, v in enumerate(right.column("image_id").to_pylist())}
    return np.array([index.get(v, -1) for v in left_ids], dtype=np.int64)


def list_matrix(column: pa.ChunkedArray | pa.Array, fill: float, dtype: Any) -> np.ndarray:
    """A list column -> ``[n, max_len]`` padded with ``fill``."""
    values = column.to_pylist()
    width = max((len(v) for v in values if v is not None), default=0)
    out = np.full((len(values), width), fill, dtype=dtype)
    for i, v in enumerate(values):
        if v:
            out[i, : len(v)] = v
    return out


# ----------------------------------------------------------------------------- evaluation data


@dataclass
class EvalData:
    """A held-out set in memory. images [n, 3, H, W] or clips [n, 3, T, H, W] in [0, 1]; labels [n]
    (-1 = none); pool columns (image_features [n, d], s_min / s_max [n]) are None without a pools table."""

    images: Tensor
    labels: Tensor
    image_ids: list[str]
    kind: str  # "mnist" | "folder" | "parquet"
    classes: tuple[str, ...] = ()
    label_words: str = "names"  # SourceConfig.label_words: which words name a folder's classes
    groups: tuple[str, ...] = ()  # per image, its group (SourceKind.group: mnist-shifted's shift); () = none
    image_features: Tensor | None = None
    s_min: Tensor | None = None
    s_max: Tensor | None = None
    words: list[tuple[str, ...]] | None = None  # each image's true words (scenes://), key words first

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def frames(self) -> int:
        """Frames per clip; 0 for images."""
        return int(self.images.shape[2]) if self.images.dim() == 5 else 0


def load_eval_data(
    source: SourceConfig,
    decode: DecodeOptions,
    pools: str = "",
    limit: int = 0,
) -> EvalData:
    """Read and decode (at most ``limit``) images of ``source``, or clips (``decode.frames > 0``,
    ``DecodeOptions.for_model``); with ``pools``, attach their features."""
    shards = list_shards(source)
    if shards:
        check_source_kind(shards[0], decode, "source")
    pools_loc = resolve(pools) if pools else None
    if pools_loc is not None:
        check_pools_cover(shards, pools_loc)
    ids: list[str] = []
    labels, pixels, feats, smin, smax = [], [], [], [], []
    n = 0
    for shard in shards:
        part = shard_pixels(shard, decode)
        keep = np.ones(len(part["image_id"]), dtype=bool)
        if pools_loc is not None:
            table = read_pools_part(
                pools_loc, shard.shard_id, ["image_id", "image_feature", "s_min", "s_max"]
            )
            rows = join_on_image_id(part["image_id"], table)
            keep = rows >= 0  # images without a pool row (errors in the pools job) are left out
            rows = rows[keep]
            feats.append(list_matrix(table.column("image_feature").take(rows), 0.0, np.float32))
            smin.append(table.column("s_min").take(rows).to_numpy().astype(np.float32))
            smax.append(table.column("s_max").take(rows).to_numpy().astype(np.float32))
        ids += list(part["image_id"][keep])
        labels.append(part["label"][keep])
        pixels.append(part["pixels"][keep])
        n += int(keep.sum())
        if limit and n >= limit:
            break
    if n == 0:
        raise ValueError(f"{source.uri}: no decodable images (with pools) to evaluate on")
    take = min(n, limit) if limit else n
    # uint8 [n, (T,) H, W, 3] -> [n, 3, (T,) H, W] in [0, 1]
    images = torch.from_numpy(np.concatenate(pixels)[:take]).movedim(-1, 1).float().div(255.0)
    data = EvalData(
        images=images.contiguous(),
        labels=torch.from_numpy(np.concatenate(labels)[:take]),
        image_ids=ids[:take],
        kind=shards[0].kind,
        classes=tuple(shards[0].classes),
        label_words=source.label_words,
        words=image_words(source, ids[:take]),
        groups=image_groups(shards[0].kind, ids[:take]),
    )
    if pools_loc is not None:
        data.image_features = torch.from_numpy(np.concatenate(feats)[:take])
        data.s_min = torch.from_numpy(np.concatenate(smin)[:take])
        data.s_max = torch.from_numpy(np.concatenate(smax)[:take])
    return data


def image_groups(kind: str, image_ids: Sequence[str]) -> tuple[str, ...]:
    """Each image's group from its id (``pipeline.inputs.sources.group_of``); () when the source has none."""
    groups = tuple(group_of(kind, i) for i in image_ids)
    return groups if any(groups) else ()


def class_words(data: EvalData) -> list[list[str]] | None:
    """The words that name each class (``pipeline.inputs.sources.class_words``): MNIST digits' word and
    numeral
    (Moving MNIST: the clip's first digit); folder class names, or with ``source.label_words=mnist`` a
    digit folder's word and numeral; else None."""
    return source_class_words(data.kind, data.classes, data.label_words)


def class_token_rows(words_per_class: Sequence[Sequence[str]], vocabulary: Sequence[str]) -> list[set[int]]:
    """Codebook rows of each class's words (case-insensitive match of the display text)."""
    rows_of: dict[str, set[int]] = {}
    for row, word in enumerate(vocabulary):
        rows_of.setdefault(word.lower(), set()).add(row)
    return [set().union(*(rows_of.get(w.lower(), set()) for w in words)) for words in words_per_class]


# ----------------------------------------------------------------------------- the evaluator


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer: Any,
    data: EvalData,
    text_features: Tensor | None = None,
    class_rows: Sequence[set[int]] | None = None,
    batch_size: int = 64,
    optional: OptionalMetrics | None = None,
) -> dict[str, float]:
    """Every metric of the module docstring for ``tokenizer`` (an ``SPAETokenizer``) on ``data``.

    Keys: ``psnr/p<l>``, ``ssim/p<l>`` (covering prefixes), ``utilization/l<l>``, ``perplexity/l<l>``,
    ``distinct/l<l>``, ``relevance/l<l>`` (with pools and ``text_features`` [v, d]),
    ``label_word_accuracy/l1`` (with labels and ``class_rows``), ``concept_recall/l<l>``,
    ``concept_precision/l<l>`` and their prefix forms ``/p<l>``, ``key_words/p<l>`` (with ``data.words``:
    ``spae.concepts``), ``images``; with groups
    (``data.groups``), the same PSNR, SSIM and label-word accuracy within each group ``g`` as
    ``group/<g>/<key>`` and ``group/<g>/images`` (``group_metrics``); with ``optional``
    (``spae.metrics.OptionalMetrics``): ``fid/p<l>``, ``is/p<l>``, ``lpips/p<l>`` (or
    ``lpips_uncalibrated/p<l>``) for the deepest covering prefix ``l``, over the whole set.

    Clips (``data.images`` [n, 3, T, H, W]): PSNR and SSIM are computed per frame and averaged over
    all ``n * T`` frames; ``optional`` receives the clips as they are (``update(real, fake)`` with
    [b, 3, T, H, W]); ``images`` is replaced by ``clips`` (n) and ``frames_per_clip`` (T).
    """
    spec = tokenizer.pyramid
    model = tokenizer.model
    device = tokenizer.device
    vocab_size = len(tokenizer.vocabulary)
    prefixes = tuple(spec.covering_layers)
    usage = [TokenUsage(vocab_size) for _ in range(spec.num_layers)]
    sums: dict[str, float] = {}
    relevance = data.image_features is not None and text_features is not None
    labelled = class_rows is not None and bool((data.labels >= 0).any())
    top_ids, top_labels = [], []
    concepts = ConceptTally(tokenizer.vocabulary.words, spec.num_layers) if data.words is not None else None
    per_image: dict[str, list[Tensor]] = {}  # psnr / ssim per image [b], kept for the per-group means

    def add(key: str, values: Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(values.double().sum())
        if data.groups and key.startswith(("psnr/", "ssim/")):
            per_image.setdefault(key, []).append(values.double().cpu())

    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(data), batch_size):
            images = data.images[start : start + batch_size].to(device)
            out = model(images, prefixes)
            for l in prefixes:
                recon = ((out.reconstructions[l].float() + 1.0) / 2.0).clamp(0.0, 1.0)  # as decode_latent
                add(f"psnr/p{l}", per_frame(psnr, recon, images))
                add(f"ssim/p{l}", per_frame(ssim, recon, images))
                if optional is not None and l == prefixes[-1]:
                    optional.update(images, recon)
            for l, ids in enumerate(out.quant.ids, start=1):
                usage[l - 1].update(ids)
                if relevance:
                    sl = slice(start, start + images.shape[0])
                    rel = semantic_relevance(
                        ids.reshape(ids.shape[0], -1).cpu(),
                        data.image_features[sl],
                        text_features,
                        data.s_min[sl],
                        data.s_max[sl],
                    )
                    add(f"relevance/l{l}", rel)
            if concepts is not None:
                concepts.update(out.quant.ids, data.words[start : start + images.shape[0]])
            if labelled:
                # the image's layer-1 word: the token itself, or the most frequent one when layer 1 has
                # several (a one-layer VQ baseline)
                top_ids.append(out.quant.ids[0].flatten(1).mode(dim=1).values.cpu())
                top_labels.append(data.labels[start : start + images.shape[0]])
    finally:
        model.train(was_training)
    n = len(data)
    metrics = {key: total / n for key, total in sums.items()}
    for l, u in enumerate(usage, start=1):
        stats = u.compute()
        metrics[f"utilization/l{l}"] = stats.utilization
        metrics[f"perplexity/l{l}"] = stats.perplexity
        metrics[f"distinct/l{l}"] = float(stats.distinct)
    ids = labels = None
    if labelled:
        ids, labels = torch.cat(top_ids), torch.cat(top_labels)
        known = labels >= 0
        metrics["label_word_accuracy/l1"] = label_word_accuracy(ids[known], labels[known], class_rows)
    if concepts is not None:
        metrics.update(concepts.compute())
    if data.groups:
        values = {key: torch.cat(v) for key, v in per_image.items()}
        metrics.update(group_metrics(data.groups, values, ids, labels, class_rows))
    if optional is not None:
        metrics.update({f"{name}/p{prefixes[-1]}": value for name, value in optional.compute().items()})
    if data.frames:
        metrics["clips"], metrics["frames_per_clip"] = float(n), float(data.frames)
    else:
        metrics["images"] = float(n)
    return metrics


def group_metrics(
    groups: Sequence[str],
    per_image: dict[str, Tensor],
    top_ids: Tensor | None = None,
    labels: Tensor | None = None,
    class_rows: Sequence[set[int]] | None = None,
) -> dict[str, float]:
    """Per group ``g`` (in sorted order) of ``groups`` (one per image, "" = in none): the mean of each
    per-image value ``per_image[key]`` [n] as ``group/<g>/<key>``, ``group/<g>/images``, and with
    ``top_ids`` [n] (layer-1 token), ``labels`` [n] (-1 = none) and ``class_rows``,
    ``group/<g>/label_word_accuracy/l1`` over the group's labelled images."""
    names = np.asarray(groups, dtype=object)
    out: dict[str, float] = {}
    for g in sorted(set(groups) - {""}):
        mask = torch.from_numpy(names == g)  # [n] bool
        out[f"group/{g}/images"] = float(mask.sum())
        for key, values in per_image.items():
            out[f"group/{g}/{key}"] = float(values[mask].mean())
        if top_ids is not None and labels is not None and class_rows is not None:
            hit = mask & (labels >= 0)
            if hit.any():
                accuracy = label_word_accuracy(top_ids[hit], labels[hit], class_rows)
                out[f"group/{g}/label_word_accuracy/l1"] = accuracy
    return out


def per_frame(metric: Any, x: Tensor, y: Tensor) -> Tensor:
    """An image metric ``[b, c, H, W] x2 -> [b]`` on images, or on clips ``[b, c, T, H, W]`` as the mean
    over each clip's frames (``[b]``): summed over clips and divided by their number, it is the mean
    over all frames."""
    if x.dim() == 4:
        return metric(x, y)
    b, t = x.shape[0], x.shape[2]
    return metric(frames_as_images(x), frames_as_images(y)).view(b, t).mean(1)  # [b * T] -> [b]


@torch.no_grad()
def picture(tokenizer: Any, data: EvalData, path: str | Path, n: int = 8, title: str = "") -> Path:
    """The reconstruction picture (``spae.viz``) of the first ``n`` images of ``data``; for clips,
    ``clip_picture`` of the first ``min(n, 4)`` clips."""
    if data.frames:
        return clip_picture(tokenizer, data, path, min(n, 4), title)
    images = data.images[:n].to(tokenizer.device)
    tokens = tokenizer.encode(images)
    recons = {l: tokenizer.decode(tokens, up_to_layer=l).cpu() for l in tokenizer.pyramid.covering_layers}
    words = [w[0] for w in tokens.words(1)]
    counts = {l: tokenizer.pyramid.cumulative_counts[l - 1] for l in recons}
    return save_reconstruction_figure(path, images.cpu(), recons, words, counts, title)


@torch.no_grad()
def clip_picture(
    tokenizer: Any, data: EvalData, path: str | Path, n: int = 4, title: str = "", max_frames: int = 8
) -> Path:
    """The first ``n`` clips of ``data``, each as frame strips (at most ``max_frames`` frames spread over
    the clip, ``spae.report.frame_strip``): the source (with its label and layer-1 word), then the
    decode of every covering prefix with its token count and PSNR over frames. One PNG at ``path``."""
    from matplotlib.figure import Figure

    clips = data.images[:n].to(tokenizer.device)  # [k, 3, T, H, W]
    tokens = tokenizer.encode(clips)
    spec = tokenizer.pyramid
    prefixes = spec.covering_layers
    decodes = {l: tokenizer.decode(tokens, up_to_layer=l).float().clamp(0, 1) for l in prefixes}
    words = [w[0] for w in tokens.words(1)]
    rows = []  # (strip [H, k * W, 3] uint8, caption)
    for i in range(clips.shape[0]):
        label = int(data.labels[i])
        head = data.image_ids[i] + (f" (label {label})" if label >= 0 else "")
        caption = f"{head}: source, layer 1 = {legible(words[i])!r}"
        rows.append((frame_strip(clips[i].cpu(), max_frames), caption))
        for l in prefixes:
            db = float(per_frame(psnr, decodes[l][i : i + 1], clips[i : i + 1]).mean())
            caption = f"layers 1-{l} ({spec.cumulative_counts[l - 1]} tokens), {db:.1f} dB over frames"
            rows.append((frame_strip(decodes[l][i].cpu(), max_frames), caption))
    strip_h, strip_w = rows[0][0].shape[:2]
    width = min(16.0, max(6.0, strip_w / 24))
    with words_font():
        fig = Figure(figsize=(width, len(rows) * (width * strip_h / strip_w + 0.3) + (0.4 if title else 0.0)))
        axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
        for ax, (strip, caption) in zip(axes, rows, strict=True):
            ax.imshow(strip, interpolation="nearest")
            ax.set_title(caption, fontsize=8, loc="left")
            ax.set_axis_off()
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout(rect=(0, 0.02, 1, 1) if add_stand_in_legend(fig, words) else None)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    return out
