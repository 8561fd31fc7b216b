"""The token pyramid: which latent positions each layer quantizes (eq. 1).

Layer ``l`` (1-indexed) is a ``h_l x w_l`` grid of tokens over the ``h_D x w_D`` latent, with
``h_l <= h_{l+1}`` and ``w_l <= w_{l+1}``. The dilation subsampler of eq. 1 places token ``(i, j)``
(``i`` in ``1..h_l``, ``j`` in ``1..w_l``) at latent position

    (h' i - ceil(h'/2) + 1,  w' j - ceil(w'/2) + 1),   h' = h_D / h_l,  w' = w_D / w_l      (eq. 1)

in the paper's 1-indexed coordinates; this module returns 0-indexed ``(y, x)``, i.e. one less.

Serialization order (used by ``flat_index``, ``gather``, the tokenizer's text and every file):
layer 1 first, then layer 2, ...; within a layer row-major over ``(i, j)`` of eq. 1, i.e. token
``(i, j)`` is the ``(i - 1) * w_l + (j - 1)``-th token of its layer.

Paper config (``PyramidConfig.paper()``): a 16x16 latent, layers 1, 2, 4, 8, 16, 16 (k = 0,1,2,3,4,4),
token counts 1, 4, 16, 64, 256, 256, cumulative 1, 5, 21, 85, 341, 597.
MNIST (``PyramidConfig.mnist()``): an 8x8 latent, layers 1, 2, 4, 8, 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PyramidConfig:
    latent_size: tuple[int, int] = (8, 8)  # (h_D, w_D)
    layer_sizes: tuple[tuple[int, int], ...] = (
        (1, 1),
        (2, 2),
        (4, 4),
        (8, 8),
        (8, 8),
    )  # (h_l, w_l), l = 1..D

    def __post_init__(self) -> None:
        # normalise lists (hand-made configs) to tuples so the config stays hashable
        object.__setattr__(self, "latent_size", tuple(int(v) for v in self.latent_size))
        object.__setattr__(self, "layer_sizes", tuple(tuple(int(v) for v in s) for s in self.layer_sizes))
        if len(self.latent_size) != 2 or any(len(s) != 2 for s in self.layer_sizes):
            raise ValueError("pyramid.latent_size and every pyramid.layer_sizes entry must be (h, w) pairs")
        h_d, w_d = self.latent_size
        if h_d < 1 or w_d < 1:
            raise ValueError(f"pyramid.latent_size must be positive, got {self.latent_size}")
        if not self.layer_sizes:
            raise ValueError("pyramid.layer_sizes is empty; give at least one layer (h_l, w_l)")
        prev = (0, 0)
        for l, (h, w) in enumerate(self.layer_sizes, start=1):
            if h < 1 or w < 1:
                raise ValueError(f"pyramid layer {l}: size {(h, w)} must be positive")
            if h < prev[0] or w < prev[1]:
                raise ValueError(
                    f"pyramid layer {l}: size {(h, w)} is smaller than layer {l - 1}'s {prev}; "
                    "the pyramid needs h_l <= h_(l+1) and w_l <= w_(l+1)"
                )
            if h > h_d or w > w_d or h_d % h or w_d % w:
                raise ValueError(
                    f"pyramid layer {l}: size {(h, w)} must divide the latent size {self.latent_size} "
                    "(h_D % h_l == 0 and w_D % w_l == 0)"
                )
            prev = (h, w)
        if tuple(self.layer_sizes[-1]) != tuple(self.latent_size):
            raise ValueError(
                f"pyramid layer {len(self.layer_sizes)} (the last): size {self.layer_sizes[-1]} must equal "
                f"the latent size {self.latent_size} so that every latent position gets a token"
            )

    @classmethod
    def paper(cls) -> PyramidConfig:
        """128x128 images, 16x16 latent, 2^k x 2^k tokens with k = 0, 1, 2, 3, 4, 4."""
        return cls(latent_size=(16, 16), layer_sizes=((1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (16, 16)))

    @classmethod
    def mnist(cls) -> PyramidConfig:
        """32x32 images, 8x8 latent, layers 1, 2, 4, 8, 8."""
        return cls(latent_size=(8, 8), layer_sizes=((1, 1), (2, 2), (4, 4), (8, 8), (8, 8)))


def layer_positions(latent_size: tuple[int, int], layer_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Eq. 1 for one layer: 0-indexed (y, x), row-major over (i, j)."""
    (h_d, w_d), (h_l, w_l) = latent_size, layer_size
    hp, wp = h_d // h_l, w_d // w_l  # h', w': downsample ratios
    ys = [hp * i - math.ceil(hp / 2) for i in range(1, h_l + 1)]  # eq. 1, minus 1 for 0-indexing
    xs = [wp * j - math.ceil(wp / 2) for j in range(1, w_l + 1)]
    return [(y, x) for y in ys for x in xs]


