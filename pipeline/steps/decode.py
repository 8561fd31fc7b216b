"""Decoding corpus rows or free text (e.g. an LLM's answer) to images (``spae decode``).

Rows are read from a corpus (``pipeline.outputs.corpus``) and decoded from their token ids; text is parsed
tolerantly (``SPAETokenizer.from_text``: unknown words map to the nearest vocabulary word, short or long
layers are padded or cut, missing layers are filled from coarser ones) and every fix is reported. Writes
``<name>.png`` per image (clips: an animated GIF or an H.264 MP4) and ``decode_report.json`` under the
output. The corpus manifest and the tokenizer are read through ``pipeline.outputs.contracts``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.inputs.video import clip_gif, clip_mp4
from pipeline.outputs.contracts import CorpusManifest, load_tokenizer
from pipeline.outputs.corpus import deepest_decodable, read_corpus, safe_name, select_rows, token_pyramid
from pipeline.runtime.storage import resolve
from spae.report import image_png
from spae.video import clips_to_uint8


@dataclass(frozen=True)
class DecodeConfig:
    corpus: str = ""  # a corpus folder (spae tokenize output), local or s3://
    image_ids: tuple[str, ...] = ()  # corpus rows by image id
    rows: tuple[int, ...] = ()  # corpus rows by index (in shard order)
    text: str | None = None  # free text of one image: "[L1] w [L2] w w w w ..." ("" decodes too)
    text_file: str = ""  # one image per non-empty line; .jsonl: the "text" field of each line
    tokenizer: str = ""  # "" = the tokenizer named in the corpus manifest
    output: str = "decoded"  # folder for <name>.png and decode_report.json (local or s3://)
    up_to_layer: int = 0  # decode the prefix 1..l; 0 = the deepest covering prefix
    scale: int = 1  # PNG upscaling (nearest neighbour), for small images
    video_format: str = "gif"  # clips (video tokenizer): "gif" or "mp4" (PyAV)
    fps: int = 8  # clips: frames per second of the written animation

    def __post_init__(self) -> None:
        if self.up_to_layer < 0 or self.scale < 1:
            raise ValueError(f"up_to_layer ({self.up_to_layer}) must be >= 0 and scale ({self.scale}) >= 1")
        if self.video_format not in ("gif", "mp4") or self.fps < 1:
            raise ValueError(f"video_format={self.video_format!r} must be gif or mp4, fps={self.fps} >= 1")


@dataclass
class DecodedImage:
    name: str  # file stem
    origin: str  # "corpus:<image_id>" or "text:<i>"
    prefix: int  # layers 1..prefix decoded
    png: str  # URI written (a .png image; for clips the .gif / .mp4 animation)
    report: dict[str, Any] = field(default_factory=dict)  # ParseReport.to_dict() (text) or {}


def read_texts(cfg: DecodeConfig) -> list[str]:
    texts = [cfg.text] if cfg.text is not None else []
    if cfg.text_file:
        data = resolve(cfg.text_file).read_text()
        if cfg.text_file.endswith(".jsonl"):
            texts += [json.loads(line)["text"] for line in data.splitlines() if line.strip()]
        else:
            texts += [line for line in data.splitlines() if line.strip()]
    return texts


def run_decode(cfg: DecodeConfig) -> list[DecodedImage]:
    """Decode what ``cfg`` names; writes PNGs and ``decode_report.json`` under ``cfg.output``."""
    texts = read_texts(cfg)
    want_rows = bool(cfg.image_ids or cfg.rows)
    if not texts and not want_rows:
        raise ValueError("nothing to decode: give corpus= with image_ids=/rows=, or text= / text_file=")
    if want_rows and not cfg.corpus:
        raise ValueError("image_ids= / rows= need corpus= (a corpus folder)")
    manifest = CorpusManifest.read(cfg.corpus) if cfg.corpus else None
    tok_uri = cfg.tokenizer or (manifest.tokenizer_uri if manifest else "")
    if not tok_uri:
        raise ValueError(
            "tokenizer: required for free text without corpus= (a save_pretrained folder or URI)"
        )
    tokenizer = load_tokenizer(tok_uri)
    if manifest:
        manifest.check_tokenizer(tokenizer, tok_uri, cfg.corpus)
    spec = tokenizer.pyramid
    full = cfg.up_to_layer or spec.num_layers
    if full not in spec.covering_layers:
        raise ValueError(
            f"up_to_layer={full} is not a decodable prefix; allowed: {list(spec.covering_layers)}"
        )
    out = resolve(cfg.output)
    done: list[DecodedImage] = []

    def write(name: str, origin: str, image: Any, prefix: int, report: dict) -> None:
        if image.dim() == 4:  # a clip [3, T, H, W]
            frames = clips_to_uint8(image[None])[0]  # [T, H, W, 3]
            frames = frames.repeat(cfg.scale, axis=1).repeat(cfg.scale, axis=2)
            data = (
                clip_gif(frames, fps=cfg.fps) if cfg.video_format == "gif" else clip_mp4(frames, fps=cfg.fps)
            )
            target = out.join(f"{name}.{cfg.video_format}")
        else:
            data, target = image_png(image, scale=cfg.scale), out.join(f"{name}.png")
        target.write_bytes(data)
        done.append(DecodedImage(name, origin, prefix, target.uri, report))

    if want_rows:
        table = select_rows(read_corpus(cfg.corpus), list(cfg.image_ids), list(cfg.rows))
        layers = manifest.layers
        prefix = cfg.up_to_layer or deepest_decodable(layers, spec.covering_layers)
        if prefix is not None and all(l in layers for l in range(1, prefix + 1)):
            images = tokenizer.decode(token_pyramid(table, tokenizer, layers), up_to_layer=prefix)
            reports = [{} for _ in range(table.num_rows)]
        else:  # the corpus lacks deep layers: fill them from coarser ones, as for free text
            prefix = full
            pyramid, parsed = tokenizer.from_text(table.column("text").to_pylist(), layers=range(1, full + 1))
            images = tokenizer.decode(pyramid, up_to_layer=prefix)
            reports = [r.to_dict() for r in parsed]
        for iid, image, report in zip(table.column("image_id").to_pylist(), images, reports, strict=True):
            write(safe_name(iid), f"corpus:{iid}", image, prefix, report)
    if texts:
        pyramid, parsed = tokenizer.from_text(texts, layers=range(1, full + 1))
        images = tokenizer.decode(pyramid, up_to_layer=full)
        for i, (image, report) in enumerate(zip(images, parsed, strict=True)):
            write(f"text-{i:03d}", f"text:{i}", image, full, report.to_dict())
    summary = {
        "tokenizer": tok_uri,
        "fingerprint": tokenizer.fingerprint(),
        "images": [d.__dict__ for d in done],
    }
    out.join("decode_report.json").write_text(json.dumps(summary, indent=2))
    return done
