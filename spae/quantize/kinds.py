"""The quantizer kinds, as data: what each layer's search target is and whether the table learns.

A kind is a ``QuantizerKind(name, target, table)``:

- ``target="average"``: the SAQ target of eq. 2, ``z_l = (1 + n_prev) z - S``, and ``Ẑ<=l = S / count``
  (eq. 3, the average of the tokens so far); ``target="residual"``: ``z_l = z - S``, ``Ẑ<=l = S``.
  ``S`` is the running sum of the chosen code vectors at a position, ``n_prev`` its tokens so far.
- ``table="frozen"``: the LLM codebook (a buffer, never trained); ``table="learned"``: an
  ``nn.Embedding`` of ``QuantizerConfig.vq_codebook_size`` rows, trained by the VQ-VAE codebook loss
  ``||sg(z_l) - e(k_l)||^2`` (the ``"codebook"`` term of ``QuantizerOutput.losses``).

``KINDS`` is the one registry: ``saq`` (the paper), ``rq`` (residual over the same frozen table) and
``vq`` (the plain VQ-VAE baseline: the saq walk over a learned table). Adding a kind is one entry
(``register_kind``); ``spae.quantize.quantizer.Quantizer`` builds any (target, table) pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class QuantizerKind:
    name: str
    target: Literal["average", "residual"]  # eq. 2-3 (SAQ) or the residual
    table: Literal["frozen", "learned"]  # the LLM codebook, or a learned nn.Embedding

    def __post_init__(self) -> None:
        if self.target not in ("average", "residual"):
            raise ValueError(
                f"quantizer kind {self.name!r}: target {self.target!r} is not 'average' or 'residual'"
            )
        if self.table not in ("frozen", "learned"):
            raise ValueError(
                f"quantizer kind {self.name!r}: table {self.table!r} is not 'frozen' or 'learned'"
            )

    @property
    def average(self) -> bool:
        """True for the SAQ target (eqs. 2-3), False for the residual."""
        return self.target == "average"

    @property
    def learned(self) -> bool:
        return self.table == "learned"


KINDS: dict[str, QuantizerKind] = {
    k.name: k
    for k in (
        QuantizerKind("saq", "average", "frozen"),  # Streaming Average Quantization, eqs. 2-3
        QuantizerKind("rq", "residual", "frozen"),  # residual quantization over the LLM codebook
        QuantizerKind("vq", "average", "learned"),  # plain VQ-VAE baseline (one layer: "Baseline VQ")
    )
}


def register_kind(kind: QuantizerKind) -> QuantizerKind:
    """Add ``kind`` to ``KINDS`` (a name already registered is an error)."""
    if kind.name in KINDS:
        raise ValueError(f"quantizer kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> QuantizerKind:
    """The registered kind ``name``; an unknown name is an error listing the registered ones."""
    if name not in KINDS:
        raise ValueError(f"quantizer.kind {name!r} is not a registered kind; registered: {', '.join(KINDS)}")
    return KINDS[name]