class PyramidSpec:
    """Everything derived from a ``PyramidConfig``: positions, masks, counts, gather indices.

    Attributes (``L`` layers, latent ``h x w``):
      num_layers, token_counts (n_l), cumulative_counts (sum of n_i for i <= l),
      masks [L, h, w] bool (masks[l-1] = P(l)), coverage [L, h, w] int (tokens at each position in
      the prefix <= l), covering_layers (prefix lengths whose positions cover the whole latent),
      flat_index (per layer [n_l] int64 indices into the row-major h*w grid).
    """

    def __init__(self, cfg: PyramidConfig):
        self.cfg = cfg
        self.latent_size: tuple[int, int] = tuple(cfg.latent_size)
        self.layer_sizes: tuple[tuple[int, int], ...] = tuple(tuple(s) for s in cfg.layer_sizes)
        self.num_layers = len(self.layer_sizes)
        h, w = self.latent_size
        self._positions = [layer_positions(self.latent_size, s) for s in self.layer_sizes]
        self.token_counts = tuple(hl * wl for hl, wl in self.layer_sizes)
        self.cumulative_counts = tuple(sum(self.token_counts[: l + 1]) for l in range(self.num_layers))
        self.flat_index = [
            torch.tensor([y * w + x for y, x in pos], dtype=torch.long) for pos in self._positions
        ]
        masks = torch.zeros(self.num_layers, h * w, dtype=torch.bool)
        for l, idx in enumerate(self.flat_index):
            masks[l, idx] = True
        self.masks = masks.view(self.num_layers, h, w)  # [L, h, w]
        self.coverage = self.masks.long().cumsum(0)  # [L, h, w]
        self.covering_layers = tuple(
            l + 1 for l in range(self.num_layers) if bool((self.coverage[l] > 0).all())
        )
        assert self.covering_layers and self.covering_layers[-1] == self.num_layers

    def positions(self, l: int) -> list[tuple[int, int]]:
        """P(l) of eq. 1 for 1-indexed layer ``l``: 0-indexed (y, x), row-major over (i, j)."""
        self._check_layer(l)
        return list(self._positions[l - 1])

    def gather(self, z: Tensor, l: int) -> Tensor:
        """[b, c, h, w] -> [b, n_l, c]: the latent vectors at P(l), in serialization order."""
        self._check_layer(l)
        b, c, h, w = z.shape
        assert (h, w) == self.latent_size, f"latent {(h, w)} != pyramid latent {self.latent_size}"
        idx = self.flat_index[l - 1].to(z.device)
        return z.reshape(b, c, h * w).index_select(2, idx).transpose(1, 2)  # [b, n_l, c]

    def layer_size(self, l: int) -> tuple[int, int]:
        self._check_layer(l)
        return self.layer_sizes[l - 1]

    def is_covering(self, l: int) -> bool:
        return l in self.covering_layers

    def _check_layer(self, l: int) -> None:
        if not isinstance(l, int) or not 1 <= l <= self.num_layers:
            raise ValueError(f"layer {l!r} is out of range; this pyramid has layers 1..{self.num_layers}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PyramidSpec) and self.cfg == other.cfg

    def __hash__(self) -> int:
        return hash(self.cfg)

    def __repr__(self) -> str:
        return (
            f"PyramidSpec(latent={self.latent_size}, layers={self.layer_sizes}, counts={self.token_counts})"
        )
