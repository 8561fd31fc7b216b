"""``spae report``: an HTML page + PNG of a corpus's token pyramids (the paper's Fig. 4 layout)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.common import job_parser, parse_job_config, run_main
from pipeline.steps.report import ReportConfig, run_report

SUMMARY = "a corpus's token pyramids as grids of words + reconstructions per prefix -> HTML + PNG"

EPILOG = """\
examples:
  spae report corpus=outputs/corpus output=outputs/report                     # the first 4 images
  spae report corpus=s3://bucket/corpus image_ids=[mnist-test-000007,mnist-test-000011] \\
      pools=outputs/pools output=outputs/report        # cells shaded by the tokens' semantic scores

Per image: the original, layers 1-4 as grids of words (row-major, as in the text), each cell shaded
darker for a higher semantic score of the token for that image (from the pools table, when given),
else for a more frequent token in the corpus layer, then decodes from every covering prefix present
with their PSNR. Writes <output>/index.html (self-contained) and <output>/pyramids.png.

A video corpus (a tokenizer with num_frames > 0): the source and every decode as frame strips, the
layers' time steps side by side in the word grids, PSNR averaged over frames, and per clip two
animated GIFs next to index.html, <id>-source.gif and <id>.gif (the deepest prefix's decode),
shown on the page (gif_scale=0: enlarged to at least 128 px).
"""

CONFIG_CLASS = ReportConfig


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spae report", __doc__.splitlines()[0].split(": ", 1)[-1], EPILOG)
    cfg, _ = parse_job_config(ReportConfig, parser, argv)
    try:
        result = run_report(cfg)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: {e}\n")
    print(f"report: {result.html}\nfigure: {result.png}")
    print(f"images: {', '.join(result.image_ids)} (shaded by {result.shading})")
    if result.animations:
        print(f"animations: {len(result.animations)} GIFs next to the report")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
