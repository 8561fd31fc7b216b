"""The fused nearest-code search on CUDA: Triton kernels that do the GEMM and the argmin in one pass.

x [n, c] (bf16/fp16), codebook [v, c] (same dtype), ``||e||^2`` [v] fp32 -> per row of x the minimum of
``||e||^2 - 2 x.e`` (fp32; the caller adds ``||x||^2``) and its codebook row (ties: the lowest row).
``spae.quantize.search.nearest_codes`` dispatches here (``QuantizerConfig.search``).

Two Triton kernels do the bf16 GEMM with fp32 accumulation and ``||e||^2 - 2 x.e`` with its
min/argmin in the epilogue, so the [n, v] scores never reach memory:

- ``persistent`` (the default, ``search="fused"``): one program per SM walks ONE flattened loop over
  (work unit, codebook tile, k step); the tile's epilogue runs under ``if k == last``, so the loads of
  the next tile are already in flight while the argmin of this one is reduced, and the pipeline never
  drains between tiles. A work unit is (BM rows of x, a contiguous slice of codebook tiles); the number
  of slices is picked so the units spread evenly over the programs (no partial last wave, ``plan_units``).
  Each unit writes its (distance, row) as one int64 whose order is (distance, row), so the per-slice
  results combine with one ``min`` and ties go to the lowest row exactly, whatever the split.
- ``tiled`` (the first version, kept for comparison, ``search="fused-tiled"``): a grid of (row block,
  split) programs, each looping over its codebook tiles with a K loop inside (the pipeline refills on
  every tile).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

try:  # triton ships with CUDA builds of torch; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds
    triton = None


def fused_search_available(x: Tensor, codebook: Tensor) -> bool:
    """True when the fused kernels can run on these operands: triton, CUDA tensors, a bf16/fp16 table,
    c a multiple of 32 and int32 offsets."""
    return (
        triton is not None
        and x.is_cuda
        and codebook.is_cuda
        and codebook.dtype in (torch.bfloat16, torch.float16)
        and codebook.shape[1] % 32 == 0
        and codebook.numel() < 2**31  # int32 offsets in the kernel
    )


@dataclass(frozen=True)
class FusedSearchConfig:
    """Tile and launch shape of the persistent kernel: BM rows of x x BN codebook rows per tile, BK per
    k step; ``tma``: load tiles through Hopper's tensor-memory-accelerator descriptors;
    ``programs_per_sm``: resident programs per SM (the grid is SMs x this)."""

    bm: int = 128
    bn: int = 256
    bk: int = 64
    warps: int = 8
    stages: int = 3
    tma: bool = False
    programs_per_sm: int = 1


# the default on CUDA, picked from ``bench/saq_search.py --sweep`` on an H100 (docs/BENCHMARKS.md):
# 0.90-0.92 of a bare cuBLAS GEMM of the same shape; the same tile with pointer loads 0.71-0.75, the
# tiled kernel 0.52-0.54. On GPUs before Hopper (no TMA) the same tile runs with pointer loads.
FUSED_SEARCH = FusedSearchConfig(tma=True)

if triton is not None:

    @triton.jit
    def _argmin_persistent_kernel(
        x_src, e_src, esq_ptr, out_ptr, n, v, num_m, num_units, tiles_per_unit,
        K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        NUM_PROGS: tl.constexpr, TMA: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        KT: tl.constexpr = K // BK  # k steps per tile
        my_units = tl.cdiv(num_units - pid, NUM_PROGS)  # units pid, pid + P, pid + 2P, ...
        steps = my_units * tiles_per_unit * KT
        rk = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], tl.float32)
        best = tl.full([BM], float("inf"), tl.float32)
        best_i = tl.zeros([BM], tl.int32)
        for step in range(steps):  # ONE loop over (unit, tile, k): the pipeline runs across tiles
            ki = step % KT
            tile = step // KT
            tj = tile % tiles_per_unit
            u = pid + (tile // tiles_per_unit) * NUM_PROGS  # units in m-fastest order: programs that
            m0 = (u % num_m) * BM  # run together read the same codebook tiles (L2 reuse)
            s = u // num_m  # codebook slice of this unit
            v0 = (s * tiles_per_unit + tj) * BN
            k0 = ki * BK
            if TMA:
                a = x_src.load([m0, k0])  # [BM, BK], zero-filled past n
                b = e_src.load([v0, k0])  # [BN, BK], zero-filled past v
            else:
                rm = m0 + tl.arange(0, BM)
                rn = v0 + tl.arange(0, BN)
                a = tl.load(x_src + rm[:, None] * K + (k0 + rk)[None, :], mask=rm[:, None] < n, other=0.0)
                b = tl.load(e_src + rn[:, None] * K + (k0 + rk)[None, :], mask=rn[:, None] < v, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)  # [BM, BN] x.e in fp32
            if ki == KT - 1:  # the tile's epilogue; the next tile's loads are already in flight
                rn = v0 + tl.arange(0, BN)
                esq = tl.load(esq_ptr + rn, mask=rn < v, other=float("inf"))  # [BN]
                dist = esq[None, :] - 2.0 * acc  # ||x||^2 is added by the caller
                d_min, i_min = tl.min(
                    dist, axis=1, return_indices=True, return_indices_tie_break_left=True
                )  # first minimum within the tile
                better = d_min < best  # strict: earlier tiles win ties
                best = tl.where(better, d_min, best)
                best_i = tl.where(better, i_min + v0, best_i)
                if tj == tiles_per_unit - 1:  # the unit is done: one int64 per row, ordered (dist, row)
                    rm = m0 + tl.arange(0, BM)
                    bits = tl.where(best == 0.0, 0.0, best).to(tl.int32, bitcast=True)  # -0 -> +0
                    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order as signed int order
                    packed = (key.to(tl.int64) << 32) | best_i.to(tl.int64)
                    tl.store(out_ptr + s * n + rm, packed, mask=rm < n)
                    best = tl.full([BM], float("inf"), tl.float32)
                    best_i = tl.zeros([BM], tl.int32)
                acc = tl.zeros([BM, BN], tl.float32)

    @triton.jit
    def _argmin_kernel(
        x_ptr, e_ptr, esq_ptr, best_ptr, idx_ptr, n, v,
        K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_s = tl.program_id(0), tl.program_id(1)
        tiles = tl.cdiv(tl.cdiv(v, BN), tl.num_programs(1))  # codebook tiles per split
        v_lo = pid_s * tiles * BN
        v_hi = tl.minimum(v_lo + tiles * BN, v)
        rm = pid_m * BM + tl.arange(0, BM)  # [BM]
        rk = tl.arange(0, BK)  # [BK]
        best = tl.full([BM], float("inf"), tl.float32)
        best_i = tl.zeros([BM], tl.int32)
        for v0 in range(v_lo, v_hi, BN):
            rn = v0 + tl.arange(0, BN)  # [BN]
            acc = tl.zeros([BM, BN], tl.float32)
            for k0 in range(0, K, BK):
                a = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=rm[:, None] < n, other=0.0)
                b = tl.load(e_ptr + rn[None, :] * K + (k0 + rk)[:, None], mask=rn[None, :] < v_hi, other=0.0)
                acc = tl.dot(a, b, acc)  # [BM, BN] x.e in fp32
            esq = tl.load(esq_ptr + rn, mask=rn < v_hi, other=float("inf"))  # [BN]
            dist = esq[None, :] - 2.0 * acc  # ||x||^2 is added by the caller
            d_min = tl.min(dist, axis=1)
            i_min = tl.argmin(dist, axis=1, tie_break_left=True)  # first minimum within the tile
            better = d_min < best  # strict: earlier tiles win ties
            best = tl.where(better, d_min, best)
            best_i = tl.where(better, i_min + v0, best_i)
        tl.store(best_ptr + pid_s * n + rm, best, mask=rm < n)
        tl.store(idx_ptr + pid_s * n + rm, best_i, mask=rm < n)

    _FUSED_CONFIGS = [
        triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (128, 128, 8, 3),
            (128, 256, 8, 3),
            (128, 256, 8, 4),
            (256, 128, 8, 4),
            (64, 256, 4, 4),
            (128, 128, 4, 4),
            (256, 128, 8, 3),
        )
    ]
    _argmin_tuned = triton.autotune(_FUSED_CONFIGS, key=["n", "v", "K", "BK"])(_argmin_kernel)


@functools.lru_cache(maxsize=256)
def plan_units(n: int, v: int, bm: int, bn: int, programs: int) -> tuple[int, int]:
    """(codebook slices, tiles per slice) for the persistent kernel: the fewest slices among those that
    give the shortest critical path, ceil(units / programs) x tiles per unit (units = row blocks x slices)."""
    num_m, tiles = -(-n // bm), -(-v // bn)
    best = None
    for s in range(1, tiles + 1):
        per = -(-tiles // s)
        if s > 1 and -(-tiles // (s - 1)) == per:
            continue  # same tiles per slice as s - 1: more units for nothing
        cost = -(-num_m * s // programs) * per
        if best is None or cost < best[0]:
            best = (cost, -(-tiles // per), per)
    return best[1], best[2]


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _decode(packed: Tensor) -> tuple[Tensor, Tensor]:
    """int64 (key << 32 | row) -> (distance fp32, row int64); the inverse of the kernel's packing."""
    key = packed >> 32
    bits = (key ^ ((key >> 31) & 0x7FFFFFFF)).to(torch.int32)
    return bits.view(torch.float32), packed & 0xFFFFFFFF


