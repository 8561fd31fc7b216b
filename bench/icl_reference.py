"""Reference-learner few-shot accuracy of two tokenizers' corpora (SPAE against the plain-VQ baseline).

The reference learner (TF-IDF nearest neighbour over the context images' token bags, no LLM) reads
the same prompts an LLM would. Default: 5-way 1-shot, no repeats, with task induction, layers 1-2,
1,000 episodes per corpus with the same seed (so both tokenizers see the same classes, support
and query images).

    python bench/icl_reference.py --spae outputs/corpus-mnist-spae --vq outputs/corpus-mnist-vq \
        --episodes 1000 --layers 2 --vq-layers 1 --out outputs/icl-reference

Prints a Markdown table for docs/RESULTS.md (accuracy with a 95% Wilson interval) and writes
``results.parquet`` / ``table.txt`` / ``episodes.parquet`` per corpus under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from pipeline.llm.icl import GridConfig, ICLJobConfig, run_grid, write_outputs
from pipeline.llm.llm import LLMConfig
from pipeline.runtime.tracking import MlflowConfig
from spae.icl.episodes import MNIST_NAMES


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spae", required=True, help="corpus folder / s3:// prefix tokenized by SPAE")
    ap.add_argument("--vq", required=True, help="corpus tokenized by the plain-VQ baseline")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2, help="layer prefix: 2 = layers 1-2")
    ap.add_argument("--vq-layers", type=int, default=0, help="layer prefix of the VQ corpus (0 = --layers)")
    ap.add_argument("--nosem", default="", help="optional: a corpus of the same SPAE trained without eq. 7")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/icl-reference")
    args = ap.parse_args(argv)

    runs = [("SPAE", args.spae, args.layers), ("VQ", args.vq, args.vq_layers or args.layers)]
    if args.nosem:
        runs.insert(1, ("SPAE-no-semantic", args.nosem, args.layers))
    summary = []
    for method, corpus, layers in runs:
        grid = GridConfig(
            preset="product",
            ways=(args.ways,),
            layers=(layers,),
            shots=(args.shots,),
            repeats=(0,),
            induction=(True,),
        )
        cfg = ICLJobConfig(
            corpus=corpus,
            output=f"{args.out.rstrip('/')}/{method.lower()}",
            method=method,
            llm=LLMConfig(backend="reference"),
            grid=grid,
            episodes=args.episodes,
            seed=args.seed,
            label_names=MNIST_NAMES,
            mlflow=MlflowConfig(enabled=False),
        )
        result = run_grid(cfg)
        write_outputs(result)
        row = result.results.to_pylist()[0]
        lo, hi = wilson(row["correct"], row["scored"])
        summary.append({**row, "ci95": [lo, hi], "corpus": corpus, "layers": layers})
        print(result.table, file=sys.stderr)

    print(f"| tokenizer | corpus | layers | {args.ways}-way {args.shots}-shot accuracy | 95% CI | episodes |")
    print("|---|---|---|---|---|---|")
    for r in summary:
        lo, hi = r["ci95"]
        print(
            f"| {r['method']} | `{r['corpus']}` | 1-{r['layers']} | {100 * r['accuracy']:.1f}% "
            f"| {100 * lo:.1f}-{100 * hi:.1f}% | {r['scored']} (tokens/image {r['tokens_per_image']}) |"
        )
    print(
        json.dumps(
            [
                {k: r[k] for k in ("method", "corpus", "accuracy", "correct", "scored", "ci95")}
                for r in summary
            ]
        ),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
