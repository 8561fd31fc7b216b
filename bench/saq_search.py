"""SAQ nearest-code search alone at the paper shape vs a bare matmul of the same shape.

Shape: ``images x 597`` positions (the paper pyramid 1+4+16+64+256+256) against a 65,536 x 768
codebook, bf16 operands, fp32 distances. FLOPs = 2 n v c. Variants:

- ``gemm``: the bare ``x @ E.T`` (bf16 out), the ceiling;
- ``chunked``: ``nearest_codes(..., fused=False)``, GEMM per chunk + fp32 distances + running min;
- ``fused``: ``nearest_codes(..., fused=True)``, the Triton kernel with the argmin in the epilogue.

Correctness: the fused ids are checked against the chunked search (same bf16 operands): the share of
identical ids and the largest gap between the distances each picked (near-ties may flip).

    python -m bench.saq_search [--images 64] [--json out.json]     # GPU
    python -m bench.saq_search --smoke                              # CPU, seconds
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.common import device_line, pick_device, time_fn, write_json
from spae.quantize import fused_search_available, nearest_codes

POSITIONS = 597  # 1 + 4 + 16 + 64 + 256 + 256


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.images, args.vocab, args.dim, args.chunk, args.reps = 2, 2048, 64, 512, 2
    device = pick_device(args.smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, v, c = args.images * POSITIONS, args.vocab, args.dim
    flops = 2.0 * n * v * c
    g = torch.Generator(device=device).manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(v, c, device=device, generator=g), dim=1).to(
        dtype
    )  # [v, c]
    x = (torch.randn(n, c, device=device, generator=g) / c**0.5).to(dtype)  # [n, c], |x| ~ |e|
    e_sq = e.float().pow(2).sum(1)  # [v]
    print(f"device: {device_line(device)}")
    print(
        f"shape: n={n} ({args.images} images x {POSITIONS}) v={v} c={c} {dtype}; "
        f"{flops / 1e12:.3f} TFLOP per search"
    )

    results: dict[str, dict[str, float]] = {}

    def record(name: str, fn) -> None:
        t = time_fn(fn, device, warmup=2, reps=args.reps)
        results[name] = {"seconds": t, "tflops": flops / t / 1e12, "images_per_s": args.images / t}
        print(
            f"{name:>8}: {t * 1e3:9.2f} ms  {flops / t / 1e12:8.1f} TFLOP/s  {args.images / t:10.0f} images/s"
        )

    record("gemm", lambda: x @ e.T)
    record("chunked", lambda: nearest_codes(x, e, args.chunk, e_sq, fused=False))
    check = {}
    if fused_search_available(x, e):
        record("fused", lambda: nearest_codes(x, e, args.chunk, e_sq, fused=True))
        ids_c, d_c = nearest_codes(x, e, args.chunk, e_sq, fused=False)
        ids_f, d_f = nearest_codes(x, e, args.chunk, e_sq, fused=True)
        from spae import quantize

        print(f"fused: autotuned config {getattr(quantize._argmin_tuned, 'best_config', None)}")
        check = {
            "same_ids": float((ids_c == ids_f).float().mean()),
            "max_dist_gap": float((d_c - d_f).abs().max()),
            "mean_dist": float(d_c.mean()),
        }
        print(
            f"check: fused ids equal chunked for {check['same_ids']:.4%} of rows; largest gap between picked "
            f"distances {check['max_dist_gap']:.2e} (mean distance {check['mean_dist']:.3f})"
        )
    else:
        print("fused: not available here (needs CUDA, triton and a bf16/fp16 table)")
    best = "fused" if "fused" in results else "chunked"
    ratio = results[best]["tflops"] / results["gemm"]["tflops"]
    print(
        f"RESULT saq_search: {best} {results[best]['tflops']:.1f} TFLOP/s vs bare GEMM "
        f"{results['gemm']['tflops']:.1f} TFLOP/s -> ratio {ratio:.2f} (goal >= 0.7); "
        f"chunked ratio {results['chunked']['tflops'] / results['gemm']['tflops']:.2f}"
    )
    write_json(
        args.json,
        {
            "bench": "saq_search",
            "device": device_line(device),
            "n": n,
            "v": v,
            "c": c,
            "results": results,
            "check": check,
            "ratio": ratio,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
