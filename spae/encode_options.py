"""``EncodeOptions``: how ``SPAETokenizer.encode`` runs the encoder. Torch-free, so job configs that
carry it (``pipeline.steps.tokenize.TokenizeJobConfig.encode``) import without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class EncodeOptions:
    """How ``SPAETokenizer.encode`` runs the encoder (the search and the SAQ walk are always fp32 targets
    with the bf16/fp32 search of ``QuantizerConfig.search_dtype``).

    dtype:   ``float32`` (default: the tokens of the training forward pass) or ``bfloat16`` (autocast
             around the encoder, z cast back to fp32 before the walk: faster on GPUs, but near-ties in
             the codebook can flip; docs/BENCHMARKS.md gives the agreement measured).
    compile: ``torch.compile`` the encoder (and the [0, 1] -> [-1, 1] map). Off by default: the first
             call pays the compilation (10-30 s on an H100 machine), which a run recovers only after
             hundreds of batches (docs/BENCHMARKS.md). Batches are padded up to the largest batch size
             compiled so far, so a stage's last, smaller batch costs no recompilation.
    compile_backend: the ``torch.compile`` backend (``inductor``; tests use ``aot_eager``).
    compile_mode: the ``torch.compile`` mode (None: the default; e.g. ``max-autotune-no-cudagraphs``).
    """

    dtype: Literal["float32", "bfloat16"] = "float32"
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"encode dtype {self.dtype!r} is not one of 'float32', 'bfloat16'")
