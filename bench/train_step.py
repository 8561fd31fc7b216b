"""The SPAE training step at the ``paper`` preset: fast variants vs plain fp32 eager, same run.

Model: 128x128 images, the 6-layer pyramid (597 tokens), a random frozen 65,536 x 768 codebook
(``network.latent_dim=768``), discriminator on (GAN + LeCAM), semantic loss on layers 1-5, no
perceptual loss (it needs VGG weights). ``SPAETrainer.step`` exactly as the train job calls it.

Variants (each from the same initial weights, the same batches and the same target-sampling seed):

- ``fp32``: the baseline: ``amp_dtype=None``, fp32 nearest-code search, PyTorch defaults (cuDNN may
  use TF32 for convolutions, matmuls are full fp32);
- ``bf16``: bf16 autocast and the bf16 (fused) search: the trainer's current default on CUDA;
- ``bf16+fadam+tf32``: + fused Adam + TF32 matmuls (the fp32 semantic-loss softmax over 65k rows);
- ``...+cl``: + channels-last activations and weights;
- ``...+compile``: + ``torch.compile`` of the encoder, decoder and discriminator (``Module.compile``).

The baseline and the fastest variant run ``--curve-steps`` steps (loss curves compared); the others
``--steps``. Then the largest batch that fits (fast variant, no compile) and model FLOP utilization
(FLOPs counted by ``torch.utils.flop_counter`` on one step, over the measured bf16 matmul peak).

    python -m bench.train_step [--batch 32] [--curve-steps 200] [--json out.json]
    python -m bench.train_step --smoke
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch

from bench.common import device_line, peak_tflops, pick_device, random_codebook, smooth_images, write_json
from spae.losses import LossConfig
from spae.model import SPAE, preset
from spae.networks import Discriminator, NetworkConfig
from spae.quantize import QuantizerConfig
from spae.training import OptimConfig, SPAETrainer


@dataclass(frozen=True)
class Variant:
    name: str
    bf16: bool = False
    fused_adam: bool = False
    tf32: bool = False
    channels_last: bool = False
    compile: bool = False


def build(args, device) -> tuple[SPAE, Discriminator]:
    """The paper-preset model (or a tiny one for --smoke), fp32 on the CPU, seeded."""
    torch.manual_seed(0)
    if args.smoke:
        cfg = preset("tiny")
        cfg = replace(cfg, loss=LossConfig(semantic_layers=2, thresholds=(0.98, 0.95)))
        codebook = random_codebook(args.vocab, cfg.network.latent_dim)
    else:
        base = preset("paper")
        cfg = replace(base, network=NetworkConfig.preset("paper", latent_dim=args.dim))
        codebook = random_codebook(args.vocab, args.dim)
    model = SPAE(cfg, codebook)
    disc = Discriminator(cfg.network, cfg.image_channels, cfg.image_size)
    model.match_latent_to_codebook(smooth_images(8, cfg.image_size, 12345, torch.device("cpu")))
    return model, disc


def batch(step: int, b: int, size: int, vocab: int, device, channels_last: bool):
    images = smooth_images(b, size, step, device)  # [b, 3, H, W]
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(10_000 + step)
    k = 32
    ids = torch.randint(0, vocab, (b, k), generator=g)  # [b, k] pool candidates
    scores = torch.sort(torch.rand(b, k, generator=g), dim=1, descending=True).values
    scores[:, 0] = 1.0  # eq. 6 normalises the best candidate to 1
    return images, ids, scores


def make_trainer(v: Variant, model0: SPAE, disc0: Discriminator, device, lr_warmup: int) -> SPAETrainer:
    model = copy.deepcopy(model0)
    search = "bfloat16" if v.bf16 else "float32"
    model.cfg = replace(model.cfg, quantizer=replace(model.cfg.quantizer, search_dtype=search))
    model.quantizer.cfg = QuantizerConfig(**{**model.quantizer.cfg.__dict__, "search_dtype": search})
    disc = copy.deepcopy(disc0)
    model, disc = model.to(device), disc.to(device)
    if v.channels_last:
        model, disc = model.to(memory_format=torch.channels_last), disc.to(memory_format=torch.channels_last)
    if v.compile:
        for m in (model.encoder, model.decoder, disc):
            m.compile()
    optim = OptimConfig(warmup_steps=lr_warmup)
    trainer = SPAETrainer(
        model, disc, model.cfg.loss, optim, device, amp_dtype=torch.bfloat16 if v.bf16 else None, seed=0
    )
    if v.fused_adam and device.type == "cuda":
        kw = {"betas": optim.betas, "weight_decay": optim.weight_decay, "fused": True}
        trainer.opt_g = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], lr=optim.lr, **kw
        )
        trainer.opt_d = torch.optim.Adam(disc.parameters(), lr=optim.disc_lr, **kw)
    return trainer


def run_variant(v: Variant, args, model0, disc0, device, steps: int) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = v.tf32
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = make_trainer(v, model0, disc0, device, args.warmup)
    size, vocab = model0.cfg.image_size, len(model0.codebook)
    times, curve = [], []
    t_first = time.perf_counter()
    for s in range(steps):
        images, ids, scores = batch(s, args.batch, size, vocab, device, v.channels_last)
        t0 = time.perf_counter()
        m = trainer.step(images, ids, scores)  # returns floats: the step has finished on the device
        times.append(time.perf_counter() - t0)
        curve.append(
            {k: m[k] for k in ("loss/total", "loss/reconstruction", "loss/semantic", "loss/commitment")}
        )
        if s == 0:
            t_first = time.perf_counter() - t_first
    skip = min(args.skip, steps - 1)
    step_s = statistics.median(times[skip:])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    out = {
        "variant": v.name,
        "step_s": step_s,
        "images_per_s": args.batch / step_s,
        "first_step_s": t_first,
        "peak_gib": peak,
        "steps": steps,
        "curve": curve,
        "skipped_steps": trainer.skipped_steps,
    }
    print(
        f"{v.name:>28}: {step_s * 1e3:8.1f} ms/step  {args.batch / step_s:8.1f} img/s  peak {peak:6.2f} GiB  "
        f"first step {t_first:6.1f} s  final loss {curve[-1]['loss/total']:.4f}",
        flush=True,
    )
    del trainer
    gc.collect()
    return out


def count_flops(args, model0, disc0, device) -> float:
    """FLOPs of one training step (fp32 eager, chunked search so every GEMM is visible to the counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    os.environ["SPAE_FUSED_SEARCH"] = "0"
    trainer = make_trainer(Variant("count"), model0, disc0, device, args.warmup)
    images, ids, scores = batch(0, args.batch, model0.cfg.image_size, len(model0.codebook), device, False)
    with FlopCounterMode(display=False) as fc:
        trainer.step(images, ids, scores)
    os.environ.pop("SPAE_FUSED_SEARCH")
    del trainer
    return float(fc.get_total_flops())


def max_batch(v: Variant, args, model0, disc0, device) -> dict:
    """Doubling search for the largest batch whose step fits (2 steps each)."""
    fits, peak = 0, 0.0
    b = args.batch
    while b <= args.max_batch_limit:
        a = argparse.Namespace(**{**vars(args), "batch": b})
        try:
            r = run_variant(replace(v, name=f"{v.name} b={b}"), a, model0, disc0, device, steps=2)
            fits, peak = b, r["peak_gib"]
        except torch.cuda.OutOfMemoryError:
            print(f"batch {b}: out of memory", flush=True)
            break
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        b *= 2
    return {"largest_batch": fits, "peak_gib_at_largest": peak, "limit": args.max_batch_limit}


def curve_gap(a: list[dict], b: list[dict], key: str = "loss/total") -> dict:
    """How far two loss curves are apart: per-step relative gaps and the last-20-step means."""
    rel = [abs(x[key] - y[key]) / max(abs(x[key]), 1e-12) for x, y in zip(a, b, strict=True)]
    tail = min(20, len(a))
    ma = statistics.fmean(x[key] for x in a[-tail:])
    mb = statistics.fmean(x[key] for x in b[-tail:])
    return {
        "key": key,
        "median_rel_gap": statistics.median(rel),
        "max_rel_gap": max(rel),
        "tail_mean_base": ma,
        "tail_mean_fast": mb,
        "tail_rel_gap": abs(ma - mb) / max(abs(ma), 1e-12),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--steps", type=int, default=25, help="steps of the intermediate variants")
    ap.add_argument(
        "--curve-steps", type=int, default=200, help="steps of the baseline and the fastest variant"
    )
    ap.add_argument("--skip", type=int, default=5, help="steps left out of the median (warm-up, compile)")
    ap.add_argument("--compile-skip", type=int, default=8, help="steps of the compiled variant left out")
    ap.add_argument("--warmup", type=int, default=20, help="learning-rate warmup steps")
    ap.add_argument("--max-batch-limit", type=int, default=512)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.vocab, args.steps, args.curve_steps, args.skip = 2, 256, 2, 3, 1
        args.no_compile = True  # compiling costs a minute on the CPU
    device = pick_device(args.smoke)
    cuda = device.type == "cuda"
    print(f"device: {device_line(device)}", flush=True)
    model0, disc0 = build(args, device)
    print(
        f"model: {model0.cfg.image_size}px, pyramid {model0.cfg.pyramid.layer_sizes}, codebook "
        f"{tuple(model0.codebook.embeddings.shape)}, batch {args.batch}",
        flush=True,
    )

    base = run_variant(Variant("fp32"), args, model0, disc0, device, args.curve_steps)
    results = [base]
    fast = Variant("bf16+fadam+tf32", bf16=True, fused_adam=True, tf32=True)
    if cuda:
        results.append(run_variant(Variant("bf16", bf16=True), args, model0, disc0, device, args.steps))
    best = run_variant(fast, args, model0, disc0, device, args.curve_steps)  # the curve of the fast math
    results.append(best)

    gaps = {
        k: curve_gap(base["curve"], best["curve"], k)
        for k in ("loss/total", "loss/reconstruction", "loss/semantic")
    }
    for k, gp in gaps.items():
        print(
            f"curve {k}: median per-step rel gap {gp['median_rel_gap']:.2e}, max {gp['max_rel_gap']:.2e}; "
            f"last-20 mean {gp['tail_mean_base']:.4f} (fp32) vs {gp['tail_mean_fast']:.4f} "
            f"-> {gp['tail_rel_gap']:.2%}"
        )
    for s in range(0, len(base["curve"]), max(1, len(base["curve"]) // 10)):
        print(
            f"  step {s:4d}: fp32 {base['curve'][s]['loss/total']:.4f}   "
            f"fast {best['curve'][s]['loss/total']:.4f}"
        )
    print(
        f"RESULT train_step (eager): {best['variant']} {best['images_per_s']:.1f} img/s vs fp32 eager "
        f"{base['images_per_s']:.1f} img/s -> {base['step_s'] / best['step_s']:.2f}x",
        flush=True,
    )
    if cuda:
        cl = replace(fast, name=fast.name + "+cl", channels_last=True)
        results.append(run_variant(cl, args, model0, disc0, device, args.steps))
        if results[-1]["step_s"] < best["step_s"]:
            fast = cl
    if not args.no_compile:
        a = argparse.Namespace(**{**vars(args), "skip": args.compile_skip})
        comp = replace(fast, name=fast.name + "+compile", compile=True)
        results.append(run_variant(comp, a, model0, disc0, device, args.compile_skip + args.steps))
    top = min(results, key=lambda r: r["step_s"])

    record = {"bench": "train_step", "device": device_line(device), "batch": args.batch, "curve_gaps": gaps}
    flops = count_flops(args, model0, disc0, device) if cuda else 0.0
    if cuda:
        peak = peak_tflops(device)
        mb = max_batch(replace(fast, compile=False), args, model0, disc0, device)
        record.update(flops_per_step=flops, bf16_peak_tflops=peak, max_batch=mb)
        print(
            f"FLOPs per step (b={args.batch}): {flops / 1e12:.2f} TFLOP; "
            f"measured bf16 matmul peak {peak:.0f} TFLOP/s"
        )
        for r in results:
            r["achieved_tflops"] = flops / r["step_s"] / 1e12
            r["mfu"] = r["achieved_tflops"] / peak
            print(f"  {r['variant']:>28}: {r['achieved_tflops']:6.1f} TFLOP/s  MFU {r['mfu']:.1%}")
        print(
            f"largest batch that fits ({fast.name}, eager): {mb['largest_batch']} "
            f"(peak {mb['peak_gib_at_largest']:.1f} GiB; "
            f"tried up to {mb['limit']})"
        )
    speedup = base["step_s"] / top["step_s"]
    print(
        f"RESULT train_step: {top['variant']} {top['images_per_s']:.1f} img/s vs fp32 eager "
        f"{base['images_per_s']:.1f} img/s -> {speedup:.2f}x (goal >= 2.5x)"
    )
    record.update(results=results, speedup=speedup, fastest=top["variant"])
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