def _persistent_search(
    x: Tensor, codebook: Tensor, codebook_sq: Tensor, cfg: FusedSearchConfig
) -> tuple[Tensor, Tensor]:
    """One launch of the persistent kernel over x [n, c] (n * c < 2^31) -> (best [n] fp32, ids [n])."""
    n, c = x.shape
    v = codebook.shape[0]
    programs = _sm_count(x.device) * cfg.programs_per_sm
    slices, per = plan_units(n, v, cfg.bm, cfg.bn, programs)
    num_m = -(-n // cfg.bm)
    units = num_m * slices
    out = torch.empty(slices, n, dtype=torch.int64, device=x.device)
    if cfg.tma and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        cfg = replace(cfg, tma=False)  # TMA descriptors need Hopper or newer
    if cfg.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        if x.data_ptr() % 16:  # TMA needs 16-byte aligned bases (c % 32 == 0 keeps the rows aligned)
            x = x.clone()
        if codebook.data_ptr() % 16:
            codebook = codebook.clone()
        x_src = TensorDescriptor.from_tensor(x, [cfg.bm, cfg.bk])
        e_src = TensorDescriptor.from_tensor(codebook, [cfg.bn, cfg.bk])
    else:
        x_src, e_src = x, codebook
    grid = (min(programs, units),)
    _argmin_persistent_kernel[grid](
        x_src, e_src, codebook_sq, out, n, v, num_m, units, per,
        K=c, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, NUM_PROGS=grid[0], TMA=cfg.tma,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    return _decode(out.min(0).values if slices > 1 else out[0])


def fused_nearest_codes(
    x: Tensor,
    codebook: Tensor,
    codebook_sq: Tensor,
    block: tuple[int, int] | None = None,
    kernel: Literal["persistent", "tiled"] = "persistent",
    config: FusedSearchConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """x [n, c], codebook [v, c] (same dtype), codebook_sq [v] fp32 -> (min of ``||e||^2 - 2 x.e`` [n]
    fp32, ids [n] int64; ties: the lowest row). ``kernel``: ``persistent`` (default) or ``tiled`` (the
    first version). ``config``: the persistent kernel's shape (default ``FUSED_SEARCH``); ``block=(BM,
    BN)`` overrides its tile (tests, the interpreter) or fixes the tiled kernel's (None: autotuned)."""
    assert triton is not None, "fused_nearest_codes needs triton"
    n, c = x.shape
    v = codebook.shape[0]
    x, codebook = x.contiguous(), codebook.contiguous()
    codebook_sq = codebook_sq.float().contiguous()
    bk = 64 if c % 64 == 0 else 32
    if kernel == "persistent":
        cfg = config or FUSED_SEARCH
        cfg = replace(cfg, bk=min(cfg.bk, bk))
        if block is not None:
            cfg = replace(cfg, bm=block[0], bn=block[1])
        rows = max(cfg.bm, ((2**31 - 1) // max(c, -(-v // cfg.bn))) // cfg.bm * cfg.bm)  # int32 offsets
        parts = [_persistent_search(x[r : r + rows], codebook, codebook_sq, cfg) for r in range(0, n, rows)]
        if len(parts) == 1:
            return parts[0][0], parts[0][1]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if kernel != "tiled":
        raise ValueError(f"fused search kernel {kernel!r} is not one of 'persistent', 'tiled'")
    sms = _sm_count(x.device)
    splits = max(1, min(64, -(-2 * sms // -(-n // 128)), -(-v // 256)))  # ~2 waves of programs
    best = torch.empty(splits, n, dtype=torch.float32, device=x.device)
    idx = torch.empty(splits, n, dtype=torch.int32, device=x.device)
    if block is None:
        grid = lambda meta: (triton.cdiv(n, meta["BM"]), splits)  # noqa: E731
        _argmin_tuned[grid](x, codebook, codebook_sq, best, idx, n, v, K=c, BK=bk)  # tuned once per (n, v)
    else:
        bm, bn = block
        grid = (triton.cdiv(n, bm), splits)
        _argmin_kernel[grid](x, codebook, codebook_sq, best, idx, n, v, K=c, BM=bm, BN=bn, BK=bk)
    d_min = best.min(0).values  # [n]
    # the lowest row among the ties
    ids = torch.where(best == d_min, idx, torch.iinfo(torch.int32).max).min(0).values
    return d_min, ids.long()
