"""The SPAE training step at the ``paper`` preset: the trainer's defaults vs plain fp32 eager, same run.

Model: 128x128 images, the 6-layer pyramid (597 tokens), a random frozen 65,536 x 768 codebook
(``network.latent_dim=768``), discriminator on (GAN + LeCAM), semantic loss on layers 1-5, no
perceptual loss (it needs VGG weights). ``SPAETrainer.step`` exactly as the train job calls it.

Variants, at every batch size of ``--batches`` (each from the same initial weights, the same batches
and the same target-sampling seed; batches are on the device before the clock starts):

- ``fp32``: the baseline: ``amp_dtype=None``, fp32 nearest-code search, full-fp32 matmuls
  (``set_float32_matmul_precision("highest")``; cuDNN may still use TF32 convolutions, PyTorch's
  default), the default (foreach) Adam, no compile; metrics read every ``--read-every`` steps;
- ``fp32 read/step``: the same, reading the metrics after every step (what the train loop paid
  before the step went sync-free: at least one host sync per step);
- ``bf16 eager``: the trainer's CUDA defaults without compile: bf16 autocast, bf16 fused search,
  fused Adam with the device-side NaN guard, TF32 matmuls, no host sync in the step;
- ``bf16 compiled``: the trainer's CUDA defaults (``OptimConfig.compile="auto"``): + ``torch.compile``
  of the encoder, decoder and discriminator;
- ``... +cl`` (``--channels-last``): + channels-last activations and weights (compiled;
  ``OptimConfig.channels_last="on"``);
- ``fp32 perturbed`` (for the loss curves only): the baseline again with every initial weight
  multiplied by ``1 + 1e-6 N(0, 1)``: how far two fp32 runs drift apart from a rounding-sized difference
  (the GAN game amplifies any perturbation), the floor the bf16 curve is judged against.

``--variants`` keeps only the named variants (comma-separated names as printed).

A step's time is the wall time of ``--steps`` steps after ``--skip`` warm-up steps, device
synchronised at both ends, divided by the steps (metrics read every ``--read-every`` steps, as the
train job reads them on log steps). The baseline, the compiled variant and ``fp32 perturbed`` run
``--curve-steps`` steps at the first batch size and their loss curves are compared. Also: host syncs
left in one step (``torch.cuda.set_sync_debug_mode``), FLOPs (``torch.utils.flop_counter``) and MFU
over the measured bf16 matmul peak, and with ``--profile`` a ``torch.profiler`` table of the compiled
step.

    python -m bench.train_step [--batches 16,64] [--curve-steps 200] [--profile] [--json out.json]
    python -m bench.train_step --smoke
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace

import torch

from bench.common import device_line, peak_tflops, pick_device, random_codebook, smooth_images, write_json
from spae.losses import LossConfig, loss_preset
from spae.model import SPAE, preset
from spae.networks import Discriminator, NetworkConfig
from spae.training import OptimConfig, SPAETrainer

CURVE_KEYS = ("loss/total", "loss/reconstruction", "loss/semantic", "loss/commitment")


@dataclass(frozen=True)
class Variant:
    name: str
    fast: bool = False  # the trainer's CUDA defaults: bf16 autocast + bf16 search, fused Adam, TF32
    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    read_every_step: bool = False
    perturb: float = 0.0  # > 0: initial weights x (1 + perturb N(0, 1)), the fp32 noise floor
    search: str = "auto"  # QuantizerConfig.search: "chunked" keeps every GEMM visible to a FLOP counter


def build(args, device) -> tuple[SPAE, Discriminator]:
    """The paper-preset model (or a tiny one for --smoke), fp32 on the CPU, seeded."""
    torch.manual_seed(0)
    if args.smoke:
        cfg = preset("tiny")
        codebook = random_codebook(args.vocab, cfg.network.latent_dim)
    else:
        base = preset("paper")
        cfg = replace(base, network=NetworkConfig.preset("paper", latent_dim=args.dim))
        codebook = random_codebook(args.vocab, args.dim)
    model = SPAE(cfg, codebook)
    disc = Discriminator(cfg.network, cfg.image_channels, cfg.image_size)
    model.match_latent_to_codebook(smooth_images(8, cfg.image_size, 12345, torch.device("cpu")))
    return model, disc


def loss_config(model: SPAE) -> LossConfig:
    """The loss of the preset ``build`` took: ``tiny`` (--smoke, 16px images) or ``paper``."""
    return loss_preset("tiny" if model.cfg.image_size == preset("tiny").image_size else "paper")


def batch(step: int, b: int, size: int, vocab: int, device, channels_last: bool):
    images = smooth_images(b, size, step, device)  # [b, 3, H, W]
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(10_000 + step)
    k = 32
    ids = torch.randint(0, vocab, (b, k), generator=g)  # [b, k] pool candidates
    scores = torch.sort(torch.rand(b, k, generator=g), dim=1, descending=True).values
    scores[:, 0] = 1.0  # eq. 6 normalises the best candidate to 1
    return images, ids.to(device), scores.to(device)


def make_trainer(
    v: Variant, model0: SPAE, disc0: Discriminator, device, lr_warmup: int, rank: int = 0
) -> SPAETrainer:
    """A trainer on copies of the weights. ``fast``: the trainer's defaults for ``device``; else the fp32
    baseline (no autocast, fp32 search, full-fp32 matmuls, foreach Adam)."""
    model = copy.deepcopy(model0)
    dtype = "bfloat16" if v.fast else "float32"
    qcfg = replace(model.cfg.quantizer, search_dtype=dtype, search=v.search)
    model.cfg = replace(model.cfg, quantizer=qcfg)
    model.quantizer.cfg = qcfg
    disc = copy.deepcopy(disc0)
    if v.perturb:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in [*model.parameters(), *disc.parameters()]:
                if p.requires_grad:
                    p.mul_(1 + v.perturb * torch.randn(p.shape, generator=g))
    model, disc = model.to(device), disc.to(device)
    if not v.fast:
        torch.set_float32_matmul_precision("highest")
    optim = OptimConfig(
        warmup_steps=lr_warmup,
        compile="on" if v.compile else "off",
        compile_mode=v.compile_mode,
        tf32="on" if v.fast else "off",
        channels_last="on" if v.channels_last else "off",
    )
    amp = "auto" if v.fast else None
    trainer = SPAETrainer(model, disc, loss_config(model), optim, device, amp_dtype=amp, seed=0, rank=rank)
    if not v.fast:  # PyTorch's default Adam (foreach): the plain baseline
        kw = {"betas": optim.betas, "weight_decay": optim.weight_decay, "foreach": True}
        params = [p for p in model.parameters() if p.requires_grad]
        trainer.opt_g = torch.optim.Adam(params, lr=optim.lr, **kw)
        trainer.opt_d = torch.optim.Adam(disc.parameters(), lr=optim.disc_lr, **kw)
    return trainer


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer: SPAETrainer, data: list, steps: int, skip: int, read_every: int, device) -> dict:
    """Wall time of steps ``skip..steps-1`` (synchronised at both ends), the first step's time (compile
    included) and every step's metrics (read after the clock stops, except every ``read_every``-th)."""
    metrics = []
    sync(device)
    t_start = time.perf_counter()
    t0 = t_start
    first = 0.0
    for s in range(steps):
        if s == skip:
            sync(device)
            t0 = time.perf_counter()
        m = trainer.step(*data[s % len(data)])
        metrics.append(m)
        if s == 0:
            m["loss/total"]  # noqa: B018  (reads: the first step has finished)
            first = time.perf_counter() - t_start
        elif read_every and (s + 1) % read_every == 0:
            m["loss/total"]  # noqa: B018  (a log step reads its metrics: one host sync)
    sync(device)
    wall = time.perf_counter() - t0
    return {"step_s": wall / max(1, steps - skip), "first_step_s": first, "metrics": metrics}


