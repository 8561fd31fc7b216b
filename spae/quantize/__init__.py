"""Quantizers over the token pyramid: Streaming Average Quantization (eqs. 1-3) and two baselines.

- ``kinds``: the registry of quantizer kinds as data (``QuantizerKind``: target x table): ``saq``,
  ``rq``, ``vq``;
- ``walk``: the pyramid walk of eqs. 1-3 (``walk`` for training, ``walk_ids`` for inference,
  ``lookup_latent`` for decoding) and ``QuantizerOutput``;
- ``search``: ``nearest_codes``, the chunked GEMM with a running minimum, or a fused kernel;
- ``kernels``: the fused Triton kernels (CUDA) and their launch planning;
- ``quantizer``: ``QuantizerConfig`` and the ``Quantizer`` module.
"""

from spae.quantize.kernels import (
    FUSED_SEARCH,
    FusedSearchConfig,
    _decode,
    fused_nearest_codes,
    fused_search_available,
    plan_units,
)
from spae.quantize.kinds import KINDS, QuantizerKind, get_kind, register_kind
from spae.quantize.quantizer import Quantizer, QuantizerConfig
from spae.quantize.search import SEARCHES, Search, nearest_codes, nearest_ids
from spae.quantize.walk import (
    QuantizerOutput,
    lookup_latent,
    rq_quantize,
    saq_quantize,
    vq_quantize,
    walk,
    walk_ids,
)

__all__ = [
    "FUSED_SEARCH",
    "KINDS",
    "SEARCHES",
    "FusedSearchConfig",
    "Quantizer",
    "QuantizerConfig",
    "QuantizerKind",
    "QuantizerOutput",
    "Search",
    "_decode",
    "fused_nearest_codes",
    "fused_search_available",
    "get_kind",
    "lookup_latent",
    "nearest_codes",
    "nearest_ids",
    "plan_units",
    "register_kind",
    "rq_quantize",
    "saq_quantize",
    "vq_quantize",
    "walk",
    "walk_ids",
]
