"""``spae decode``: corpus rows or free text (e.g. an LLM's answer) -> PNG images + a parse report.

A video tokenizer (``num_frames > 0``) decodes each row or text to a clip, written as an animated GIF
(``video_format=gif``, default) or an H.264 MP4 (``video_format=mp4``, needs PyAV).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace

from jobs.common import job_parser, parse_job_config, run_main
from pipeline.steps.decode import DecodeConfig, DecodedImage, run_decode

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


CONFIG_CLASS = DecodeConfig


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
