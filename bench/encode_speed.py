"""Bare ``SPAETokenizer.encode`` at the ``paper`` preset: encoder precision, ``torch.compile``, SAQ walk
and search kernel, in images/s, with the tokens of each variant compared with the fp32 reference.

Model: the paper preset with ``network.latent_dim=768`` and a random frozen 65,536 x 768 codebook
(random weights: same FLOPs), batch 256 of random images already on the device. Variants:

- ``before``: the encode of the first GPU measurement: fp32 eager encoder, the training forward's SAQ
  walk (``Quantizer.forward``: prefixes, commitment) and the first fused kernel
  (``quantizer.search=fused-tiled``);
- ``fp32 eager``: ``encode`` with ``EncodeOptions(compile=False)``: the lean walk (``walk_ids``) and the
  persistent kernel; its tokens are the reference the others are compared with (per layer);
- ``bf16 eager``, ``fp32 compiled``, ``bf16 compiled``: ``EncodeOptions(dtype=..., compile=...)``;
- ``fp32 eager, no TF32`` (tokens only): the noise floor of the reference itself, its convolutions in
  full fp32 instead of cuDNN's default TF32.

Then the parts: the encoder alone per option, the lean walk alone and the training walk alone on one z.

    python -m bench.encode_speed [--batch 256] [--json out.json]      # GPU
    python -m bench.encode_speed --smoke                               # CPU, seconds
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.common import device_line, pick_device, time_fn, write_json
from bench.tokenize_stage import search_as, tokenizer_and_images  # the paper preset, random codebook
from spae.tokenizer import EncodeOptions, SPAETokenizer


@torch.no_grad()
def encode_before(tok: SPAETokenizer, images: torch.Tensor) -> list[torch.Tensor]:
    """The encode measured first: fp32 encoder, the training walk, the tiled fused kernel (on CUDA; the
    chunked search elsewhere)."""
    with search_as(tok, tiled_search(tok.device)):
        z = tok.model.encode_latent(images)
        return [k.cpu() for k in tok.model.quantizer(z).ids]


def tiled_search(device: torch.device) -> str:
    """The first fused kernel where the fused search runs (CUDA), else the chunked search."""
    return "fused-tiled" if device.type == "cuda" else "chunked"


def top_kernels(fn, device: torch.device, rows: int = 14) -> list[dict]:
    """torch.profiler over two calls of ``fn``: the kernels with the most device time (ms per call)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            fn()
        torch.cuda.synchronize(device)
    from torch.autograd import DeviceType

    averages = list(prof.key_averages())
    kernels = [e for e in averages if getattr(e, "device_type", None) == DeviceType.CUDA]
    events = [  # the kernels only: an op (aten::...) and the kernels it launched would count twice
        (e.key, getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0), e.count)
        for e in (kernels or averages)
    ]
    events = [e for e in events if e[1] > 0]
    total = sum(e[1] for e in events)
    out = [
        {"kernel": k[:90], "ms_per_call": us / 2e3, "share": us / total, "calls": n // 2}
        for k, us, n in sorted(events, key=lambda e: -e[1])[:rows]
    ]
    print(f"  device time per call {total / 2e3:.2f} ms; top kernels:")
    for r in out:
        print(f"  {r['ms_per_call']:8.2f} ms {r['share']:6.1%} x{r['calls']:<4} {r['kernel']}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    ap.add_argument("--only", default=None, help="comma-separated variants to run (default: all)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled variants")
    ap.add_argument("--no-parts", action="store_true", help="skip the encoder-only / walk-only timings")
    ap.add_argument("--profile", action="store_true", help="top kernels of fp32 eager and the fastest")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.smoke:
        args.batch, args.vocab, args.reps = 4, 256, 2
    device = pick_device(args.smoke)
    tok, images = tokenizer_and_images(args, device, ", cudnn.benchmark on" if args.cudnn_benchmark else "")
    results: dict[str, dict] = {}

    def record(name: str, fn) -> None:
        t = time_fn(fn, device, warmup=2, reps=args.reps)
        results.setdefault(name, {}).update(seconds_per_batch=t, images_per_s=args.batch / t)
        print(f"{name:>28}: {args.batch / t:9.0f} images/s  ({t * 1e3:7.2f} ms / batch)", flush=True)

    def agree(name: str, ids: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
        same = [float((a == b).float().mean()) for a, b in zip(ids, ref, strict=True)]
        results.setdefault(name, {})["same_tokens_per_layer"] = same
        print(f"{'':>28}  tokens equal fp32 eager per layer: " + " ".join(f"{a:.4f}" for a in same))

    backend, mode = ("aot_eager" if args.smoke else "inductor"), args.compile_mode
    suffix = f" ({mode})" if mode else ""
    options = {
        "fp32 eager": EncodeOptions(),
        "bf16 eager": EncodeOptions(dtype="bfloat16"),
    }
    if not args.no_compile:
        options["fp32 compiled" + suffix] = EncodeOptions(
            compile=True, compile_backend=backend, compile_mode=mode
        )
        options["bf16 compiled" + suffix] = EncodeOptions(
            dtype="bfloat16", compile=True, compile_backend=backend, compile_mode=mode
        )
    only = set(args.only.split(",")) if args.only else None
    run_all = only is None

    def run_with(opts: EncodeOptions):
        tok.encode_options = opts
        return tok.encode(images).ids

    ref = run_with(EncodeOptions())  # fp32 eager (the default options): the reference tokens
    if run_all:
        record("before", lambda: encode_before(tok, images))
        agree("before", encode_before(tok, images), ref)
    if run_all and device.type == "cuda":  # the reference's own noise floor: convolutions in full fp32
        torch.backends.cudnn.allow_tf32 = False
        noise = run_with(EncodeOptions())
        torch.backends.cudnn.allow_tf32 = True
        print("fp32 eager, no TF32 convolutions (tokens only):")
        agree("fp32 eager, no TF32", noise, ref)
    for name, opts in options.items():
        if only is not None and name not in only:
            continue
        t0 = time.perf_counter()
        ids = run_with(opts)  # first call: compiles when asked
        first = time.perf_counter() - t0
        record(name, lambda opts=opts: run_with(opts))
        results[name]["first_call_s"] = first
        agree(name, ids, ref)
        print(f"{'':>28}  first call {first:.1f} s")

    timed = [k for k in options if "images_per_s" in results.get(k, {})]
    fastest = max(timed, key=lambda k: results[k]["images_per_s"])
    if not args.no_parts:  # the parts: encoder alone per option, walks alone on one z
        for name in timed:
            tok.encode_options = options[name]
            record(f"encoder only, {name}", lambda: tok._encode_latent(images))
        with torch.no_grad():
            z = tok.model.encode_latent(images)
            q = tok.model.quantizer
            record("lean walk + search", lambda: q.encode_ids(z))
            record("training walk + search", lambda: q(z).ids)
            with search_as(tok, tiled_search(device)):
                record("training walk, tiled kernel", lambda: q(z).ids)
    if args.profile and device.type == "cuda":
        for name in dict.fromkeys(["fp32 eager", fastest]):
            print(f"profile: encode, {name}")
            results[name]["top_kernels"] = top_kernels(lambda name=name: run_with(options[name]), device)
    tok.encode_options = EncodeOptions()

    base = results.get("before", results[timed[0]])["images_per_s"]
    print(
        f"RESULT encode_speed: fastest {fastest} {results[fastest]['images_per_s']:.0f} img/s"
        + (f", fp32 eager {results['fp32 eager']['images_per_s']:.0f} img/s" if "fp32 eager" in timed else "")
        + f" vs before {base:.0f} img/s ({results[fastest]['images_per_s'] / base:.2f}x; goal >= 5,000 img/s)"
    )
    write_json(
        args.json,
        {"bench": "encode_speed", "device": device_line(device), "batch": args.batch, "results": results},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
