"""Data-parallel scaling of the training step: 1 worker vs N workers on one host, per-GPU batch fixed.

The step is ``SPAETrainer.step`` with the trainer's defaults (bf16, fused Adam, TF32, compiled on
CUDA unless ``--compile off``) at the ``paper`` preset (``bench.train_step.build``). Workers are
processes started by ``torch.multiprocessing``; with more than one, ``torch.distributed`` (NCCL on
GPUs, gloo on the CPU) and the model and the discriminator wrapped in DDP with
``broadcast_buffers=False`` and ``gradient_as_bucket_view=True``, as the train job's
``ray.train.torch.prepare_model`` wraps them (one worker: no DDP, as there; ``--copy-grads``: DDP's
default gradient copy into the buckets). Each rank sees its own batches. Time: ``--steps`` steps
after ``--skip`` warm-up steps, between two barriers, metrics read every ``--read-every`` steps.
Prints images/s for 1 and N workers and the ratio (goal: >= 1.85x for 2 H100s).

    python -m bench.train_scaling [--workers 2] [--batch 16] [--steps 30] [--json out.json]
    python -m bench.train_scaling --smoke     # 2 CPU processes, gloo, tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import device_line, write_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, args: argparse.Namespace, port: int, out: str) -> None:
    try:
        _run_worker(rank, world, args, port, out)
    except Exception:  # the parent reads the file: say what broke instead of a bare exit code
        Path(f"{out}.rank{rank}.err").write_text(traceback.format_exc())
        raise


def _run_worker(rank: int, world: int, args: argparse.Namespace, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bench.train_step import Variant, batch, build, make_trainer

    cuda = not args.smoke and torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            **({"device_id": device} if cuda else {}),
        )
    model0, disc0 = build(args, torch.device("cpu"))  # same seed: the same weights on every rank
    v = Variant("defaults", fast=True, compile=args.compile == "on" or (args.compile == "auto" and cuda))
    trainer = make_trainer(v, model0, disc0, device, 20, rank=rank)  # compiles its modules in place
    if world > 1:  # as ray.train.torch.prepare_model wraps them (the optimizers hold the same parameters)
        ids = [rank] if cuda else None
        kw = {"broadcast_buffers": False, "gradient_as_bucket_view": not args.copy_grads}
        trainer.model = DDP(trainer.core, device_ids=ids, **kw)
        trainer.disc = DDP(trainer.disc, device_ids=ids, **kw)
    size, vocab = model0.cfg.image_size, len(model0.codebook)
    data = [batch(1000 * rank + s, args.batch, size, vocab, device, False) for s in range(args.data_batches)]

    def barrier() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world > 1:
            dist.barrier()

    t_first = time.perf_counter()
    for s in range(args.skip):
        m = trainer.step(*data[s % len(data)])
    m["loss/total"]  # noqa: B018
    barrier()
    warm_s = time.perf_counter() - t_first
    t0 = time.perf_counter()
    for s in range(args.steps):
        m = trainer.step(*data[s % len(data)])
        if (s + 1) % args.read_every == 0:
            m["loss/total"]  # noqa: B018  (a log step)
    barrier()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0
    if rank == 0:
        record = {
            "world": world,
            "device": device_line(device),
            "step_s": wall / args.steps,
            "images_per_s": world * args.batch * args.steps / wall,
            "warmup_s": warm_s,
            "peak_gib_rank0": peak,
            "final_loss_rank0": float(m["loss/total"]),
            "compiled": v.compile,
        }
        Path(out).write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


def run(world: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        port = _free_port()
        try:
            mp.start_processes(_worker, args=(world, args, port, out), nprocs=world, start_method="spawn")
        except Exception as exc:
            errs = "".join(p.read_text() for p in Path(tmp).glob("*.err"))
            raise RuntimeError(f"{world} worker(s) failed:\n{errs}") from exc
        record = json.loads(Path(out).read_text())
    print(
        f"{world} worker(s): {record['step_s'] * 1e3:7.1f} ms/step, {record['images_per_s']:8.1f} img/s "
        f"(per-GPU batch {args.batch}; warm-up {record['warmup_s']:.1f} s, "
        f"peak {record['peak_gib_rank0']:.1f} GiB)",
        flush=True,
    )
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="per worker")
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=4, help="warm-up steps (compilation) before the clock")
    ap.add_argument("--read-every", type=int, default=10)
    ap.add_argument("--data-batches", type=int, default=6)
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    ap.add_argument(
        "--copy-grads", action="store_true", help="DDP gradient_as_bucket_view=False (the train job: True)"
    )
    ap.add_argument("--no-ray", action="store_true", help="ignored (no Ray here; the smoke test passes it)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.workers, args.batch, args.vocab, args.steps, args.skip = 2, 2, 256, 2, 1
        args.read_every, args.data_batches, args.compile = 1, 2, "off"
    if not args.smoke and torch.cuda.device_count() < args.workers:
        raise SystemExit(f"--workers {args.workers} needs as many GPUs; {torch.cuda.device_count()} visible")
    one = run(1, args)
    many = run(args.workers, args)
    ratio = many["images_per_s"] / one["images_per_s"]
    print(
        f"RESULT train_scaling: {args.workers} workers {many['images_per_s']:.1f} img/s vs 1 worker "
        f"{one['images_per_s']:.1f} img/s -> {ratio:.2f}x (goal >= {0.925 * args.workers:.2f}x)",
        flush=True,
    )
    write_json(
        args.json,
        {
            "bench": "train_scaling",
            "batch_per_worker": args.batch,
            "gradient_as_bucket_view": not args.copy_grads,
            "results": [one, many],
            "ratio": ratio,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
