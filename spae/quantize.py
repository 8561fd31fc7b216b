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
a chunked GEMM with a running minimum). Ties go to the lowest codebook row.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    (``SPAE_FUSED_SEARCH=0`` turns it off), False = always the chunked GEMM above.
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
        best, ids = fused_nearest_codes(x, codebook, codebook_sq)  # [n] each
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
# One Triton program owns BM rows of x and a slice of the codebook; per BN-row tile it does the bf16
# GEMM with fp32 accumulation, then ``||e||^2 - 2 x.e``, the tile's min/argmin and the running minimum,
# all in registers. The codebook is split over ``num_splits`` program columns to fill the GPU when n
# is small; the per-split minima [s, n] are combined in torch (ties: lowest row, as above).

try:  # triton ships with CUDA builds of torch; the CPU path never needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds
    triton = None


def fused_search_available(x: Tensor, codebook: Tensor) -> bool:
    """True when ``nearest_codes`` would take the fused kernel for these operands."""
    import os

    return (
        triton is not None
        and x.is_cuda
        and codebook.is_cuda
        and codebook.dtype in (torch.bfloat16, torch.float16)
        and codebook.shape[1] % 32 == 0
        and os.environ.get("SPAE_FUSED_SEARCH", "1") != "0"
    )


if triton is not None:

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


def fused_nearest_codes(
    x: Tensor, codebook: Tensor, codebook_sq: Tensor, block: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """x [n, c], codebook [v, c] (same dtype), codebook_sq [v] fp32 -> (min of ``||e||^2 - 2 x.e`` [n]
    fp32, ids [n] int64). ``block=(BM, BN)`` fixes the tile (tests, the interpreter); None autotunes."""
    assert triton is not None, "fused_nearest_codes needs triton"
    n, c = x.shape
    v = codebook.shape[0]
    x, codebook = x.contiguous(), codebook.contiguous()
    codebook_sq = codebook_sq.float().contiguous()
    bk = 64 if c % 64 == 0 else 32
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
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


def _pyramid_tensors(pyramid: PyramidSpec, device: torch.device) -> tuple[list[Tensor], Tensor]:
    """flat_index per layer and coverage [L, h*w] (float) on ``device``, cached on the spec."""
    cache = pyramid.__dict__.setdefault("_device_cache", {})
    key = str(device)
    if key not in cache:
        idx = [i.to(device) for i in pyramid.flat_index]
        cov = pyramid.coverage.reshape(pyramid.num_layers, -1).to(device=device, dtype=torch.float32)
        cache[key] = (idx, cov)
    return cache[key]


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
    b, c, *latent = z.shape
    if tuple(latent) != pyramid.latent_size:
        raise ValueError(
            f"latent grid {tuple(latent)} does not match the pyramid's latent size {pyramid.latent_size}"
        )
    n_pos = pyramid.num_positions  # h*w (t*h*w for video)
    if emb.shape[1] != c:
        raise ValueError(f"latent dim {c} does not match the codebook dim {emb.shape[1]}")
    table = emb.detach() if search_table is None else search_table
    flat_index, coverage = _pyramid_tensors(pyramid, z.device)
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
        n_cov = b * c * int(pyramid.coverage[l].count_nonzero())  # host-side count: no device sync
        commitment = commitment + ((zf - z_hat).pow(2) * covered).sum() / n_cov  # ||Z - sg(Ẑ<=l)||^2, eq. 8
        ids.append(k.view(b, *pyramid.layer_sizes[l]))
        inputs.append(z_l)
        codes.append(e)
    out = QuantizerOutput(ids, prefixes, inputs, commitment, zf.new_zeros(()))
    return out, codes


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
    flat_index, coverage = _pyramid_tensors(pyramid, emb.device)
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

    def lookup(self, ids: list[Tensor], up_to_layer: int) -> Tensor:
        """ids (layers 1..up_to_layer, each [b, *layer_size]) -> Ẑ<=l [b, c, *latent] (the decode path)."""
        return lookup_latent(
            ids, self.table.detach(), self.pyramid, up_to_layer, average=self.cfg.kind != "rq"
        )
