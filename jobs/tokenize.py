"""``spae tokenize``: a dataset of images -> an LLM-ready lexical corpus (Parquet + JSONL), exactly once."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.common import job_parser, parse_job_config, run_main
from pipeline.runtime.stages import JobFailure
from pipeline.steps.tokenize import TokenizeJobConfig, run_tokenize_job

SUMMARY = "images -> token pyramids as words (Parquet + JSONL corpus), by a Ray actor pool, exactly once"
CONFIG_CLASS = TokenizeJobConfig

EPILOG = """\
examples:
  spae tokenize source.uri=mnist://test tokenizer=outputs/tokenizer output=outputs/corpus
  spae tokenize source.uri=s3://bucket/images tokenizer=models:/spae/1 output=s3://bucket/corpus \\
      layers=[1,2,3] actors=4 num_gpus_per_actor=1 batch_size=256      # the first 3 layers, on GPUs
  spae tokenize --print-config                                         # every key and its default

The tokenizer is a save_pretrained folder (local or s3://) or an MLflow model URI (runs:/, models:/).
The corpus (docs/CORPUS.md): part-<shard>.parquet (image_id, source, label, tokens_l<l>, words_l<l>,
text "[L1] w [L2] w w w w ..."), .spae/jsonl/part-<shard>.jsonl,
.spae/manifest.json, .spae/errors.pq and the dataset card .spae/README.md (docs/CORPUS.md).
Re-running a finished job writes nothing; an interrupted one computes only the missing shards.
A failing encode (device, memory, storage) is retried model_retries times, then the job exits 1 naming
the cause (that shard is not committed; re-run to resume). More error rows than max_error_fraction
(default 0.05) exit 1 after committing; retry_errors=true recomputes the shards with error rows.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spae tokenize", __doc__.splitlines()[0].split(": ", 1)[-1], EPILOG)
    cfg, _ = parse_job_config(TokenizeJobConfig, parser, argv)
    for key in ("tokenizer", "output"):
        if not getattr(cfg, key):
            parser.exit(2, f"{parser.prog}: config error: {key}: required (see --help)\n")
    try:
        result = run_tokenize_job(cfg)
    except JobFailure as e:  # a stage kept failing, or too many error rows: one line, exit 1
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 1
    m = result.manifest
    rt = result.metrics
    print(
        f"corpus: {m['output']} ({m['rows_written']} rows, {m['errors']} errors of {m['rows_in']} images; "
        f"{result.shards_run}/{result.shards_total} shards computed now, {rt['images_per_s']:.0f} img/s)"
    )
    if "startup/first_batch_s" in rt:  # where a run's first seconds go (docs/BENCHMARKS.md)
        print(
            f"start-up: tokenizer {rt['startup/load_s']:.1f} s, listing {rt['startup/list_s']:.1f} s, "
            f"Ray {rt.get('startup/ray_s', 0.0):.1f} s, first batch {rt['startup/first_batch_s']:.1f} s later"
        )
    if "roundtrip/psnr" in rt:
        print(
            f"round trip: {int(rt['roundtrip/images'])} images, "
            f"ids reproduced: {rt['roundtrip/ids_match']:.1%}, "
            f"PSNR {rt['roundtrip/psnr']:.2f} dB from layers 1-{int(rt['roundtrip/prefix'])}"
        )
    if result.run_id:
        print(f"mlflow run: {result.run_id}")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
