"""Where the time goes: ``torch.profiler`` tables of the training step and of ``encode`` (paper preset).

Prints, for each, the wall time per call, the summed GPU kernel time (the gap is launch/sync
overhead: the GPU waiting on the host) and the top kernels by GPU time. The step is the trainer's
CUDA defaults (bf16, fused Adam, TF32, no host sync), eager unless ``--compile``. Also times
``encode`` with a bf16 encoder in the default (channels-first) layout. ``bench.train_step --profile``
profiles its compiled step with ``profile_steps`` (no second compilation).

    python -m bench.profile_step [--batch 16] [--encode-batch 256] [--compile]
    python -m bench.profile_step --smoke
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import device_line, pick_device, sync, time_fn
from bench.tokenize_stage import build_tokenizer, encode_bf16
from bench.train_step import Variant, batch, build, make_trainer


def table(prof, device, wall: float, calls: int, rows: int) -> None:
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    events = prof.key_averages()
    gpu = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6 / calls
    print(
        f"wall {wall * 1e3:.1f} ms per call; GPU time (op and kernel rows both summed: about 2x the "
        f"kernel time) {gpu * 1e3:.1f} ms"
    )
    print(
        events.table(sort_by=key.replace("device", "self_device"), row_limit=rows, max_name_column_width=60)
    )


def profile_steps(trainer, data: list, device, rows: int = 18, warm: int = 3, steps: int = 3) -> dict:
    """Profile ``steps`` training steps after ``warm`` unprofiled ones; metrics read once, at the end (as
    a log step would). Prints the table; returns wall and GPU-busy ms per step."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for s in range(warm):
        trainer.step(*data[s % len(data)])
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for s in range(steps):
            m = trainer.step(*data[(warm + s) % len(data)])
        m["loss/total"]  # noqa: B018  (one log-step read)
        sync(device)
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    kernels = sum(getattr(e, "self_device_time_total", 0) for e in events if e.device_type.name == "CUDA")
    busy = kernels / 1e3 / steps
    print(
        f"wall {wall * 1e3:.1f} ms per step; GPU kernel time {busy:.1f} ms per step "
        f"({busy / wall / 1e3:.0%} busy)"
    )
    table(prof, device, wall, steps, rows)
    return {"wall_ms": wall * 1e3, "gpu_kernel_ms": busy}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--encode-batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--compile", action="store_true", help="profile the compiled step (the CUDA default)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.encode_batch, args.vocab, args.rows = 2, 2, 256, 5
    device = pick_device(args.smoke)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    print(f"device: {device_line(device)}")

    a = argparse.Namespace(batch=args.batch, vocab=args.vocab, dim=args.dim, smoke=args.smoke, warmup=20)
    model0, disc0 = build(a, device)
    v = Variant("bf16 compiled" if args.compile else "bf16 eager", fast=True, compile=args.compile)
    trainer = make_trainer(v, model0, disc0, device, 20)
    data = [batch(s, args.batch, model0.cfg.image_size, args.vocab, device, False) for s in range(6)]
    print(f"== training step, {v.name} (trainer defaults), batch {args.batch}")
    profile_steps(trainer, data, device, args.rows)
    del trainer

    t = argparse.Namespace(vocab=args.vocab, dim=args.dim, smoke=args.smoke)
    tok = build_tokenizer(t, device)
    size = tok.model.cfg.image_size
    images = torch.rand(args.encode_batch, 3, size, size, device=device)
    enc = time_fn(lambda: tok.encode(images), device, warmup=2, reps=5)
    bf = time_fn(lambda: encode_bf16(tok, images), device, warmup=2, reps=5)
    print(
        f"== encode, batch {args.encode_batch}: fp32 encoder {args.encode_batch / enc:.0f} img/s, "
        f"bf16 encoder (channels-first) {args.encode_batch / bf:.0f} img/s"
    )
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        tok.encode(images)
        sync(device)
        wall = time.perf_counter() - t0
    table(prof, device, wall, 1, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
