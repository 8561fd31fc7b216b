"""``QuantizerConfig`` and the ``Quantizer`` module: any registered kind (``spae.quantize.kinds``) over
the token pyramid, with the search table cached in the search dtype.

Legend: ``b`` batch, ``c`` codebook dim, ``v`` codebook rows, ``*latent`` the latent grid (h, w) or
(t, h, w).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from spae.pyramid import PyramidSpec
from spae.quantize.kinds import QuantizerKind, get_kind
from spae.quantize.search import SEARCHES, Search
from spae.quantize.walk import QuantizerOutput, lookup_latent, walk, walk_ids

if TYPE_CHECKING:
    from spae.codebook import FrozenCodebook


@dataclass(frozen=True)
class QuantizerConfig:
    kind: str = "saq"  # a registered kind (spae.quantize.kinds.KINDS): saq, rq, vq
    search_chunk: int = 8192  # codebook rows per GEMM chunk of the chunked search
    vq_codebook_size: int = 1024  # rows of the learned table (kinds with table="learned")
    # dtype of the nearest-code GEMM; distances are always accumulated in (at least) fp32.
    # "auto": bfloat16 on CUDA, the codebook's own dtype elsewhere.
    search_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # how the nearest-code search runs (spae.quantize.search): "auto" = the fused kernel where it can
    # run, else the chunked GEMM; "chunked"; "fused" / "fused-tiled" = that kernel, an error where it
    # cannot run. Every choice picks the same rows wherever the distances are exact.
    search: Search = "auto"

    # fields that change how fast the search runs, never the ids: not part of a tokenizer's identity
    SPEED_FIELDS = ("search", "search_chunk")

    def __post_init__(self) -> None:
        get_kind(self.kind)  # an unknown kind: the error lists the registered ones
        if self.search not in SEARCHES:
            raise ValueError(
                f"quantizer.search {self.search!r} is not one of {', '.join(map(repr, SEARCHES))}"
            )
        if self.search_chunk < 1:
            raise ValueError(f"quantizer.search_chunk must be >= 1, got {self.search_chunk}")
        if self.vq_codebook_size < 1:
            raise ValueError(f"quantizer.vq_codebook_size must be >= 1, got {self.vq_codebook_size}")

    @property
    def spec(self) -> QuantizerKind:
        """The registered kind this config names."""
        return get_kind(self.kind)


class Quantizer(nn.Module):
    """Quantizes encoder latents over the token pyramid; ``cfg.kind`` picks the kind (target, table)."""

    def __init__(self, cfg: QuantizerConfig, pyramid: PyramidSpec, codebook: FrozenCodebook):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.spec
        self.pyramid = pyramid
        self.codebook = codebook  # frozen: its embeddings are a buffer, never a Parameter
        self.embedding: nn.Embedding | None = None
        if self.kind.learned:
            self.embedding = nn.Embedding(cfg.vq_codebook_size, codebook.dim)
            nn.init.uniform_(self.embedding.weight, -1.0 / cfg.vq_codebook_size, 1.0 / cfg.vq_codebook_size)
        self._search_cache: tuple[tuple, Tensor, Tensor] | None = None

    @property
    def table(self) -> Tensor:
        """The codebook being searched: [v, c] (frozen rows, or the learned embedding)."""
        return self.embedding.weight if self.embedding is not None else self.codebook.embeddings

    @property
    def num_codes(self) -> int:
        return self.table.shape[0]

    def _search(self) -> tuple[Tensor, Tensor]:
        """The frozen table in the search dtype [v, c] and its squared norms [v] fp32, cached until the
        buffer changes."""
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
        chunk, search, kind = self.cfg.search_chunk, self.cfg.search, self.kind
        if kind.learned:
            return walk(z, self.embedding.weight, self.pyramid, kind.average, True, chunk, search)
        table, sq = self._search()
        emb = self.codebook.embeddings.detach()
        return walk(z, emb, self.pyramid, kind.average, False, chunk, search, table, sq)

    @torch.no_grad()
    def encode_ids(self, z: Tensor) -> list[Tensor]:
        """z [b, c, *latent] -> per layer ids [b, *layer_size]: ``forward(z).ids`` without the training
        outputs (``walk_ids``)."""
        chunk, search, kind = self.cfg.search_chunk, self.cfg.search, self.kind
        if kind.learned:
            return walk_ids(z, self.embedding.weight.detach(), self.pyramid, kind.average, chunk, search)
        table, sq = self._search()
        emb = self.codebook.embeddings.detach()
        return walk_ids(z, emb, self.pyramid, kind.average, chunk, search, search_table=table, search_sq=sq)

    def lookup(self, ids: list[Tensor], up_to_layer: int) -> Tensor:
        """ids (layers 1..up_to_layer, each [b, *layer_size]) -> Ẑ<=l [b, c, *latent] (the decode path)."""
        return lookup_latent(ids, self.table.detach(), self.pyramid, up_to_layer, average=self.kind.average)
