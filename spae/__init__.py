"""spae: Semantic Pyramid AutoEncoder (Yu et al., NeurIPS 2023) in pure PyTorch.

Public names are exported lazily (PEP 562), so ``import spae.config`` stays light (no torch)::

    from spae import SPAETokenizer, preset
    tok = SPAETokenizer.from_pretrained("path/to/tokenizer")  # a local save_pretrained folder
    pyramid = tok.encode(images)                 # images [b, 3, H, W] in [0, 1]
    text = tok.to_text(pyramid)                  # ["[L1] seven [L2] ...", ...]
    images = tok.decode(tok.from_text(text)[0])
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PyramidConfig": "spae.pyramid",
    "PyramidSpec": "spae.pyramid",
    "QuantizerConfig": "spae.quantize",
    "QuantizerOutput": "spae.quantize",
    "QuantizerKind": "spae.quantize",
    "Quantizer": "spae.quantize",
    "nearest_codes": "spae.quantize",
    "saq_quantize": "spae.quantize",
    "rq_quantize": "spae.quantize",
    "vq_quantize": "spae.quantize",
    "CodebookConfig": "spae.codebook",
    "FrozenCodebook": "spae.codebook",
    "load_codebook": "spae.codebook",
    "NetworkConfig": "spae.networks",
    "LossConfig": "spae.losses",
    "loss_preset": "spae.losses",
    "SPAEConfig": "spae.model",
    "SPAEOutput": "spae.model",
    "SPAE": "spae.model",
    "preset": "spae.model",
    "SPAETokenizer": "spae.tokenizer",
    "TokenPyramid": "spae.tokenizer",
    "ParseReport": "spae.tokenizer",
    "Vocabulary": "spae.tokenizer",
    "ConfigError": "spae.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
