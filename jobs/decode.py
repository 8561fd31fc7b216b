"""``spae decode``: corpus rows or free text (e.g. an LLM's answer) -> PNG images + a parse report.

A video tokenizer (``num_frames > 0``) decodes each row or text to a clip, written as an animated GIF
(``video_format=gif``, default) or an H.264 MP4 (``video_format=mp4``, needs PyAV).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from jobs.common import job_parser, parse_job_config, run_main

SUMMARY = "corpus rows or free text (an LLM's answer) -> PNG images, with a report of unknown words"

EPILOG = """\
examples:
  spae decode corpus=outputs/corpus image_ids=[mnist-test-000007] output=outputs/decoded
  spae decode corpus=s3://bucket/corpus rows=[0,1,2] output=outputs/decoded
  spae decode --tokenizer outputs/tokenizer --text "[L1] seven [L2] seven 7 digit seven" --output out/
  spae decode --tokenizer outputs/tokenizer --text-file answer.txt --output out/

Text is parsed tolerantly (SPAETokenizer.from_text): unknown words map to the nearest vocabulary
word, short or long layers are padded or cut, missing layers are filled from coarser ones; every fix
is printed (counts and the first few unknown words) and written to <output>/decode_report.json. Like
the API, --text "" (an empty answer) decodes: to the image of row 0 everywhere, reported as holding no
layer. A --text-file holds one image per non-empty line (a .jsonl file: the "text" field of each line).
The tokenizer defaults to the corpus's own.
"""


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


CONFIG_CLASS = DecodeConfig


@dataclass
class DecodedImage:
    name: str  # file stem
    origin: str  # "corpus:<image_id>" or "text:<i>"
    prefix: int  # layers 1..prefix decoded
    png: str  # URI written (a .png image; for clips the .gif / .mp4 animation)
    report: dict[str, Any] = field(default_factory=dict)  # ParseReport.to_dict() (text) or {}


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


def read_texts(cfg: DecodeConfig) -> list[str]:
    texts = [cfg.text] if cfg.text is not None else []
    if cfg.text_file:
        from pipeline.storage import resolve

        data = resolve(cfg.text_file).read_text()
        if cfg.text_file.endswith(".jsonl"):
            texts += [json.loads(line)["text"] for line in data.splitlines() if line.strip()]
        else:
            texts += [line for line in data.splitlines() if line.strip()]
    return texts


def run_decode(cfg: DecodeConfig) -> list[DecodedImage]:
    """Decode what ``cfg`` names; writes PNGs and ``decode_report.json`` under ``cfg.output``."""
    from pipeline.contracts import CorpusManifest, load_tokenizer
    from pipeline.corpus import deepest_decodable, read_corpus, select_rows, token_pyramid
    from pipeline.storage import resolve
    from spae.report import image_png

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
            from pipeline.video import clip_gif, clip_mp4
            from spae.video import clips_to_uint8

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
            write(_safe_name(iid), f"corpus:{iid}", image, prefix, report)
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


def describe(item: DecodedImage) -> str:
    """One line per image, then one per kind of fix; bounded however long the text (the report is
    ``ParseReport.to_dict``: counts plus the first few unknown words)."""
    line = f"{item.png}  ({item.origin}, layers 1-{item.prefix})"
    r = item.report
    if not r:
        return line
    notes = []
    if r.get("unknown_count"):
        shown = ", ".join(f"{a!r} -> {b!r}" for a, b in r["unknown_words"])
        more = r["unknown_distinct"] - len(r["unknown_words"])
        notes.append(
            f"unknown words: {r['unknown_count']} ({r['unknown_distinct']} distinct): {shown}"
            + (f", ... and {more} more" if more > 0 else "")
        )
    if r.get("length_fixes"):
        notes.append(
            "length fixes: "
            + ", ".join(f"L{l} {got}->{want}" for l, (got, want) in r["length_fixes"].items())
        )
    missing = r.get("missing_layers", [])
    if missing and len(missing) == item.prefix:
        notes.append(f"no layer in the text: layers L1-L{item.prefix} are all row 0 (an empty answer?)")
    elif missing:
        notes.append("filled layers: " + ", ".join(f"L{l}" for l in missing))
    if r.get("extra_tags") or r.get("ignored_words"):
        notes.append(
            f"ignored: {r.get('extra_tags', 0)} tags (layers {r.get('extra_layers', [])}), "
            f"{r.get('ignored_words', 0)} words"
        )
    return line + ("".join(f"\n    {n}" for n in notes) if notes else "\n    parsed cleanly")


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spae decode", __doc__.splitlines()[0].split(": ", 1)[-1], EPILOG)
    parser.add_argument("--corpus", help="corpus folder (same as corpus=...)")
    parser.add_argument("--image-id", action="append", default=[], help="a corpus image id (repeatable)")
    parser.add_argument(
        "--row", action="append", type=int, default=[], help="a corpus row index (repeatable)"
    )
    parser.add_argument("--text", help="free text of one image (same as text=...)")
    parser.add_argument("--text-file", help="a file of texts, one image per line (same as text_file=...)")
    parser.add_argument("--tokenizer", help="tokenizer folder or URI (same as tokenizer=...)")
    parser.add_argument("--output", help="output folder (same as output=...)")
    cfg, args = parse_job_config(DecodeConfig, parser, argv)
    flags = {
        "corpus": args.corpus,
        "text": args.text,
        "text_file": args.text_file,
        "tokenizer": args.tokenizer,
        "output": args.output,
        "image_ids": tuple(cfg.image_ids) + tuple(args.image_id) if args.image_id else None,
        "rows": tuple(cfg.rows) + tuple(args.row) if args.row else None,
    }
    cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    try:
        done = run_decode(cfg)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    for item in done:
        print(describe(item))
    print(f"report: {cfg.output.rstrip('/')}/decode_report.json")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
