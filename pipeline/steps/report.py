"""The report of a corpus (``spae report``): an HTML page + PNG of its token pyramids (the paper's Fig. 4).

Per image: the original, layers 1-4 as grids of words (row-major, as in the text), each cell shaded
darker for a higher semantic score of the token for that image (from the pools table, when given),
else for a more frequent token in the corpus layer, then decodes from every covering prefix present
with their PSNR. Writes ``<output>/index.html`` (self-contained) and ``<output>/pyramids.png``; for
clips also two animated GIFs per clip next to the page. The corpus manifest, the tokenizer and the
pools are read through ``pipeline.outputs.contracts``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.inputs.images import DecodeOptions, decode_table, to_float
from pipeline.inputs.sources import image_words, list_shards, read_shard
from pipeline.inputs.video import clip_gif
from pipeline.outputs.contracts import CorpusManifest, load_tokenizer
from pipeline.outputs.corpus import part_files, safe_name, token_pyramid, tokens_column, words_column
from pipeline.outputs.shards import read_output
from pipeline.runtime.storage import resolve
from pipeline.steps.tokenize import token_counts
from spae.metrics import psnr
from spae.report import (
    SHADE_FREQUENCY,
    SHADE_SEMANTIC,
    Animation,
    PyramidPanel,
    Reconstruction,
    figure_png,
    frame_strip,
    frequency_shade,
    layer_grid,
    report_html,
    score_shade,
)
from spae.video import clips_to_uint8, frames_as_images

SHOWN_LAYERS = 4  # as in the paper's Fig. 4: the first four layers as word grids
STRIP_FRAMES = 8  # frames shown in a clip's frame strip (spread evenly over the clip)
GIF_MIN_SIDE = 128  # gif_scale=0: the smallest integer scale giving at least this many pixels


@dataclass(frozen=True)
class ReportConfig:
    corpus: str = ""  # a corpus folder (spae tokenize output), local or s3://
    image_ids: tuple[str, ...] = ()  # images to show; () = the first num_images rows
    num_images: int = 4
    tokenizer: str = ""  # "" = the tokenizer named in the corpus manifest
    pools: str = ""  # optional pools table (spae pools) for semantic-score shading
    output: str = "report"  # folder for index.html and pyramids.png (local or s3://)
    title: str = ""
    gif_scale: int = 0  # clips: GIF pixel scale; 0 = enough to reach GIF_MIN_SIDE pixels
    fps: float = 8.0  # clips: GIF frame rate

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.gif_scale < 0 or self.fps <= 0:
            raise ValueError(f"gif_scale ({self.gif_scale}) must be >= 0 and fps ({self.fps}) > 0")


@dataclass(frozen=True)
class ReportResult:
    html: str  # URI of index.html
    png: str  # URI of pyramids.png
    image_ids: list[str]
    shading: str
    animations: tuple[str, ...] = ()  # clips: URIs of the GIFs written next to index.html


def _pick_rows(cfg: ReportConfig) -> tuple[Any, list[str]]:
    """The wanted corpus rows and, per row, the shard id (= the input shard) it came from."""
    corpus = resolve(cfg.corpus)
    parts = part_files(corpus)
    if not parts:
        raise FileNotFoundError(f"{corpus.uri}: no corpus shards (part-*.parquet) found")
    wanted = list(cfg.image_ids)
    wanted_set = set(wanted)
    found: dict[str, tuple[Any, str]] = {}
    for part in parts:
        table = pq.read_table(part.path, filesystem=part.fs)
        shard_id = part.name[len("part-") : -len(".parquet")]
        ids = table.column("image_id").to_pylist()
        for i, iid in enumerate(ids):
            if (iid in wanted_set if wanted else len(found) < cfg.num_images) and iid not in found:
                found[iid] = (table.slice(i, 1), shard_id)
        if (wanted and all(w in found for w in wanted)) or (not wanted and len(found) >= cfg.num_images):
            break
    order = wanted or list(found)
    missing = [w for w in order if w not in found]
    if missing:
        raise ValueError(f"image ids not in {corpus.uri}: {', '.join(missing[:10])}")
    return pa.concat_tables([found[i][0] for i in order]), [found[i][1] for i in order]


def _originals(
    manifest: CorpusManifest,
    image_ids: list[str],
    shard_ids: list[str],
    decode: DecodeOptions,
) -> np.ndarray:
    """The source images of the rows, decoded as the tokenize job did (``decode``): uint8 [k, H, W, 3]
    (clips: [k, T, S, S, 3])."""
    if manifest.source is None:
        raise ValueError(f"{manifest.uri}: no config.source recorded; the originals cannot be read")
    shards = {s.shard_id: s for s in list_shards(manifest.source)}
    wanted = set(image_ids)
    pixels: dict[str, np.ndarray] = {}
    for shard_id in dict.fromkeys(shard_ids):
        raw = read_shard(shards[shard_id])
        keep = [i for i, iid in enumerate(raw.column("image_id").to_pylist()) if iid in wanted]
        decoded = decode_table(raw.take(keep), decode)  # the shown rows only
        for iid, px in zip(decoded["image_id"], decoded["pixels"], strict=True):
            pixels[iid] = px
    return np.stack([pixels[i] for i in image_ids])


def _pool_scores(pools: str, image_ids: list[str]) -> dict[str, dict[int, float]]:
    """image_id -> {token_id: eq. 6 score} from a pools table."""
    table = read_output(pools, columns=["image_id", "topk_ids", "topk_scores"])
    want = set(image_ids)
    table = table.filter(pc.is_in(table["image_id"], value_set=pa.array(sorted(want), pa.string())))
    out = {}
    for row in table.to_pylist():  # the shown rows only
        out[row["image_id"]] = dict(zip(row["topk_ids"], row["topk_scores"], strict=True))
    missing = want - set(out)
    if missing:
        raise ValueError(f"pools table {pools} has no rows for {', '.join(sorted(missing)[:10])}")
    return out


def run_report(cfg: ReportConfig) -> ReportResult:
    if not cfg.corpus:
        raise ValueError("corpus: required (a corpus folder written by spae tokenize)")
    manifest = CorpusManifest.read(cfg.corpus)
    tok_uri = cfg.tokenizer or manifest.tokenizer_uri
    tokenizer = load_tokenizer(tok_uri)
    manifest.check_tokenizer(tokenizer, tok_uri, cfg.corpus)
    spec = tokenizer.pyramid
    layers = manifest.layers
    table, shard_ids = _pick_rows(cfg)
    image_ids = table.column("image_id").to_pylist()
    # decoded as the tokenize job did
    decode = DecodeOptions.for_model(tokenizer.config, fit=manifest.fit, max_pixels=manifest.max_pixels)
    frames, side = decode.frames, decode.size
    try:
        originals = _originals(manifest, image_ids, shard_ids, decode)
        missing_source = ""
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # input moved or unreachable (StorageError)
        originals = np.full(decode.pixels_shape(len(image_ids)), 128, np.uint8)  # grey placeholders
        missing_source = f"originals unavailable ({type(e).__name__}: {e}); grey placeholders, no PSNR"
    images = torch.from_numpy(to_float(originals))  # [k, 3, H, W] or clips [k, 3, T, H, W]
    if cfg.pools:
        scores, shading = _pool_scores(cfg.pools, image_ids), SHADE_SEMANTIC
    else:
        counts = token_counts(resolve(cfg.corpus), layers, len(tokenizer.vocabulary))
        scores, shading = {}, SHADE_FREQUENCY
    pyramid = token_pyramid(table, tokenizer, layers)
    prefixes = [c for c in spec.covering_layers if all(l in layers for l in range(1, c + 1))]
    decodes = {c: tokenizer.decode(pyramid, up_to_layer=c) for c in prefixes}  # like images, each
    panels = []
    labels = table.column("label").to_pylist()
    # sources whose rows carry several words (scenes://): the image's words name it, key words first
    words_of = image_words(manifest.source, image_ids) if manifest.source is not None else None
    for i, iid in enumerate(image_ids):
        grids = []
        for l in [l for l in layers if l <= SHOWN_LAYERS]:
            ids = table.column(tokens_column(l))[i].as_py()
            words = table.column(words_column(l))[i].as_py()
            shade = score_shade(ids, scores[iid]) if cfg.pools else frequency_shade(ids, _as_map(counts[l]))
            grids.append(layer_grid(l, words, spec.layer_size(l), shade, shading))
        recons = tuple(
            Reconstruction(
                prefix=c,
                tokens=spec.cumulative_counts[c - 1],
                image=_picture(decodes[c][i], frames),
                psnr=None if missing_source else _psnr(psnr, decodes[c][i : i + 1], images[i : i + 1]),
            )
            for c in prefixes
        )
        label = None if labels[i] is None else str(labels[i])
        label = " ".join(words_of[i]) if words_of is not None else label
        original = frame_strip(originals[i], STRIP_FRAMES) if frames else originals[i]
        panels.append(PyramidPanel(iid, original, tuple(grids), recons, label))
    title = cfg.title or f"Token pyramids of {manifest.output}"
    out = resolve(cfg.output)
    gifs: list[str] = []
    if frames:  # the clips as GIFs next to the page, shown by it
        panels, gifs = _write_gifs(cfg, out, panels, originals, decodes, missing_source, side)
    png = out.join("pyramids.png")
    png.write_bytes(figure_png(panels, title=title))
    card = manifest.codebook_card
    meta = {
        "corpus": manifest.output,
        "input": manifest.input_uri,
        "tokenizer": f"{manifest.tokenizer_uri} (fingerprint {manifest.tokenizer_fingerprint[:12]})",
        "codebook": f"{card.get('source', '')} ({card.get('size', '?')} tokens, {card.get('hash', '')[:12]})",
        "rows": f"{manifest.rows_written} written, {manifest.errors} errors",
        "shading": shading
        + (f" (pools {cfg.pools})" if cfg.pools else " of each token in its layer, corpus-wide"),
    }
    if frames:
        meta["clips"] = (
            f"{frames} frames of {side}x{side}; strips show {min(frames, STRIP_FRAMES)} frames, "
            "PSNR is averaged over all frames; the GIFs play the whole clip"
        )
    if missing_source:
        meta["originals"] = missing_source
    html = out.join("index.html")
    html.write_text(report_html(panels, title=title, meta=meta, figure_href="pyramids.png"))
    return ReportResult(
        html=html.uri, png=png.uri, image_ids=image_ids, shading=shading, animations=tuple(gifs)
    )


def _picture(decoded: Any, frames: int) -> np.ndarray:
    """A decode [3, H, W] -> [H, W, 3] float; a clip [3, T, H, W] -> its frame strip (uint8)."""
    return frame_strip(decoded, STRIP_FRAMES) if frames else decoded.permute(1, 2, 0).numpy()


def _psnr(psnr: Any, decoded: Any, source: Any) -> float:
    """PSNR in dB (capped at 100 for identical pictures); for clips the mean over frames."""
    if decoded.dim() == 5:  # [1, 3, T, H, W] -> [T, 3, H, W]
        decoded, source = frames_as_images(decoded), frames_as_images(source)
    return float(psnr(decoded, source).clamp(max=100.0).mean())


def _write_gifs(
    cfg: ReportConfig, out: Any, panels: list, originals: np.ndarray, decodes: dict, missing: str, side: int
) -> tuple[list, list[str]]:
    """Per clip ``<id>-source.gif`` (unless the source is missing) and ``<id>.gif`` (the deepest
    prefix's decode) in ``out``; the panels get them as animations."""
    scale = cfg.gif_scale or max(1, -(-GIF_MIN_SIDE // side))
    deepest = max(decodes, default=None)
    decoded = clips_to_uint8(decodes[deepest]) if deepest else None  # [k, T, H, W, 3]
    done, uris = [], []
    for i, panel in enumerate(panels):
        name, shown = safe_name(panel.image_id), []
        if not missing:
            uri = out.join(f"{name}-source.gif")
            uri.write_bytes(clip_gif(originals[i], fps=cfg.fps, scale=scale))
            shown.append(Animation(f"{name}-source.gif", "source (plays)"))
            uris.append(uri.uri)
        if decoded is not None:
            uri = out.join(f"{name}.gif")
            uri.write_bytes(clip_gif(decoded[i], fps=cfg.fps, scale=scale))
            shown.append(Animation(f"{name}.gif", f"decoded, layers 1-{deepest} (plays)"))
            uris.append(uri.uri)
        done.append(replace(panel, animations=tuple(shown)))
    return done, uris


def _as_map(counts: np.ndarray) -> dict[int, int]:
    nz = np.flatnonzero(counts)
    return dict(zip(nz.tolist(), counts[nz].tolist(), strict=True))
