"""Pool stage: the ViT-L/14 image tower + top-K and min over a 65k vocabulary, Ray Data vs bare.

Images arrive pre-resized (uint8 224x224, the scorer's size, so the resize is a no-op) in memory
blocks: the Parquet read and JPEG decode are left out (``pipeline.inputs.images`` measures those).

- ``bare tower``: ``model.encode_image`` on normalised fp16 tensors already on the GPU, plain loop;
- ``search``: ``TokenSearch.search`` (top-K + min + max over ``--vocab`` rows) on a batch of features;
- ``stage loop``: ``PoolStage.__call__`` (uint8 to the GPU, floats and normalisation there, tower,
  search, eq. 6) in a loop;
- ``ray``: the same stage on a Ray Data actor (1 GPU) fed uint8 blocks (a ``StageSpec`` through
  ``map_stages``, as the job). The
  rate is settled: the first ``--warmup`` batches are not timed (``bench.ray_timing``); the timed
  batches are printed.

The stage is ``PoolStage`` itself; ``RandomVocabPoolStage`` only replaces its constructor's
vocab table with a random text-feature table of ``vocab_size`` rows.

    python -m bench.pool_stage [--images 8192] [--warmup 3] [--json out.json]
    python -m bench.pool_stage --smoke
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

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
    uint8_block,
    write_json,
)
from pipeline.steps.pools import PoolStage, PoolStageConfig
from pipeline.steps.search import SearchConfig, TokenSearch
from spae.config import from_dict
from spae.scorers import ScorerConfig, build_scorer


@dataclass(frozen=True)
class RandomVocabConfig:
    pool: PoolStageConfig  # its vocab URI unused
    vocab_size: int


class RandomVocabPoolStage(PoolStage):
    """``PoolStage`` over a random unit-norm [vocab, d] text-feature table (no vocab job needed)."""

    def __init__(self, config: RandomVocabConfig):
        cfg = config.pool
        if cfg.scorer.arch == TINY_CLIP:
            register_tiny_clip()
        self.scorer = build_scorer(cfg.scorer)
        g = torch.Generator().manual_seed(0)
        feats = torch.nn.functional.normalize(
            torch.randn(config.vocab_size, self.scorer.dim, generator=g), dim=1
        )  # [v, d]
        self.search = TokenSearch(feats, cfg.search)
        self.k = min(cfg.top_k, config.vocab_size)
        self.min_threshold = cfg.min_threshold
        self.sample_frames = cfg.sample_frames
        self.retries = cfg.retries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-L-14")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--top-k", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--images", type=int, default=8192, help="images through the Ray Data job")
    ap.add_argument("--warmup", type=int, default=3, help="Ray batches not timed (start-up)")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.arch, args.precision, args.vocab, args.top_k, args.batch, args.images, args.warmup = (
            TINY_CLIP,
            "fp32",
            512,
            8,
            2,
            6,
            1,
        )
    device = pick_device(args.smoke)
    scorer_cfg = open_clip_scorer(args.arch, args.precision, device)
    pool = PoolStageConfig(
        scorer=from_dict(ScorerConfig, scorer_cfg),
        vocab="",
        search=SearchConfig(backend="torch", device=str(device)),
        top_k=args.top_k,
        min_threshold=0.5,
    )
    config = RandomVocabConfig(pool, args.vocab)
    stage = RandomVocabPoolStage(config)
    scorer, size = stage.scorer, stage.scorer.image_size
    print(f"device: {device_line(device)}")
    print(
        f"{args.arch} image tower {size}px, {args.precision}; "
        f"top-{args.top_k} over {args.vocab} rows; batch {args.batch}"
    )
    reps = 3 if args.smoke else 20
    results: dict[str, dict] = {}
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, device=device, generator=g).to(scorer.dtype)
    with torch.no_grad():
        t_tower = time_fn(lambda: scorer.model.encode_image(x), device, warmup=2, reps=reps)
    bare = args.batch / t_tower
    feats = torch.nn.functional.normalize(
        torch.randn(args.batch, scorer.dim, device=device, generator=g), dim=1
    )
    t_search = time_fn(lambda: stage.search.search(feats, stage.k), device, warmup=2, reps=reps)
    block = uint8_block({"i": np.array([0])}, size, args.batch)
    t_stage = time_fn(lambda: stage(block), device, warmup=1, reps=max(2, reps // 2))
    loop = args.batch / t_stage
    share = t_search / t_stage
    results.update(
        bare={"images_per_s": bare},
        search={"seconds_per_batch": t_search, "share_of_stage": share},
        stage_loop={"images_per_s": loop},
    )
    print(f"{'bare tower':>12}: {bare:9.0f} images/s")
    print(
        f"{'search':>12}: {t_search * 1e3:9.2f} ms per batch of {args.batch} "
        f"= {t_search / t_stage:.1%} of the stage"
    )
    print(f"{'stage loop':>12}: {loop:9.0f} images/s", flush=True)
    record = {
        "bench": "pool_stage",
        "device": device_line(device),
        "arch": args.arch,
        "vocab": args.vocab,
        "top_k": args.top_k,
        "batch": args.batch,
        "results": results,
    }
    stage = scorer = x = None  # free the main process's copy before the Ray actor loads its own
    sync(device)
    write_json(args.json, record)
    try:
        import ray
    except ImportError:
        args.no_ray = True
        print("ray: not importable here; the Ray Data figure is skipped")
    if not args.no_ray:
        from bench.ray_timing import settled_throughput
        from pipeline.runtime.stages import StageSpec, map_stages

        ray_init(device)
        try:
            blocks = max(args.warmup + 1, args.images // args.batch)
            ds = ray.data.from_items([{"i": i} for i in range(blocks)], override_num_blocks=blocks)
            ds = ds.map_batches(
                uint8_block,
                batch_size=1,
                batch_format="numpy",
                fn_kwargs={"size": size, "per_block": args.batch},
            )
            spec = StageSpec(
                RandomVocabPoolStage,
                config,
                actors=1,
                batch_size=args.batch,
                num_gpus=1 if device.type == "cuda" else 0,
            )
            ds = map_stages(ds, [spec])
            r = settled_throughput(ds, lambda b: len(b["image_id"]), warmup=args.warmup)
            results["ray"] = r
            print(
                f"{'ray':>12}: {r['rows_per_s']:9.0f} images/s ({r['rows']} images in {r['batches']} "
                f"timed batches after {r['warmup_batches']} warm-up; "
                f"median-gap rate {r['median_gap_rows_per_s']:.0f}; "
                f"first batch after {r['first_batch_s']:.1f} s)"
            )
            print(
                f"RESULT pool_stage: Ray {r['rows_per_s']:.0f} images/s vs bare tower {bare:.0f} -> "
                f"{r['rows_per_s'] / bare:.2f} (goal >= 0.85); stage loop / bare {loop / bare:.2f}; "
                f"search {t_search / t_stage:.1%} of the stage"
            )
            write_json(args.json, record)  # before shutting Ray down, which takes seconds
        finally:
            ray.shutdown()
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
