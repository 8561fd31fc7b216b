"""Nearest-code search: ``argmin_k ||x - e(k)||^2`` for every row of x, ties to the lowest row.

``nearest_codes`` is a chunked GEMM with a running minimum (any device, any dtype) or, on CUDA, one
fused Triton kernel (``spae.quantize.kernels``); ``search`` (``QuantizerConfig.search``) picks:

- ``auto``: the fused persistent kernel where it can run (CUDA, triton, a bf16/fp16 table, c % 32 == 0),
  else the chunked GEMM;
- ``chunked``: always the chunked GEMM;
- ``fused`` / ``fused-tiled``: the persistent / the first (tiled) kernel; where it cannot run this is
  an error (never a silent fallback: an explicit choice is what a benchmark measures).

All choose the same row wherever the distances are exact; the fused kernels accumulate in another
order than the chunked GEMM, so a near-tie in bf16 can differ.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from spae.quantize.kernels import fused_nearest_codes, fused_search_available

Search = Literal["auto", "chunked", "fused", "fused-tiled"]
SEARCHES: tuple[str, ...] = get_args(Search)


def fused_kernel(search: str, x: Tensor, codebook: Tensor) -> Literal["persistent", "tiled"] | None:
    """The fused kernel ``search`` takes for x [n, c] and codebook [v, c] (same dtype), or None for the
    chunked GEMM. ``fused`` / ``fused-tiled`` where the kernel cannot run: a ValueError saying why."""
    if search not in SEARCHES:
        raise ValueError(f"quantizer.search {search!r} is not one of {', '.join(map(repr, SEARCHES))}")
    if search == "chunked":
        return None
    available = fused_search_available(x, codebook)
    if search == "auto":
        return "persistent" if available else None
    if not available:
        dtype = str(codebook.dtype).removeprefix("torch.")
        raise ValueError(
            f"quantizer.search={search!r} needs the fused Triton kernel, which cannot run here: it needs "
            f"triton, CUDA tensors, a bfloat16/float16 table (quantizer.search_dtype) and a codebook dim "
            f"divisible by 32; got {codebook.device.type} tensors, a {dtype} table of dim "
            f"{codebook.shape[1]}. Use search='auto' (fused where it can run) or 'chunked'"
        )
    return "persistent" if search == "fused" else "tiled"


@torch.no_grad()
def nearest_codes(
    x: Tensor,
    codebook: Tensor,
    chunk: int = 8192,
    codebook_sq: Tensor | None = None,
    max_elements: int = 1 << 26,
    search: Search = "auto",
) -> tuple[Tensor, Tensor]:
    """argmin_k ||x - e(k)||^2 for every row of ``x``.

    x [n, c], codebook [v, c] -> (ids [n] int64, squared distances [n]).
    GEMM form ``||x||^2 - 2 x.e + ||e||^2``, over chunks of ``chunk`` codebook rows with a running
    minimum, so no [n, v] score matrix for the whole ``v`` and never [n, v, c]; rows of ``x`` are also
    blocked so one score block holds at most ``max_elements`` values. The GEMM runs in the codebook's
    dtype (e.g. bf16 on GPU); ``||e||^2``, the scores and the minimum are kept in at least fp32.
    ``codebook_sq`` [v]: precomputed ``||e||^2`` (fp32) to skip recomputing it. Ties: lowest row.
    ``search``: the chunked GEMM or a fused kernel (the module docstring).
    """
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest_codes: expected x [n, c] and codebook [v, c], got {tuple(x.shape)} and "
            f"{tuple(codebook.shape)}"
        )
    n, v = x.shape[0], codebook.shape[0]
    acc = torch.promote_types(codebook.dtype, torch.float32)
    x = x.detach().to(codebook.dtype)
    if codebook_sq is None:
        codebook_sq = codebook.to(acc).pow(2).sum(1)  # [v]
    codebook_sq = codebook_sq.to(acc)
    x_sq = x.to(acc).pow(2).sum(1)  # [n]
    kernel = fused_kernel(search, x, codebook)
    if kernel is not None and n:
        best, ids = fused_nearest_codes(x, codebook, codebook_sq, kernel=kernel)  # [n] each
        return ids, (best + x_sq).clamp_min(0)
    ids = torch.zeros(n, dtype=torch.long, device=x.device)
    best = torch.full((n,), float("inf"), dtype=acc, device=x.device)
    rows = max(1, max_elements // max(1, min(chunk, v)))
    for r0 in range(0, n, rows):
        xr = x[r0 : r0 + rows]  # [nr, c]
        best_r, ids_r = best[r0 : r0 + rows], ids[r0 : r0 + rows]  # views, updated in place
        for v0 in range(0, v, chunk):
            scores = (xr @ codebook[v0 : v0 + chunk].T).to(acc)  # [nr, vc]
            dist = codebook_sq[v0 : v0 + chunk].unsqueeze(0) - 2.0 * scores  # ||x||^2 added at the end
            d_min, i_min = dist.min(1)  # first minimum within the chunk
            better = d_min < best_r  # strict: earlier chunks win ties
            best_r.copy_(torch.where(better, d_min, best_r))
            ids_r.copy_(torch.where(better, i_min + v0, ids_r))
    return ids, (best + x_sq).clamp_min(0)


def nearest_ids(x: Tensor, table: Tensor, chunk: int, sq: Tensor, search: Search = "auto") -> Tensor:
    """``nearest_codes(x, table, chunk, sq, search=search)[0]`` without the distances (the fused path
    skips the ||x||^2 pass). x [n, c], table [v, c], sq [v] -> ids [n] int64."""
    xs = x.to(table.dtype)
    kernel = fused_kernel(search, xs, table)
    if x.shape[0] and kernel is not None:
        return fused_nearest_codes(xs, table, sq, kernel=kernel)[1]
    return nearest_codes(x, table, chunk, sq, search="chunked")[0]
