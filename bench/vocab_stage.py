"""Vocabulary stage at paper scale: the ViT-L/14 text tower (80 templates) through Ray Data vs bare.

- ``bare tower``: ``model.encode_text`` on pre-tokenized prompts already on the GPU, in a plain loop
  (batches of ``--prompt-batch`` prompts; fp16 weights, random: same FLOPs);
- ``stage loop``: ``TextFeatureStage`` (tokenize on the CPU, eq. 5 template mean) in a plain loop;
- ``ray``: the same stage on a Ray Data actor pool of 1 GPU actor, fed word rows (``map_stage``).

Prompts/s = words/s x 80. ``--words`` words (default 4,096 = 327,680 prompts) stand in for the 65k
vocabulary: the rate is per prompt, so the full table takes ``65,536 x 80 / rate`` seconds.

    python -m bench.vocab_stage [--words 4096] [--json out.json]
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
    pick_device,
    ray_init,
    ray_throughput,
    register_tiny_clip,
    sync,
    time_fn,
    write_json,
)
from pipeline.vocab import TextFeatureStage


class BenchTextFeatureStage(TextFeatureStage):
    """``TextFeatureStage`` unchanged, except that it can build the tiny smoke-test architecture."""

    def __init__(self, scorer: dict, templates: list[str], prompt_batch: int = 2048):
        if scorer["arch"] == TINY_CLIP:
            register_tiny_clip()
        super().__init__(scorer, templates, prompt_batch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-L-14")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--words", type=int, default=4096)
    ap.add_argument("--words-per-batch", type=int, default=256, help="Ray Data batch (rows = words)")
    ap.add_argument("--prompt-batch", type=int, default=2048)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.arch, args.precision, args.words, args.words_per_batch, args.prompt_batch = (
            TINY_CLIP,
            "fp32",
            8,
            4,
            16,
        )
    device = pick_device(args.smoke)
    from spae.scorers import prompt_templates

    templates = prompt_templates("imagenet80") if not args.smoke else prompt_templates("imagenet80")[:2]
    scorer_cfg = {
        "kind": "open_clip",
        "arch": args.arch,
        "pretrained": "",
        "precision": args.precision,
        "device": str(device),
    }
    print(f"device: {device_line(device)}")
    print(f"{args.arch} text tower, {args.precision}, {len(templates)} templates, {args.words} words")
    stage = BenchTextFeatureStage(scorer_cfg, templates, prompt_batch=args.prompt_batch)
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
    print(f"{'bare tower':>12}: {bare:10.0f} prompts/s", flush=True)

    # the stage in a plain loop
    per = args.words_per_batch
    batches = [{"word": np.array(words[i : i + per], dtype=object)} for i in range(0, len(words), per)]
    stage(batches[0])
    sync(device)
    t0 = time.perf_counter()
    for b in batches[1:] or batches:
        stage(b)
    sync(device)
    n_words = sum(len(b["word"]) for b in (batches[1:] or batches))
    loop = n_words * len(templates) / (time.perf_counter() - t0)
    results["stage_loop"] = {"prompts_per_s": loop}
    print(f"{'stage loop':>12}: {loop:10.0f} prompts/s", flush=True)
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

    try:
        import ray
    except ImportError:
        args.no_ray = True
        print("ray: not importable here; the Ray Data figure is skipped")
    if not args.no_ray:
        from pipeline.stages import map_stage

        ray_init(device)
        try:
            ds = ray.data.from_items([{"word": w} for w in words], override_num_blocks=max(1, len(batches)))
            ds = map_stage(
                ds,
                BenchTextFeatureStage,
                constructor_kwargs={
                    "scorer": scorer_cfg,
                    "templates": templates,
                    "prompt_batch": args.prompt_batch,
                },
                actors=1,
                batch_size=per,
                num_gpus=1 if device.type == "cuda" else 0,
            )
            r = ray_throughput(ds, lambda b: len(b["word"]))
        finally:
            ray.shutdown()
        r["prompts_per_s"] = r["rows_per_s"] * len(templates)
        results["ray"] = r
        print(f"{'ray':>12}: {r['prompts_per_s']:10.0f} prompts/s ({r['rows']} words after the first batch)")
        print(
            f"RESULT vocab_stage: Ray {r['prompts_per_s']:.0f} prompts/s vs bare tower {bare:.0f} -> "
            f"{r['prompts_per_s'] / bare:.2f} (goal >= 0.9); stage loop / bare {loop / bare:.2f}"
        )
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
