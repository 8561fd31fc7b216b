"""``spae pools``: per-image candidate token pools (eq. 4-6), by a Ray actor pool -> Parquet."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.common import job_parser, parse_job_config, run_main
from pipeline.outputs.contracts import meta_file
from pipeline.runtime.ray_utils import init_ray
from pipeline.runtime.stages import JobFailure
from pipeline.runtime.tracking import log_params_flat, start_run, tracking_dir
from pipeline.steps.pools import PoolsJobConfig, run_pools_job

SUMMARY = "per-image top-K candidate tokens (eq. 4-6) from images and a vocab table -> pools (Parquet)"
CONFIG_CLASS = PoolsJobConfig

EPILOG = """\
examples:
  spae pools source.uri=mnist://train vocab=outputs/vocab output=outputs/pools \\
      scorer.kind=label_probe scorer.probe_path=outputs/probe      # trains the probe if it is missing
  spae pools source.uri=s3://bucket/images vocab=s3://bucket/vocab output=s3://bucket/pools \\
      scorer.kind=open_clip scorer.arch=ViT-L-14 scorer.pretrained=openai scorer.precision=fp16 \\
      actors=4 num_gpus_per_actor=1 search.backend=auto             # the paper's scorer, on GPUs
  spae pools --print-config                                          # every key and its default

Sources: mnist://train|valid|test[?limit=N], a folder of images (labels from class subfolders),
Parquet files with an image-bytes column (source.image_column), or an s3:// prefix of either.
Re-running a finished job is a no-op; an interrupted one computes only the missing shards.
Failed images go to <output>/.spae/errors.pq; counts to <output>/.spae/manifest.json. More error rows than
max_error_fraction (default 0.05) exit 1 after committing; retry_errors=true recomputes those shards.
A failing scorer (device, memory) is retried model_retries times, then the job exits 1 naming the cause.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spae pools", __doc__.splitlines()[0].split(": ", 1)[-1], EPILOG)
    cfg, _ = parse_job_config(PoolsJobConfig, parser, argv)

    init_ray(cfg.ray)
    with start_run(cfg.mlflow, run_name=f"pools:{cfg.output}", default_dir=tracking_dir(cfg.output)) as run:
        if run is not None:
            log_params_flat(cfg)
        try:
            result = run_pools_job(cfg)
        except JobFailure as e:  # a stage kept failing, or too many error rows: one line, exit 1
            print(f"{parser.prog}: {e}", file=sys.stderr)
            return 1
        if run is not None:
            import mlflow

            m = result.manifest
            mlflow.log_metrics(
                {
                    "rows_in": m["rows_in"],
                    "rows_written": m["rows_written"],
                    "errors": m["errors"],
                    "shards_total": result.run.shards_total,
                    "shards_run": result.run.shards_run,
                    "images_run": result.run.rows_run,
                    "seconds": result.run.seconds,
                    "images_per_s": result.run.images_per_s,
                }
            )
            mlflow.set_tag("spae.probe_trained", str(result.probe_trained).lower())
            mlflow.log_dict(m, "pools_manifest.json")
    m = result.manifest
    print(
        f"pools: {result.output} ({m['rows_written']} rows, {m['errors']} errors of {m['rows_in']} images; "
        f"{result.run.shards_run}/{result.run.shards_total} shards computed now, "
        f"{result.run.images_per_s:.0f} img/s)"
    )
    if result.probe_trained:
        print(f"label probe trained and saved to {cfg.scorer.probe_path}")
    print(f"errors:   {meta_file(result.output, 'errors').uri}")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
