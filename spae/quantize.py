"""Quantizers over the token pyramid: Streaming Average Quantization (eqs. 2-3) and two baselines.

Legend: ``b`` batch, ``c`` codebook dim, ``h w`` latent grid, ``v`` codebook rows, ``l`` layer
(1-indexed in text, 0-indexed in lists), ``n_l`` tokens in layer l. Video latents are ``[b, c, t, h, w]``
(``*latent`` below): every function flattens all latent axes, so SAQ is the same code for images and clips.

Every kind walks the pyramid from layer 1 to D, quantizing only the positions P(l) of eq. 1 and
keeping, per latent position, the running sum ``S`` of the chosen code vectors and the count of
tokens so far (``PyramidSpec.coverage``):

- ``saq`` (eqs. 2-3, the paper): the layer target is ``z_l = z + sum_{i<l} 1[P(i)] (z - e(k_i))``
  ``= (1 + n_prev) z - S``; ``Ẑ<=l = S / count`` (the average of the tokens so far).
- ``rq`` (residual quantization over the same frozen codebook): ``z_l = r_l = z - S``; ``Ẑ<=l = S``.
- ``vq`` (plain VQ-VAE baseline): the ``saq`` walk over a learned ``nn.Embedding`` codebook, with
  the VQ-VAE codebook loss ``||sg(z_l) - e(k_l)||^2``. With a one-layer full-resolution pyramid
  this is the paper's "Baseline VQ".

Each layer does ONE nearest-code search over all of its positions in the batch (``nearest_codes``:
a chunked GEMM with a running minimum, or on CUDA one fused Triton kernel). Ties go to the lowest
codebook row. ``walk_ids`` is the same walk for inference (ids only: ``SPAETokenizer.encode``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from spae.pyramid import PyramidSpec

if TYPE_CHECKING:
    from spae.codebook import FrozenCodebook


@dataclass(frozen=True)
class QuantizerConfig:
    kind: Literal["saq", "rq", "vq"] = "saq"
    search_chunk: int = 8192  # codebook rows per GEMM chunk
    vq_codebook_size: int = 1024  # rows of the learned codebook (kind="vq" only)
    # dtype of the nearest-code GEMM; distances are always accumulated in (at least) fp32.
    # "auto": bfloat16 on CUDA, the codebook's own dtype elsewhere.
    search_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self) -> None:
        if self.kind not in ("saq", "rq", "vq"):
            raise ValueError(f"quantizer.kind {self.kind!r} is not one of 'saq', 'rq', 'vq'")
        if self.search_chunk < 1:
            raise ValueError(f"quantizer.search_chunk must be >= 1, got {self.search_chunk}")
        if self.vq_codebook_size < 1:
            raise ValueError(f"quantizer.vq_codebook_size must be >= 1, got {self.vq_codebook_size}")


@dataclass
class QuantizerOutput:
    """What a quantizer returns (the same fields for every kind).

    ids:            per layer [b, h_l, w_l] (video: [b, t_l, h_l, w_l]) int64 codebook rows.
    prefix_latents: per layer l, Ẑ<=l [b, c, *latent] (eq. 3), straight-through ``z + sg(ẑ - z)`` at
                    positions covered by the prefix, 0 elsewhere.
    layer_inputs:   per layer z_l at P(l) [b, n_l, c] (eq. 2), differentiable w.r.t. z (semantic loss).
    commitment:     scalar, sum over l of the mean over (batch x covered positions x c) of
                    (Z - sg(Ẑ<=l))^2: eq. 8's beta term without beta. A mean over channels too (the
                    VQGAN / MAGVIT convention), so beta does not scale with c; summing over c instead
                    (x c) collapsed a tiny model onto one code at the paper's beta = 0.33.
    codebook_loss:  scalar; 0 for frozen codebooks; for the learned vq codebook the sum over l of
                    the mean over (batch x positions x c) of (sg(z_l) - e(k_l))^2.
    """

    ids: list[Tensor]
    prefix_latents: list[Tensor]
    layer_inputs: list[Tensor]
    commitment: Tensor
    codebook_loss: Tensor


# ----------------------------------------------------------------------------- nearest-code search


@torch.no_grad()
def nearest_codes(
    x: Tensor,
    codebook: Tensor,
    chunk: int = 8192,
    codebook_sq: Tensor | None = None,
    max_elements: int = 1 << 26,
    fused: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """argmin_k ||x - e(k)||^2 for every row of ``x``.

    x [n, c], codebook [v, c] -> (ids [n] int64, squared distances [n]).
    GEMM form ``||x||^2 - 2 x.e + ||e||^2``, over chunks of ``chunk`` codebook rows with a running
    minimum, so no [n, v] score matrix for the whole ``v`` and never [n, v, c]; rows of ``x`` are also
    blocked so one score block holds at most ``max_elements`` values. The GEMM runs in the codebook's
    dtype (e.g. bf16 on GPU); ``||e||^2``, the scores and the minimum are kept in at least fp32.
    ``codebook_sq`` [v]: precomputed ``||e||^2`` (fp32) to skip recomputing it. Ties: lowest row.
    ``fused``: on CUDA with a bf16/fp16 table, one Triton kernel does the GEMM and the argmin in its
    epilogue, so the [n, v] scores never reach memory (``fused_nearest_codes``); None = when available
    (``SPAE_FUSED_SEARCH=0`` turns it off; ``SPAE_FUSED_KERNEL=tiled`` takes the first, non-persistent
    kernel), False = always the chunked GEMM above.
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
    if fused is None:
        fused = fused_search_available(x, codebook)
    if fused and n:
        best, ids = fused_nearest_codes(x, codebook, codebook_sq, kernel=_fused_kernel())  # [n] each
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


