"""``spae icl``: few-shot classification with a frozen LLM over a tokenized corpus (the paper's Table 1)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jobs.common import job_parser, parse_job_config, run_main
from pipeline.llm.icl import ICLJobConfig, examples, log_to_mlflow, run_grid, write_outputs
from pipeline.runtime.tracking import log_params_flat, start_run, tracking_dir

SUMMARY = "few-shot classification with a frozen LLM (ways x shots x repeats x induction x layers) -> Table 1"
CONFIG_CLASS = ICLJobConfig

EPILOG = """\
examples:
  spae icl corpus=outputs/corpus-mnist-test label_names=[zero,one,two,three,four,five,six,seven,eight,nine]
      # the reference learner (TF-IDF nearest neighbour, no LLM), Table 1's settings for 2 and 5 ways
  spae icl corpus=s3://corpora/mnist-test llm.backend=openai llm.model=meta-llama/Llama-3.1-8B \\
      llm.base_url=http://vllm:8000/v1 llm.context_window=8192 llm.concurrency=8 llm.requests_per_s=20 \\
      llm.max_requests=20000 class_names=nonsense
      # any OpenAI-compatible server; the key comes from $OPENAI_API_KEY (never from the config)
  spae icl corpus=... llm.backend=hf llm.model=/models/tiny-lm grid.preset=product grid.ways=[5] \\
      grid.shots=[1] grid.repeats=[0] grid.induction=[true] grid.layers=[1,2,3] episodes=200

Outputs under `output`: results.parquet (per setting), episodes.parquet (per episode, with the
prompt), table.txt. Episodes whose prompt does not fit the context window are counted as overflow
and never sent; accuracy is over the episodes answered.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spae icl", __doc__.splitlines()[0].split(": ", 1)[-1], EPILOG)
    cfg, _ = parse_job_config(ICLJobConfig, parser, argv)

    with start_run(cfg.mlflow, run_name=f"icl:{cfg.output}", default_dir=tracking_dir(cfg.output)) as run:
        if run is not None:
            log_params_flat(cfg)
        result = run_grid(cfg)
        uris = write_outputs(result)
        if run is not None:
            log_to_mlflow(result, cfg.examples)
    print(result.table, end="")
    for ex in examples(result, 1)[:1]:
        print(f"\nexample ({ex['setting']}): answer {ex['answer']!r}, model wrote {ex['completion']!r}")
    print(f"\nresults: {uris['results.parquet']}\nepisodes: {uris['episodes.parquet']}")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
