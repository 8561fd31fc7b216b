"""Concept recall and precision per pyramid layer: do the layers hold the image's words (paper Fig. 4)?

For images that carry several known words (``spae.scenes``: count, colours, shapes, sizes, regions), per
layer ``l`` and per prefix ``1..l``:

- recall: the share of the image's true words that appear among the tokens (each word counted once);
- precision: the share of the tokens that are one of the image's true words (every token counted);
- key: the share of images whose key words (the first ``key`` words of the image's list; for scenes the
  dominant object's colour and shape) all appear among the tokens.

Each is the mean over images. Tokens are codebook rows; a row is a word when its display text, lower-cased,
equals it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ConceptTally:
    """Running sums of the module's metrics over batches (``update``), read once (``compute``)."""

    def __init__(self, vocabulary: Sequence[str], num_layers: int, key: int = 2):
        self.vocabulary = [w.lower() for w in vocabulary]
        self.num_layers = num_layers
        self.key = key
        self.images = 0
        self.sums: dict[str, float] = {}

    def _add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value

    def update(self, ids: Sequence[Tensor], words: Sequence[Sequence[str]]) -> None:
        """``ids``: per layer ``[b, ...]`` codebook rows (any grid); ``words``: each image's true words."""
        rows = [layer.reshape(layer.shape[0], -1).cpu().tolist() for layer in ids]  # per layer [b][n_l]
        for i, true in enumerate(words):
            truth = {w.lower() for w in true}
            key = {w.lower() for w in true[: self.key]}
            seen: set[str] = set()
            hits = tokens = 0
            for l in range(self.num_layers):
                layer = [self.vocabulary[r] for r in rows[l][i]]
                here = set(layer)
                seen |= here
                right = sum(w in truth for w in layer)
                hits, tokens = hits + right, tokens + len(layer)
                self._add(f"concept_recall/l{l + 1}", len(here & truth) / max(len(truth), 1))
                self._add(f"concept_precision/l{l + 1}", right / len(layer))
                self._add(f"concept_recall/p{l + 1}", len(seen & truth) / max(len(truth), 1))
                self._add(f"concept_precision/p{l + 1}", hits / tokens)
                self._add(f"key_words/p{l + 1}", float(key <= seen))
            self.images += 1

    def compute(self) -> dict[str, float]:
        return {name: total / max(self.images, 1) for name, total in self.sums.items()}


def concept_metrics(
    ids: Sequence[Tensor], words: Sequence[Sequence[str]], vocabulary: Sequence[str], key: int = 2
) -> dict[str, float]:
    """The module's metrics of one batch: ``ids`` per layer ``[b, ...]``, ``words`` per image."""
    tally = ConceptTally(vocabulary, len(ids), key)
    tally.update([torch.as_tensor(x) for x in ids], words)
    return tally.compute()
