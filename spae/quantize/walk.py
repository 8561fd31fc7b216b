"""The walk over the token pyramid (eqs. 1-3): layer by layer, one nearest-code search per layer.

Legend: ``b`` batch, ``c`` codebook dim, ``h w`` latent grid, ``v`` codebook rows, ``l`` layer
(1-indexed in text, 0-indexed in lists), ``n_l`` tokens in layer l, ``hw`` every latent position
(``t*h*w`` for video: latents ``[b, c, t, h, w]``, ``*latent`` below; every function flattens all latent
axes, so the walk is the same code for images and clips).

The walk goes from layer 1 to D, quantizing only the positions P(l) of eq. 1 and keeping, per latent
position, the running sum ``S`` of the chosen code vectors and the count of tokens so far
(``PyramidSpec.coverage``). The kind's target (``spae.quantize.kinds``) sets the layer target:

- ``average`` (SAQ, eqs. 2-3): ``z_l = z + sum_{i<l} 1[P(i)] (z - e(k_i)) = (1 + n_prev) z - S``;
  ``Ẑ<=l = S / count`` (the average of the tokens so far);
- ``residual``: ``z_l = r_l = z - S``; ``Ẑ<=l = S``.

A learned table adds the VQ-VAE codebook loss ``||sg(z_l) - e(k_l)||^2``. Each layer does ONE
nearest-code search over all of its positions in the batch (``spae.quantize.search``); ties go to the
lowest codebook row. ``walk`` is the training walk; ``walk_ids`` the same arithmetic for inference
(ids only: ``SPAETokenizer.encode``); ``lookup_latent`` the decode path (ids -> Ẑ<=l).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spae.pyramid import PyramidSpec
from spae.quantize.search import Search, nearest_codes, nearest_ids


@dataclass
class QuantizerOutput:
    """What a quantizer returns (the same fields for every kind).

    ids:            per layer [b, h_l, w_l] (video: [b, t_l, h_l, w_l]) int64 codebook rows.
    prefix_latents: per layer l, Ẑ<=l [b, c, *latent] (eq. 3), straight-through ``z + sg(ẑ - z)`` at
                    positions covered by the prefix, 0 elsewhere.
    layer_inputs:   per layer z_l at P(l) [b, n_l, c] (eq. 2), differentiable w.r.t. z (semantic loss).
    losses:         the quantizer's loss terms by name, each a scalar, weighed by the trainer
                    (``LossConfig.weights``):
                    ``commitment`` (every kind): sum over l of the mean over (batch x covered positions
                    x c) of (Z - sg(Ẑ<=l))^2: eq. 8's beta term without beta. A mean over channels too
                    (the VQGAN / MAGVIT convention), so beta does not scale with c; summing over c
                    instead (x c) collapsed a tiny model onto one code at the paper's beta = 0.33.
                    ``codebook`` (learned tables only): the sum over l of the mean over (batch x
                    positions x c) of (sg(z_l) - e(k_l))^2, the table's only gradient.
    """

    ids: list[Tensor]
    prefix_latents: list[Tensor]
    layer_inputs: list[Tensor]
    losses: dict[str, Tensor]


def _check_latent(z: Tensor, emb: Tensor, pyramid: PyramidSpec) -> None:
    b, c, *latent = z.shape
    if tuple(latent) != pyramid.latent_size:
        raise ValueError(
            f"latent grid {tuple(latent)} does not match the pyramid's latent size {pyramid.latent_size}"
        )
    if emb.shape[1] != c:
        raise ValueError(f"latent dim {c} does not match the codebook dim {emb.shape[1]}")


def walk(
    z: Tensor,
    emb: Tensor,
    pyramid: PyramidSpec,
    average: bool,
    learned: bool = False,
    chunk: int = 8192,
    search: Search = "auto",
    search_table: Tensor | None = None,
    search_sq: Tensor | None = None,
) -> QuantizerOutput:
    """The training walk of z [b, c, *latent] over the table emb [v, c]: SAQ target (``average``, eqs.
    2-3) or residual. ``learned``: ``emb`` is a trained table (a Parameter): adds ``losses["codebook"]``
    (``||sg(z_l) - e(k_l)||^2``); else ``emb`` is frozen and gets no gradient. ``search_table`` /
    ``search_sq``: the table as searched (e.g. bf16) and its ``||e||^2`` [v], if the caller has them."""
    emb = emb if learned else emb.detach()
    out, codes = _walk(z, emb, pyramid, average, chunk, search, search_table, search_sq)
    if learned:
        out.losses["codebook"] = sum(
            (x.detach() - e).pow(2).mean() for x, e in zip(out.layer_inputs, codes, strict=True)
        )  # ||sg(z_l) - e(k_l)||^2, summed over layers
    return out


def _walk(
    z: Tensor,
    emb: Tensor,
    pyramid: PyramidSpec,
    average: bool,
    chunk: int,
    search: Search,
    search_table: Tensor | None,
    search_sq: Tensor | None,
) -> tuple[QuantizerOutput, list[Tensor]]:
    """The walk. Returns the output and, per layer, the chosen code vectors ``emb[ids]`` [b, n_l, c]
    (carrying grad if ``emb`` does: the codebook loss of a learned table uses them)."""
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
        k, _ = nearest_codes(z_l.reshape(b * n_l, c), table, chunk, search_sq, search=search)  # [b*n_l]
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
    out = QuantizerOutput(ids, prefixes, inputs, {"commitment": commitment})
    return out, codes


@torch.no_grad()
def walk_ids(
    z: Tensor,
    emb: Tensor,
    pyramid: PyramidSpec,
    average: bool,
    chunk: int = 8192,
    search: Search = "auto",
    search_table: Tensor | None = None,
    search_sq: Tensor | None = None,
) -> list[Tensor]:
    """The ids of ``walk`` (same arithmetic, so the same ids) without what only training needs: no
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
        k = nearest_ids(z_l.reshape(b * n_l, c), table, chunk, sq, search)  # [b*n_l]
        if l + 1 < pyramid.num_layers:
            e = emb[k].view(b, n_l, c).to(s.dtype)  # [b, n_l, c]
            s.add_(e) if full[l] else s.index_add_(1, idx, e)
        ids.append(k.view(b, *pyramid.layer_sizes[l]))
    return ids


def saq_quantize(z: Tensor, codebook_emb: Tensor, pyramid: PyramidSpec, chunk: int = 8192) -> QuantizerOutput:
    """Streaming Average Quantization (eqs. 2-3) of z [b, c, h, w] over a frozen codebook [v, c]."""
    return walk(z, codebook_emb, pyramid, average=True, chunk=chunk)


def rq_quantize(z: Tensor, codebook_emb: Tensor, pyramid: PyramidSpec, chunk: int = 8192) -> QuantizerOutput:
    """Residual quantization: r_1 = z, r_{l+1} = r_l - e(k_l) at P(l); Ẑ<=l = sum of e(k_i)."""
    return walk(z, codebook_emb, pyramid, average=False, chunk=chunk)


def vq_quantize(z: Tensor, embedding: Tensor, pyramid: PyramidSpec, chunk: int = 8192) -> QuantizerOutput:
    """The saq walk over a learned codebook ``embedding`` [v, c] (a Parameter), plus the codebook loss."""
    return walk(z, embedding, pyramid, average=True, learned=True, chunk=chunk)


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