def run_variant(v: Variant, args, b: int, model0, disc0, device, steps: int, keep=False) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = make_trainer(v, model0, disc0, device, args.warmup)
    size, vocab = model0.cfg.image_size, len(model0.codebook)
    data = [batch(s, b, size, vocab, device, v.channels_last) for s in range(min(steps, args.data_batches))]
    skip = min(args.compile_skip if v.compile else args.skip, steps - 1)
    r = timed_steps(trainer, data, steps, skip, 1 if v.read_every_step else args.read_every, device)
    curve = [{k: m[k] for k in CURVE_KEYS} for m in r["metrics"]]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    out = {
        "variant": v.name,
        "batch": b,
        "step_s": r["step_s"],
        "images_per_s": b / r["step_s"],
        "first_step_s": r["first_step_s"],
        "peak_gib": peak,
        "steps": steps,
        "timed_steps": steps - skip,
        "curve": curve,
        "skipped_steps": trainer.skipped_steps,
    }
    print(
        f"b={b:4d} {v.name:>22}: {r['step_s'] * 1e3:8.1f} ms/step  {out['images_per_s']:8.1f} img/s  "
        f"peak {peak:6.2f} GiB  first step {r['first_step_s']:6.1f} s  "
        f"final loss {curve[-1]['loss/total']:.4f}",
        flush=True,
    )
    if keep:
        out["trainer"], out["data"] = trainer, data
    else:
        del trainer, data
        gc.collect()
    return out


