"""``spae vocab``: eq. 5 text features of every codebook token -> Parquet + vocab_card.json."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.common import job_parser, parse_job_config, run_main
from pipeline.outputs.contracts import meta_file
from pipeline.runtime.ray_utils import init_ray
from pipeline.runtime.tracking import log_params_flat, start_run, tracking_dir
from pipeline.steps.vocab import CARD, VocabJobConfig, run_vocab_job

SUMMARY = "text features (eq. 5) of every codebook token, by a Ray actor pool -> vocab table (Parquet)"
CONFIG_CLASS = VocabJobConfig

EPILOG = """\
examples:
  spae vocab output=outputs/vocab scorer.kind=open_clip scorer.arch=ViT-L-14 scorer.pretrained=openai \\
      actors=4 num_gpus_per_actor=1 scorer.precision=fp16          # the paper's scorer, on GPUs
  spae vocab output=s3://bucket/vocab codebook.top_n=4096 \\
      "codebook.keep_words=[zero,one,two,0,1,2]" scorer.kind=label_probe scorer.probe_path=outputs/probe \\
      scorer.templates=simple
  spae vocab --print-config                                        # every key and its default

Re-running a finished job is a no-op; an interrupted one computes only the missing shards.
Without scorer.pretrained an open_clip scorer has RANDOM weights (tests and speed runs only).
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spae vocab", __doc__.splitlines()[0].split(": ", 1)[-1], EPILOG)
    cfg, _ = parse_job_config(VocabJobConfig, parser, argv)

    init_ray(cfg.ray)
    with start_run(cfg.mlflow, run_name=f"vocab:{cfg.output}", default_dir=tracking_dir(cfg.output)) as run:
        if run is not None:
            log_params_flat(cfg)
        result = run_vocab_job(cfg)
        if run is not None:
            import mlflow

            mlflow.log_metrics(
                {
                    "rows": result.rows,
                    "shards_total": result.shards_total,
                    "shards_run": result.shards_run,
                    "tokens_run": result.tokens_run,
                    "seconds": result.seconds,
                    "tokens_per_s": result.tokens_per_s,
                }
            )
            mlflow.log_dict(result.card, CARD)
    print(
        f"vocab table: {result.output} ({result.rows} tokens, d={result.card['dim']}, "
        f"{result.shards_run}/{result.shards_total} shards computed now, {result.tokens_per_s:.0f} tokens/s)"
    )
    print(f"card:        {meta_file(result.output, 'vocab_card').uri}")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
