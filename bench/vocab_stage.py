"""Vocabulary stage at paper scale: the ViT-L/14 text tower (80 templates) through Ray Data vs bare.

- ``bare tower``: ``model.encode_text`` on pre-tokenized prompts already on the GPU, in a plain loop
  (batches of ``--prompt-batch`` prompts; fp16 weights, random: same FLOPs);
- ``stage loop``: ``TextFeatureStage`` (tokenize on the CPU, eq. 5 template mean) in a plain loop, on
  ``--loop-batches`` batches;
- ``stage loop, pre-tokenized``: the same batches with their ``prompt_tokens`` made beforehand by
  ``PromptTokensStage`` (the GPU actor's share of the job);
- ``ray``: the job's stages (``pipeline.steps.vocab.text_feature_specs``: prompts tokenized by tasks on the
  other CPUs, then the stage on one GPU actor), fed word rows. The rate is settled: the first
  ``--warmup`` batches are not timed (``bench.ray_timing``); the timed batches are printed.

Prompts/s = words/s x 80. ``--words`` words (default 6,144 = 491,520 prompts) stand in for the 65k
vocabulary: the rate is per prompt, so the full table takes ``65,536 x 80 / rate`` seconds.

    python -m bench.vocab_stage [--words 6144] [--warmup 3] [--json out.json]
    python -m bench.vocab_stage --smoke
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from bench.common import (
    TINY_CLIP,
    device_line,
    open_clip_scorer,
    pick_device,
    ray_init,
    register_tiny_clip,
    sync,
    time_fn,
    write_json,
)
from pipeline.runtime.stages import map_stages
from pipeline.steps.vocab import (
    PromptTokensStage,
    TextFeatureConfig,
    TextFeatureStage,
    VocabJobConfig,
    text_feature_specs,
)
from spae.config import from_dict
from spae.scorers import ScorerConfig


class BenchTextFeatureStage(TextFeatureStage):
    """``TextFeatureStage`` unchanged, except that it can build the tiny smoke-test architecture."""

    def __init__(self, config: TextFeatureConfig):
        if config.scorer.arch == TINY_CLIP:
            register_tiny_clip()
        super().__init__(config)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-L-14")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--words", type=int, default=6144, help="words through the Ray Data job")
    ap.add_argument("--loop-batches", type=int, default=4, help="batches timed in the plain stage loops")
    ap.add_argument("--warmup", type=int, default=3, help="Ray batches not timed (start-up)")
    ap.add_argument("--words-per-batch", type=int, default=256, help="Ray Data batch (rows = words)")
    ap.add_argument("--prompt-batch", type=int, default=2048)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.arch, args.precision, args.words, args.words_per_batch, args.prompt_batch, args.warmup = (
            TINY_CLIP,
            "fp32",
            8,
            4,
            16,
            1,
        )
        args.loop_batches = 1
    device = pick_device(args.smoke)
    from spae.scorers import prompt_templates

    templates = prompt_templates("imagenet80")[: 2 if args.smoke else None]
    scorer_cfg = from_dict(ScorerConfig, open_clip_scorer(args.arch, args.precision, device))
    print(f"device: {device_line(device)}")
    print(f"{args.arch} text tower, {args.precision}, {len(templates)} templates, {args.words} words")
    config = TextFeatureConfig(scorer_cfg, tuple(templates), prompt_batch=args.prompt_batch)
    stage = BenchTextFeatureStage(config)
    scorer = stage.scorer
    words = [f"word{i}" for i in range(args.words)]
    results: dict[str, dict] = {}

    # bare tower: pre-tokenized prompts on the device
    prompts = [
        t.replace("{}", w) for w in words[: max(1, args.prompt_batch // len(templates))] for t in templates
    ]
    tokens = scorer.tokenizer(prompts[: args.prompt_batch]).to(device)  # [p, 77]
    with torch.no_grad():
        t = time_fn(lambda: scorer.model.encode_text(tokens), device, warmup=2, reps=5 if args.smoke else 20)
    bare = len(tokens) / t
    results["bare"] = {"prompts_per_s": bare}
    print(f"{'bare tower':>26}: {bare:10.0f} prompts/s", flush=True)

    # the stage in a plain loop: tokenizing itself, then on prompts tokenized beforehand
    per = args.words_per_batch
    batches = [{"word": np.array(words[i : i + per], dtype=object)} for i in range(0, len(words), per)]
    timed = batches[1 : 1 + args.loop_batches] or batches[:1]
    n_prompts = sum(len(b["word"]) for b in timed) * len(templates)
    loops = {}
    for name, inputs in (
        ("stage_loop", timed),
        ("stage_loop_pretokenized", [PromptTokensStage(config)(b) for b in timed]),
    ):
        stage(inputs[0])
        sync(device)
        t0 = time.perf_counter()
        for b in inputs:
            stage(b)
        sync(device)
        loops[name] = n_prompts / (time.perf_counter() - t0)
        results[name] = {"prompts_per_s": loops[name]}
        label = "stage loop" if name == "stage_loop" else "stage loop, pre-tokenized"
        print(f"{label:>26}: {loops[name]:10.0f} prompts/s", flush=True)
    loop = loops["stage_loop"]
    record = {
        "bench": "vocab_stage",
        "device": device_line(device),
        "arch": args.arch,
        "words": args.words,
        "templates": len(templates),
        "results": results,
    }
    stage = scorer = None  # free the main process's copy before the Ray actor loads its own
    torch.cuda.empty_cache() if device.type == "cuda" else None

    write_json(args.json, record)
    try:
        import ray
    except ImportError:
        args.no_ray = True
        print("ray: not importable here; the Ray Data figure is skipped")
    if not args.no_ray:
        from bench.ray_timing import settled_throughput

        ray_init(device)
        try:
            ds = ray.data.from_items([{"word": w} for w in words], override_num_blocks=max(1, len(batches)))
            job = VocabJobConfig(
                scorer=scorer_cfg,
                batch_size=per,
                prompt_batch=args.prompt_batch,
                actors=1,
                num_gpus_per_actor=1 if device.type == "cuda" else 0,
            )
            ds = map_stages(ds, text_feature_specs(job, templates, stage_cls=BenchTextFeatureStage))
            r = settled_throughput(ds, lambda b: len(b["word"]), warmup=args.warmup)
            r["prompts_per_s"] = r["rows_per_s"] * len(templates)
            results["ray"] = r
            print(
                f"{'ray':>26}: {r['prompts_per_s']:10.0f} prompts/s ({r['rows']} words in {r['batches']} "
                f"timed batches after {r['warmup_batches']} warm-up; median-gap rate "
                f"{r['median_gap_rows_per_s'] * len(templates):.0f}; "
                f"first batch after {r['first_batch_s']:.1f} s)"
            )
            print(
                f"RESULT vocab_stage: Ray {r['prompts_per_s']:.0f} prompts/s vs bare tower {bare:.0f} -> "
                f"{r['prompts_per_s'] / bare:.2f} (goal >= 0.9); stage loop / bare {loop / bare:.2f}; "
                f"pre-tokenized stage loop / bare {loops['stage_loop_pretokenized'] / bare:.2f}"
            )
            write_json(args.json, record)  # before shutting Ray down, which takes seconds
        finally:
            ray.shutdown()
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
