"""Tokenization at the ``paper`` preset: bare ``SPAETokenizer.encode`` in a loop, and the Ray Data stage.

Model: the paper preset with ``network.latent_dim=768`` and a random frozen 65,536 x 768 codebook
(random weights: same FLOPs). Variants of the bare loop (images already on the GPU, float [0, 1]):

- ``encode``: ``SPAETokenizer.encode`` as it is (fp32 encoder, the search in bf16: fused kernel);
- ``encode, chunked search``: the same with ``quantizer.search=chunked`` (GEMM per chunk + running min);
- ``bf16 encoder``: the encoder under bf16 autocast (channels-last), ``z`` cast back to fp32 before
  the SAQ walk; tokens compared with ``encode``'s (share of identical tokens per layer).

Then, when Ray is importable: ``TokenizeStage`` called in a plain loop on uint8 batches (uint8 to the
GPU, floats made there; with words and text, and ids only), and the job's Ray Data stages
(``pipeline.steps.tokenize.tokenize_spec``: the stage on one GPU actor emitting ids; words and text built
on the driver, as the job does) fed by in-memory uint8 blocks. The Ray rate is settled: the first
``--warmup`` batches (start-up, compilation) are not timed (``bench.ray_timing``); the timed batches
are printed. Ratios: Ray / bare encode (the goal, >= 0.85), Ray / stage loops.

    python -m bench.tokenize_stage [--batch 256] [--images 16384] [--warmup 3] [--json out.json]
    python -m bench.tokenize_stage --smoke
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch

from bench.common import (
    device_line,
    pick_device,
    random_codebook,
    ray_init,
    sync,
    time_fn,
    uint8_block,
    uint8_rows,
    write_json,
)
from spae.model import SPAE, preset
from spae.networks import NetworkConfig
from spae.tokenizer import SPAETokenizer


def build_tokenizer(args, device) -> SPAETokenizer:
    torch.manual_seed(0)
    if args.smoke:
        cfg = preset("tiny")
        codebook = random_codebook(args.vocab, cfg.network.latent_dim)
    else:
        cfg = replace(preset("paper"), network=NetworkConfig.preset("paper", latent_dim=args.dim))
        codebook = random_codebook(args.vocab, args.dim)
    model = SPAE(cfg, codebook)
    g = torch.Generator().manual_seed(1)
    model.match_latent_to_codebook(torch.rand(8, 3, cfg.image_size, cfg.image_size, generator=g))
    return SPAETokenizer(model).to(device).eval()


def tokenizer_and_images(args, device, note: str = "") -> tuple[SPAETokenizer, torch.Tensor]:
    """``build_tokenizer`` with the device and model lines printed, and one seeded batch of
    ``args.batch`` random images on ``device``: the set-up of the encode benches."""
    tok = build_tokenizer(args, device)
    size = tok.model.cfg.image_size
    print(f"device: {device_line(device)}{note}")
    print(
        f"model: {size}px, {sum(tok.pyramid.token_counts)} tokens/image, codebook "
        f"{tuple(tok.codebook.embeddings.shape)}, batch {args.batch}"
    )
    g = torch.Generator(device=device).manual_seed(0)
    return tok, torch.rand(args.batch, 3, size, size, device=device, generator=g)


@contextmanager
def search_as(tok: SPAETokenizer, search: str) -> Iterator[None]:
    """``tok`` with ``QuantizerConfig.search=search`` inside the block (e.g. ``chunked``, ``fused-tiled``)."""
    q = tok.model.quantizer
    cfg = q.cfg
    q.cfg = replace(cfg, search=search)
    try:
        yield
    finally:
        q.cfg = cfg


@torch.no_grad()
def encode_bf16(tok: SPAETokenizer, images: torch.Tensor) -> list[torch.Tensor]:
    """The bf16-encoder encode: autocast over the convolutions only, the SAQ walk on fp32 z."""
    model = tok.model
    with torch.autocast(images.device.type, dtype=torch.bfloat16):
        z = model.encoder(images * 2.0 - 1.0)  # [b, c, h, w] bf16
    return model.quantizer(z.float()).ids


def ray_run(args, folder: str, size: int, n_images: int, device, words: list[str], layers, report) -> dict:
    """The job's stages (``tokenize_spec``: the GPU actor emits ids; ``WordsStage`` builds words and text
    on the driver, as the job's ``driver_stage``) fed by in-memory uint8 blocks; rate from
    ``settled_throughput`` (start-up and warm-up batches excluded).
    ``report(result)`` runs before Ray shuts down (which takes seconds)."""
    import ray

    from bench.ray_timing import settled_throughput
    from pipeline.runtime.stages import StageSpec, map_stages
    from pipeline.steps.tokenize import TokenizeStage, TokenizeStageConfig, WordsStage

    ray_init(device)
    try:
        blocks = max(args.warmup + 1, n_images // args.batch)
        ds = ray.data.from_items([{"i": i} for i in range(blocks)], override_num_blocks=blocks)
        ds = ds.map_batches(
            uint8_block, batch_size=1, batch_format="numpy", fn_kwargs={"size": size, "per_block": args.batch}
        )
        config = TokenizeStageConfig(folder, tuple(layers), device=str(device), words=False)
        spec = StageSpec(
            TokenizeStage, config, actors=1, batch_size=args.batch, num_gpus=1 if device.type == "cuda" else 0
        )
        ds = map_stages(ds, [spec])
        errors = 0
        add_words = WordsStage(words, layers)

        def count(b: dict) -> int:
            nonlocal errors
            b = add_words(b)  # on the driver, as the job does before its writer
            errors += sum(1 for e in b["error"] if e)
            return len(b["image_id"])

        r = {**settled_throughput(ds, count, warmup=args.warmup), "error_rows": errors}
        r["images_per_s"] = r["rows_per_s"]
        report(r)
    finally:
        ray.shutdown()
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--images", type=int, default=16384, help="images through the Ray Data job")
    ap.add_argument("--warmup", type=int, default=3, help="Ray batches not timed (start-up, compilation)")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument(
        "--stage-only",
        action="store_true",
        help="bare encode and the stage only (no chunked / bf16 variants)",
    )
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.vocab, args.reps, args.images, args.warmup = 4, 256, 2, 64, 1
    device = pick_device(args.smoke)
    tok, images = tokenizer_and_images(args, device)
    size = tok.model.cfg.image_size
    results: dict[str, dict] = {}

    def record(name: str, fn) -> float:
        t = time_fn(fn, device, warmup=2, reps=args.reps)
        results[name] = {"seconds_per_batch": t, "images_per_s": args.batch / t}
        print(
            f"{name:>34}: {args.batch / t:9.0f} images/s  ({t * 1e3:.1f} ms / batch of {args.batch})",
            flush=True,
        )
        return args.batch / t

    t0 = time.perf_counter()
    tok.encode(images)  # the first call: compilation where encode compiles
    sync(device)
    results["encode first call"] = {"seconds": time.perf_counter() - t0}
    bare = record("encode", lambda: tok.encode(images))
    same: list[float] = []
    fast = None
    if not args.stage_only:
        with search_as(tok, "chunked"):
            record("encode, chunked search", lambda: tok.encode(images))
        tok_cl = tok.to(memory_format=torch.channels_last)
        images_cl = images.contiguous(memory_format=torch.channels_last)
        fast = record("bf16 encoder (+channels-last)", lambda: encode_bf16(tok_cl, images_cl))
        ref = tok.encode(images)
        ids = encode_bf16(tok_cl, images_cl)
        same = [
            float((ref.layer_ids(l + 1).to(ids[l].device) == ids[l]).float().mean()) for l in range(len(ids))
        ]
        print("bf16 encoder vs encode, identical tokens per layer: " + ", ".join(f"{s:.1%}" for s in same))
    record_all = {
        "bench": "tokenize_stage",
        "device": device_line(device),
        "batch": args.batch,
        "results": results,
        "bf16_same_tokens": same,
    }
    try:
        import ray  # noqa: F401
    except ImportError:
        args.no_ray = True
        print("ray: not importable here; the Ray Data figures are skipped")
    if not args.no_ray:
        from pipeline.steps.tokenize import TokenizeStage, TokenizeStageConfig

        with tempfile.TemporaryDirectory() as folder:
            tok.save_pretrained(folder)
            rng = np.random.default_rng(0)
            pix = rng.integers(0, 256, size=(args.batch, size, size, 3), dtype=np.uint8)
            sb = uint8_rows(pix, 0)
            reps = max(2, args.reps // 2)
            loops = {}
            for name, emit_words in (("TokenizeStage loop", True), ("TokenizeStage loop, ids only", False)):
                stage = TokenizeStage(TokenizeStageConfig(folder, device=str(device), words=emit_words))
                stage(sb)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    stage(sb)
                loops[name] = reps * args.batch / (time.perf_counter() - t0)
                results[name] = {"images_per_s": loops[name]}
                label = "stage loop (words + text)" if emit_words else "stage loop (ids: the GPU actor)"
                print(f"{label:>34}: {loops[name]:9.0f} images/s", flush=True)
                layers = stage.layers
                del stage
            loop = loops["TokenizeStage loop"]
            words = list(tok.vocabulary.words)
            write_json(args.json, record_all)  # the loop figures survive a run cut short in the Ray part

            def report(r: dict) -> None:
                results["ray"] = r
                print(
                    f"{'Ray Data tokenize stages (1 GPU)':>34}: {r['images_per_s']:9.0f} images/s  "
                    f"({r['rows']} images in {r['batches']} timed batches after {r['warmup_batches']} "
                    f"warm-up; median-gap rate {r['median_gap_rows_per_s']:.0f}; "
                    f"{r['error_rows']} error rows; first batch after {r['first_batch_s']:.1f} s)"
                )
                print(
                    f"RESULT tokenize_ray: Ray / bare encode {r['images_per_s'] / bare:.2f} (goal >= 0.85); "
                    f"Ray / stage loop {r['images_per_s'] / loop:.2f}; "
                    f"Ray / ids-only loop {r['images_per_s'] / loops['TokenizeStage loop, ids only']:.2f}",
                    flush=True,
                )
                write_json(args.json, record_all)

            ray_run(args, folder, size, args.images, device, words, layers, report)
    bf16 = f", bf16 encoder {fast:.0f} images/s" if fast is not None else ""
    print(f"RESULT tokenize_bare: encode {bare:.0f} images/s{bf16} (goal >= 5,000)")
    write_json(args.json, record_all)
    return 0


if __name__ == "__main__":
    sys.exit(main())