# ----------------------------------------------------------------------------- fused search (CUDA)
# Two Triton kernels do the bf16 GEMM with fp32 accumulation and ``||e||^2 - 2 x.e`` with its
# min/argmin in the epilogue, so the [n, v] scores never reach memory:
#
# - ``persistent`` (the default): one program per SM walks ONE flattened loop over
#   (work unit, codebook tile, k step); the tile's epilogue runs under ``if k == last``, so the loads of
#   the next tile are already in flight while the argmin of this one is reduced, and the pipeline never
#   drains between tiles. A work unit is (BM rows of x, a contiguous slice of codebook tiles); the number
#   of slices is picked so the units spread evenly over the programs (no partial last wave). Each unit
#   writes its (distance, row) as one int64 whose order is (distance, row), so the per-slice results
#   combine with one ``min`` and ties go to the lowest row exactly, whatever the split.
# - ``tiled`` (the first version, kept for comparison): a grid of (row block, split) programs, each
#   looping over its codebook tiles with a K loop inside (the pipeline refills on every tile).

try:  # triton ships with CUDA builds of torch; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds
    triton = None


def fused_search_available(x: Tensor, codebook: Tensor) -> bool:
    """True when ``nearest_codes`` would take the fused kernel for these operands."""
    return (
        triton is not None
        and x.is_cuda
        and codebook.is_cuda
        and codebook.dtype in (torch.bfloat16, torch.float16)
        and codebook.shape[1] % 32 == 0
        and codebook.numel() < 2**31  # int32 offsets in the kernel
        and os.environ.get("SPAE_FUSED_SEARCH", "1") != "0"
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


# ----------------------------------------------------------------------------- the pyramid walk


def _fused_kernel() -> str:
    """The fused search kernel: ``persistent`` unless ``SPAE_FUSED_KERNEL=tiled``."""
    return "tiled" if os.environ.get("SPAE_FUSED_KERNEL") == "tiled" else "persistent"


def _check_latent(z: Tensor, emb: Tensor, pyramid: PyramidSpec) -> None:
    b, c, *latent = z.shape
    if tuple(latent) != pyramid.latent_size:
        raise ValueError(
            f"latent grid {tuple(latent)} does not match the pyramid's latent size {pyramid.latent_size}"
        )
    if emb.shape[1] != c:
        raise ValueError(f"latent dim {c} does not match the codebook dim {emb.shape[1]}")


def _walk(
    z: Tensor,
    emb: Tensor,
    pyramid: PyramidSpec,
    chunk: int,
    average: bool,
    search_table: Tensor | None = None,
    search_sq: Tensor | None = None,
) -> tuple[QuantizerOutput, list[Tensor]]:
    """The shared SAQ (``average=True``) / RQ walk. Returns the output and, per layer, the chosen code
    vectors ``emb[ids]`` [b, n_l, c] (carrying grad if ``emb`` does: the vq codebook loss uses them)."""
    _check_latent(z, emb, pyramid)
    b, c, *latent = z.shape
    n_pos = pyramid.num_positions  # h*w (t*h*w for video)
    table = emb.detach() if search_table is None else search_table
    if search_sq is None:  # ||e||^2 once for every layer, as nearest_codes would compute it
        search_sq = table.to(torch.promote_types(table.dtype, torch.float32)).pow(2).sum(1)  # [v]
    flat_index, coverage = pyramid.device_tensors(z.device)
    zf = z.reshape(b, c, n_pos)  # [b, c, hw]
    s = zf.new_zeros(b, c, n_pos)  # running sum of e(k_i) per position, no grad
    ids, prefixes, inputs, codes = [], [], [], []
    commitment = zf.new_zeros(())
    for l in range(pyramid.num_layers):
        idx = flat_index[l]  # [n_l]
        n_l = idx.numel()
        z_at = zf.index_select(2, idx)  # [b, c, n_l]
        s_at = s.index_select(2, idx)  # [b, c, n_l]
        if average:
            n_prev = coverage[l - 1].index_select(0, idx) if l > 0 else coverage.new_zeros(n_l)  # [n_l]
            z_l = (1.0 + n_prev) * z_at - s_at  # eq. 2: z + sum_{i<l} 1[P(i)] (z - e(k_i))
        else:
            z_l = z_at - s_at  # residual r_l = z - sum_{i<l} e(k_i)
        z_l = z_l.transpose(1, 2)  # [b, n_l, c]
        k, _ = nearest_codes(z_l.reshape(b * n_l, c), table, chunk, search_sq)  # [b*n_l]
        e = emb[k].view(b, n_l, c)  # [b, n_l, c]
        s.index_add_(2, idx, e.detach().transpose(1, 2).to(s.dtype))
        cnt = coverage[l]  # [hw] tokens in the prefix <= l
        covered = cnt > 0
        z_hat = s / cnt.clamp_min(1.0) if average else s  # eq. 3 (saq) / sum (rq); [b, c, hw]
        st = zf + (z_hat - zf).detach()  # straight-through
        prefixes.append(torch.where(covered, st, torch.zeros_like(st)).view(b, c, *latent))
        n_cov = b * c * pyramid.covered_counts[l]  # host-side count: no device sync
        commitment = commitment + ((zf - z_hat).pow(2) * covered).sum() / n_cov  # ||Z - sg(Ẑ<=l)||^2, eq. 8
        ids.append(k.view(b, *pyramid.layer_sizes[l]))
        inputs.append(z_l)
        codes.append(e)
    out = QuantizerOutput(ids, prefixes, inputs, commitment, zf.new_zeros(()))
    return out, codes


@torch.no_grad()
def walk_ids(
    z: Tensor,
    emb: Tensor,
    pyramid: PyramidSpec,
    average: bool,
    chunk: int = 8192,
    search_table: Tensor | None = None,
    search_sq: Tensor | None = None,
) -> list[Tensor]:
    """The ids of ``_walk`` (same arithmetic, so the same ids) without what only training needs: no
    prefixes, commitment or layer inputs, and the latent kept as [b, h*w, c] so each layer's targets are
    already the search's [n_l, c] rows. The inference path of ``SPAETokenizer.encode``."""
    _check_latent(z, emb, pyramid)
    b, c, *latent = z.shape
    table = emb if search_table is None else search_table
    sq = table.float().pow(2).sum(1) if search_sq is None else search_sq  # [v], once for all layers
    flat_index, coverage = pyramid.device_tensors(z.device)
    n_pos = pyramid.num_positions
    full = pyramid.full_layers  # P(l) = every position
    zt = z.reshape(b, c, n_pos).transpose(1, 2).contiguous()  # [b, hw, c]
    s = torch.zeros_like(zt)  # running sum of e(k_i) per position
    ids = []
    for l in range(pyramid.num_layers):
        idx = flat_index[l]  # [n_l]
        n_l = idx.numel()
        z_at = zt if full[l] else zt.index_select(1, idx)  # [b, n_l, c]
        s_at = s if full[l] else s.index_select(1, idx)  # [b, n_l, c]
        if l == 0:
            z_l = z_at  # nothing chosen yet: s = 0, n_prev = 0
        elif average:
            n_prev = coverage[l - 1].index_select(0, idx)[:, None]  # [n_l, 1]
            z_l = (1.0 + n_prev) * z_at - s_at  # eq. 2
        else:
            z_l = z_at - s_at  # residual
        k = _nearest_ids(z_l.reshape(b * n_l, c), table, chunk, sq)  # [b*n_l]
        if l + 1 < pyramid.num_layers:
            e = emb[k].view(b, n_l, c).to(s.dtype)  # [b, n_l, c]
            s.add_(e) if full[l] else s.index_add_(1, idx, e)
        ids.append(k.view(b, *pyramid.layer_sizes[l]))
    return ids


def _nearest_ids(x: Tensor, table: Tensor, chunk: int, sq: Tensor) -> Tensor:
    """``nearest_codes(x, table, chunk, sq)[0]`` without the distances (no ||x||^2 pass)."""
    xs = x.to(table.dtype)
    if x.shape[0] and fused_search_available(xs, table):
        return fused_nearest_codes(xs, table, sq, kernel=_fused_kernel())[1]
    return nearest_codes(x, table, chunk, sq)[0]


def saq_quantize(z: Tensor, codebook_emb: Tensor, pyramid: PyramidSpec, chunk: int = 8192) -> QuantizerOutput:
    """Streaming Average Quantization (eqs. 2-3) of z [b, c, h, w] over a frozen codebook [v, c]."""
    return _walk(z, codebook_emb.detach(), pyramid, chunk, average=True)[0]


def rq_quantize(z: Tensor, codebook_emb: Tensor, pyramid: PyramidSpec, chunk: int = 8192) -> QuantizerOutput:
    """Residual quantization: r_1 = z, r_{l+1} = r_l - e(k_l) at P(l); Ẑ<=l = sum of e(k_i)."""
    return _walk(z, codebook_emb.detach(), pyramid, chunk, average=False)[0]


def vq_quantize(z: Tensor, embedding: Tensor, pyramid: PyramidSpec, chunk: int = 8192) -> QuantizerOutput:
    """The saq walk over a learned codebook ``embedding`` [v, c] (a Parameter), plus the codebook loss."""
    out, codes = _walk(z, embedding, pyramid, chunk, average=True)
    out.codebook_loss = sum(
        (x.detach() - e).pow(2).mean() for x, e in zip(out.layer_inputs, codes, strict=True)
    )  # ||sg(z_l) - e(k_l)||^2
    return out


def lookup_latent(
    ids: list[Tensor], emb: Tensor, pyramid: PyramidSpec, up_to_layer: int, average: bool
) -> Tensor:
    """ids of layers 1..up_to_layer (each [b, *layer_size]) -> Ẑ<=l [b, c, *latent], 0 where uncovered."""
    if not 1 <= up_to_layer <= pyramid.num_layers:
        raise ValueError(f"up_to_layer {up_to_layer} is out of range 1..{pyramid.num_layers}")
    if len(ids) < up_to_layer:
        raise ValueError(f"lookup needs the ids of layers 1..{up_to_layer}, got {len(ids)} layers")
    b = ids[0].shape[0]
    c = emb.shape[1]
    flat_index, coverage = pyramid.device_tensors(emb.device)
    s = emb.new_zeros(b, c, pyramid.num_positions)
    for l in range(up_to_layer):
        k = ids[l].to(emb.device).reshape(b, -1)  # [b, n_l]
        if k.shape[1] != flat_index[l].numel():
            raise ValueError(
                f"layer {l + 1}: expected {pyramid.layer_sizes[l]} ids per image, "
                f"got {tuple(ids[l].shape[1:])}"
            )
        s.index_add_(2, flat_index[l], emb[k].transpose(1, 2))  # [b, c, n_l]
    z_hat = s / coverage[up_to_layer - 1].clamp_min(1.0) if average else s  # eq. 3
    return z_hat.view(b, c, *pyramid.latent_size)


# ----------------------------------------------------------------------------- the module


class Quantizer(nn.Module):
    """Quantizes encoder latents over the token pyramid; ``cfg.kind`` picks saq / rq / vq."""

    def __init__(self, cfg: QuantizerConfig, pyramid: PyramidSpec, codebook: FrozenCodebook):
        super().__init__()
        self.cfg = cfg
        self.pyramid = pyramid
        self.codebook = codebook  # frozen: its embeddings are a buffer, never a Parameter
        self.embedding: nn.Embedding | None = None
        if cfg.kind == "vq":
            self.embedding = nn.Embedding(cfg.vq_codebook_size, codebook.dim)
            nn.init.uniform_(self.embedding.weight, -1.0 / cfg.vq_codebook_size, 1.0 / cfg.vq_codebook_size)
        self._search_cache: tuple[tuple, Tensor, Tensor] | None = None

    @property
    def table(self) -> Tensor:
        """The codebook being searched: [v, c] (frozen rows, or the learned vq embedding)."""
        return self.embedding.weight if self.embedding is not None else self.codebook.embeddings

    @property
    def num_codes(self) -> int:
        return self.table.shape[0]

    def _search(self) -> tuple[Tensor, Tensor]:
        """The frozen table in the search dtype and its squared norms, cached until the buffer changes."""
        emb = self.codebook.embeddings
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            self.cfg.search_dtype, torch.bfloat16 if emb.is_cuda else emb.dtype
        )
        key = (emb.device, emb.data_ptr(), emb._version, dtype)
        if self._search_cache is None or self._search_cache[0] != key:
            table = emb.detach().to(dtype)
            sq = table.float().pow(2).sum(1)  # [v], norms of the rows actually searched
            self._search_cache = (key, table, sq)
        return self._search_cache[1], self._search_cache[2]

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z [b, c, h, w] (video: [b, c, t, h, w]) -> QuantizerOutput."""
        chunk = self.cfg.search_chunk
        if self.cfg.kind == "vq":
            return vq_quantize(z, self.embedding.weight, self.pyramid, chunk)
        table, sq = self._search()
        emb = self.codebook.embeddings.detach()
        return _walk(
            z, emb, self.pyramid, chunk, average=self.cfg.kind == "saq", search_table=table, search_sq=sq
        )[0]

    @torch.no_grad()
    def encode_ids(self, z: Tensor) -> list[Tensor]:
        """z [b, c, *latent] -> per layer ids [b, *layer_size]: ``forward(z).ids`` without the training
        outputs (``walk_ids``)."""
        chunk, average = self.cfg.search_chunk, self.cfg.kind != "rq"
        if self.cfg.kind == "vq":
            return walk_ids(z, self.embedding.weight.detach(), self.pyramid, True, chunk)
        table, sq = self._search()
        emb = self.codebook.embeddings.detach()
        return walk_ids(z, emb, self.pyramid, average, chunk, search_table=table, search_sq=sq)

    def lookup(self, ids: list[Tensor], up_to_layer: int) -> Tensor:
        """ids (layers 1..up_to_layer, each [b, *layer_size]) -> Ẑ<=l [b, c, *latent] (the decode path)."""
        return lookup_latent(
            ids, self.table.detach(), self.pyramid, up_to_layer, average=self.cfg.kind != "rq"
        )