def count_syncs(trainer: SPAETrainer, data: list, device) -> dict[str, int]:
    """Host syncs in one step (metrics not read), by the Python line that asked (CUDA only)."""
    if device.type != "cuda":
        return {}
    sync(device)
    where: collections.Counter[str] = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step(*data[0])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
    sync(device)
    return dict(where)


def count_flops(args, b: int, model0, disc0, device) -> float:
    """FLOPs of one training step (fp32 eager, chunked search so every GEMM is visible to the counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    trainer = make_trainer(Variant("count", search="chunked"), model0, disc0, device, args.warmup)
    images, ids, scores = batch(0, b, model0.cfg.image_size, len(model0.codebook), device, False)
    with FlopCounterMode(display=False) as fc:
        trainer.step(images, ids, scores)["loss/total"]  # noqa: B018
    del trainer
    return float(fc.get_total_flops())


def max_batch(v: Variant, args, model0, disc0, device) -> dict:
    """Doubling search for the largest batch whose step fits (2 steps each)."""
    fits, peak = 0, 0.0
    b = args.batches[0]
    while b <= args.max_batch_limit:
        try:
            r = run_variant(replace(v, name=f"{v.name} (fit)"), args, b, model0, disc0, device, steps=2)
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


def report_curves(base: dict, other: dict) -> dict:
    """Print and return how far ``other``'s loss curves are from the fp32 baseline's."""
    n = min(len(base["curve"]), len(other["curve"]))
    gaps = {k: curve_gap(base["curve"][:n], other["curve"][:n], k) for k in CURVE_KEYS[:3]}
    for k, gp in gaps.items():
        print(
            f"curve {k}, fp32 vs {other['variant']} ({n} steps): median per-step rel gap "
            f"{gp['median_rel_gap']:.2e}, max {gp['max_rel_gap']:.2e}; last-{min(20, n)} mean "
            f"{gp['tail_mean_base']:.4f} vs {gp['tail_mean_fast']:.4f} -> {gp['tail_rel_gap']:.2%}"
        )
    for s in range(0, n, max(1, n // 6)):
        a, b = base["curve"][s]["loss/total"], other["curve"][s]["loss/total"]
        print(f"  step {s:4d}: fp32 {a:.4f}   {other['variant']} {b:.4f}")
    return gaps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="16,64", help="comma-separated batch sizes; each gets every variant")
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--steps", type=int, default=30, help="steps per variant (warm-up included)")
    ap.add_argument("--curve-steps", type=int, default=200, help="steps of the curves, first batch")
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the timing")
    ap.add_argument("--compile-skip", type=int, default=4, help="warm-up steps of compiled variants")
    ap.add_argument("--read-every", type=int, default=10, help="metrics read every N steps (a log step)")
    ap.add_argument("--data-batches", type=int, default=10, help="distinct batches cycled through")
    ap.add_argument("--warmup", type=int, default=20, help="learning-rate warmup steps")
    ap.add_argument("--max-batch-limit", type=int, default=0, help="> 0: doubling search for the largest")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--channels-last", action="store_true", help="also a compiled channels-last variant")
    ap.add_argument("--compile-modes", default="", help="also compiled variants in these torch.compile modes")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of the compiled step")
    ap.add_argument("--variants", default="", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.batches, args.vocab, args.steps, args.curve_steps, args.skip = "2", 256, 3, 4, 1
        args.compile_skip, args.read_every = 1, 2
        args.no_compile = True  # compiling costs minutes on the CPU
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.compile_modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    device = pick_device(args.smoke)
    cuda = device.type == "cuda"
    print(f"device: {device_line(device)}", flush=True)
    model0, disc0 = build(args, device)
    print(
        f"model: {model0.cfg.image_size}px, pyramid {model0.cfg.pyramid.layer_sizes}, codebook "
        f"{tuple(model0.codebook.embeddings.shape)}, batches {args.batches}",
        flush=True,
    )
    record: dict = {"bench": "train_step", "device": device_line(device), "batches": args.batches}
    results, ratios, gaps, syncs = [], {}, {}, {}
    wanted = {n.strip() for n in args.variants.split(",") if n.strip()}

    def want(name: str) -> bool:
        return not wanted or name in wanted

    for i, b in enumerate(args.batches):
        n_curve = args.curve_steps if i == 0 else args.steps
        base = run_variant(Variant("fp32"), args, b, model0, disc0, device, n_curve)
        rows = [base]
        if want("fp32 read/step"):
            v = Variant("fp32 read/step", read_every_step=True)
            rows.append(run_variant(v, args, b, model0, disc0, device, args.steps))
        if want("bf16 eager") or args.no_compile:
            rows.append(
                run_variant(Variant("bf16 eager", fast=True), args, b, model0, disc0, device, args.steps)
            )
        best = rows[-1]
        if not args.no_compile:
            comp = Variant("bf16 compiled", fast=True, compile=True)
            if want(comp.name):
                best = run_variant(comp, args, b, model0, disc0, device, n_curve, keep=True)
                rows.append(best)
        if i == 0:
            floor = None
            if want("fp32 perturbed"):
                v = Variant("fp32 perturbed", perturb=1e-6)
                floor = run_variant(v, args, b, model0, disc0, device, n_curve)
            gaps = {"fast": report_curves(base, best)}
            if floor is not None:
                gaps["floor"] = report_curves(base, floor)
                record["noise_floor_run"] = floor  # the baseline's timing again: not a table row
            write_json(args.json, {**record, "partial": True, "results": results + rows, "curve_gaps": gaps})
        if not args.no_compile:
            extra = [replace(comp, name=f"{comp.name} ({m})", compile_mode=m) for m in args.compile_modes]
            if args.channels_last:
                extra.append(replace(comp, name=comp.name + " +cl", channels_last=True))
            for v in extra:
                if want(v.name):
                    try:
                        rows.append(run_variant(v, args, b, model0, disc0, device, args.steps))
                    except Exception as exc:  # an experiment that fails is reported, not fatal
                        print(
                            f"b={b:4d} {v.name:>22}: failed: {type(exc).__name__}: {exc}"[:2000], flush=True
                        )
        if i == 0 and "trainer" in best:
            syncs = count_syncs(best["trainer"], best["data"], device)
            print(f"host syncs in one {best['variant']} step (metrics not read): {syncs or 'none'}")
            if args.profile and cuda:
                from bench.profile_step import profile_steps

                print(f"== profile: {best['variant']}, batch {b}")
                profile_steps(best["trainer"], best["data"], device, rows=25)
        for r in rows:
            r.pop("trainer", None), r.pop("data", None)
        gc.collect()
        fp32 = [r for r in rows if r["variant"].startswith("fp32")]
        ref = min(fp32, key=lambda r: r["step_s"])  # the faster of the fp32 reading policies
        top = min((r for r in rows if not r["variant"].startswith("fp32")), key=lambda r: r["step_s"])
        ratios[b] = {
            "fastest": top["variant"],
            "speedup": ref["step_s"] / top["step_s"],
            "baseline": ref["variant"],
        }
        print(
            f"RESULT train_step b={b}: {top['variant']} {top['images_per_s']:.1f} img/s vs {ref['variant']} "
            f"eager {ref['images_per_s']:.1f} img/s -> {ratios[b]['speedup']:.2f}x (goal >= 2.5x)",
            flush=True,
        )
        results += rows
    if cuda:
        flops16 = count_flops(args, args.batches[0], model0, disc0, device) / args.batches[0]  # per image
        peak = peak_tflops(device)
        record.update(flops_per_image=flops16, bf16_peak_tflops=peak)
        print(f"FLOPs per image: {flops16 / 1e9:.1f} GFLOP; measured bf16 matmul peak {peak:.0f} TFLOP/s")
        for r in results:
            r["achieved_tflops"] = flops16 * r["images_per_s"] / 1e12
            r["mfu"] = r["achieved_tflops"] / peak
            print(
                f"  b={r['batch']:4d} {r['variant']:>22}: {r['achieved_tflops']:6.1f} TFLOP/s  "
                f"MFU {r['mfu']:.1%}"
            )
        if args.max_batch_limit:
            record["max_batch"] = max_batch(Variant("bf16 eager", fast=True), args, model0, disc0, device)
    b0 = args.batches[0]
    speedup = ratios[b0]["speedup"]
    print(f"RESULT train_step: {ratios[b0]['fastest']} at batch {b0}: {speedup:.2f}x the fp32 eager step")
    record.update(results=results, ratios=ratios, speedup=speedup, curve_gaps=gaps, host_syncs=syncs)
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
