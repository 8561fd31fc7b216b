"""The token pyramid: which latent positions each layer quantizes (eq. 1), over (h, w) or (t, h, w).

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

Video (the 3D variant): ``latent_size = (t_D, h_D, w_D)`` and every layer ``(t_l, h_l, w_l)``; eq. 1's
subsampler is applied per axis (``t' = t_D / t_l``), positions are 0-indexed ``(t, y, x)`` and the
serialization order is row-major over ``(k, i, j)``: time outermost, then rows, then columns. E.g.
``PyramidConfig.moving_mnist()``: a 4x8x8 latent, layers 1x1x1, 1x2x2, 2x4x4, 4x8x8, 4x8x8.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PyramidConfig:
    latent_size: tuple[int, ...] = (8, 8)  # (h_D, w_D), or (t_D, h_D, w_D) for video
    layer_sizes: tuple[tuple[int, ...], ...] = (
        (1, 1),
        (2, 2),
        (4, 4),
        (8, 8),
        (8, 8),
    )  # (h_l, w_l) or (t_l, h_l, w_l), l = 1..D

    def __post_init__(self) -> None:
        # normalise lists (hand-made configs) to tuples so the config stays hashable
        object.__setattr__(self, "latent_size", tuple(int(v) for v in self.latent_size))
        object.__setattr__(self, "layer_sizes", tuple(tuple(int(v) for v in s) for s in self.layer_sizes))
        dims = len(self.latent_size)
        if dims not in (2, 3) or any(len(s) != dims for s in self.layer_sizes):
            raise ValueError(
                "pyramid.latent_size must be (h, w) or (t, h, w) and every pyramid.layer_sizes entry must "
                f"have the same length; got latent {self.latent_size}, layers {self.layer_sizes}"
            )
        if any(d < 1 for d in self.latent_size):
            raise ValueError(f"pyramid.latent_size must be positive, got {self.latent_size}")
        if not self.layer_sizes:
            raise ValueError("pyramid.layer_sizes is empty; give at least one layer (h_l, w_l)")
        prev = (0,) * dims
        for l, size in enumerate(self.layer_sizes, start=1):
            if any(n < 1 for n in size):
                raise ValueError(f"pyramid layer {l}: size {size} must be positive")
            if any(n < p for n, p in zip(size, prev, strict=True)):
                raise ValueError(
                    f"pyramid layer {l}: size {size} is smaller than layer {l - 1}'s {prev}; "
                    "the pyramid needs h_l <= h_(l+1) and w_l <= w_(l+1) (and t_l <= t_(l+1))"
                )
            if any(n > d or d % n for n, d in zip(size, self.latent_size, strict=True)):
                raise ValueError(
                    f"pyramid layer {l}: size {size} must divide the latent size {self.latent_size} "
                    "(h_D % h_l == 0 and w_D % w_l == 0, and t_D % t_l == 0)"
                )
            prev = size
        if tuple(self.layer_sizes[-1]) != tuple(self.latent_size):
            raise ValueError(
                f"pyramid layer {len(self.layer_sizes)} (the last): size {self.layer_sizes[-1]} must equal "
                f"the latent size {self.latent_size} so that every latent position gets a token"
            )

    @property
    def dims(self) -> int:
        """2 for images (h, w), 3 for video (t, h, w)."""
        return len(self.latent_size)

    @classmethod
    def paper(cls) -> PyramidConfig:
        """128x128 images, 16x16 latent, 2^k x 2^k tokens with k = 0, 1, 2, 3, 4, 4."""
        return cls(latent_size=(16, 16), layer_sizes=((1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (16, 16)))

    @classmethod
    def mnist(cls) -> PyramidConfig:
        """32x32 images, 8x8 latent, layers 1, 2, 4, 8, 8."""
        return cls(latent_size=(8, 8), layer_sizes=((1, 1), (2, 2), (4, 4), (8, 8), (8, 8)))

    @classmethod
    def moving_mnist(cls) -> PyramidConfig:
        """16 frames of 32x32, a 4x8x8 latent: layers 1x1x1, 1x2x2, 2x4x4, 4x8x8, 4x8x8."""
        return cls(latent_size=(4, 8, 8), layer_sizes=((1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8), (4, 8, 8)))

    @classmethod
    def kinetics(cls) -> PyramidConfig:
        """16 frames of 128x128, a 4x16x16 latent: 1x1x1, 1x2x2, 2x4x4, 4x8x8, 4x16x16, 4x16x16."""
        return cls(
            latent_size=(4, 16, 16),
            layer_sizes=((1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8), (4, 16, 16), (4, 16, 16)),
        )


def layer_positions(latent_size: tuple[int, ...], layer_size: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Eq. 1 for one layer, per axis: 0-indexed (y, x) or (t, y, x), row-major over (i, j) / (k, i, j)."""
    axes = []
    for d, n in zip(latent_size, layer_size, strict=True):
        r = d // n  # h', w' (t'): downsample ratio of this axis
        axes.append([r * i - math.ceil(r / 2) for i in range(1, n + 1)])  # eq. 1, minus 1 for 0-indexing
    return list(itertools.product(*axes))


class PyramidSpec:
    """Everything derived from a ``PyramidConfig``: positions, masks, counts, gather indices.

    Attributes (``L`` layers, latent ``h x w``, or ``t x h x w`` for video: read ``*latent`` below):
      num_layers, token_counts (n_l), cumulative_counts (sum of n_i for i <= l),
      masks [L, *latent] bool (masks[l-1] = P(l)), coverage [L, *latent] int (tokens at each position
      in the prefix <= l), covering_layers (prefix lengths whose positions cover the whole latent),
      flat_index (per layer [n_l] int64 indices into the row-major flattened latent).
    """

    def __init__(self, cfg: PyramidConfig):
        self.cfg = cfg
        self.latent_size: tuple[int, ...] = tuple(cfg.latent_size)
        self.layer_sizes: tuple[tuple[int, ...], ...] = tuple(tuple(s) for s in cfg.layer_sizes)
        self.num_layers = len(self.layer_sizes)
        self.dims = len(self.latent_size)  # 2: (h, w), 3: (t, h, w)
        self.num_positions = math.prod(self.latent_size)
        self._positions = [layer_positions(self.latent_size, s) for s in self.layer_sizes]
        self.token_counts = tuple(math.prod(s) for s in self.layer_sizes)
        self.cumulative_counts = tuple(sum(self.token_counts[: l + 1]) for l in range(self.num_layers))
        strides = [math.prod(self.latent_size[a + 1 :]) for a in range(self.dims)]  # row-major
        self.flat_index = [
            torch.tensor(
                [sum(p * s for p, s in zip(pos, strides, strict=True)) for pos in layer], dtype=torch.long
            )
            for layer in self._positions
        ]
        masks = torch.zeros(self.num_layers, self.num_positions, dtype=torch.bool)
        for l, idx in enumerate(self.flat_index):
            masks[l, idx] = True
        self.masks = masks.view(self.num_layers, *self.latent_size)  # [L, *latent]
        self.coverage = self.masks.long().cumsum(0)  # [L, *latent]
        self.covering_layers = tuple(
            l + 1 for l in range(self.num_layers) if bool((self.coverage[l] > 0).all())
        )
        assert self.covering_layers and self.covering_layers[-1] == self.num_layers
        # per layer: P(l) is every position (in order), and the positions covered by the prefix <= l
        every = torch.arange(self.num_positions)
        self.full_layers = tuple(bool(torch.equal(i, every)) for i in self.flat_index)
        self.covered_counts = tuple(int(self.coverage[l].count_nonzero()) for l in range(self.num_layers))
        self._on_device: dict[str, tuple[list[Tensor], Tensor]] = {}

    def device_tensors(self, device: torch.device | str) -> tuple[list[Tensor], Tensor]:
        """``flat_index`` per layer and ``coverage`` as float ``[L, prod(latent)]`` on ``device`` (made once
        per device)."""
        key = str(device)
        if key not in self._on_device:
            idx = [i.to(device) for i in self.flat_index]
            cov = self.coverage.reshape(self.num_layers, -1).to(device=device, dtype=torch.float32)
            self._on_device[key] = (idx, cov)
        return self._on_device[key]

    def positions(self, l: int) -> list[tuple[int, ...]]:
        """P(l) of eq. 1 for 1-indexed layer ``l``: 0-indexed (y, x) or (t, y, x), row-major."""
        self._check_layer(l)
        return list(self._positions[l - 1])

    def gather(self, z: Tensor, l: int) -> Tensor:
        """[b, c, *latent] -> [b, n_l, c]: the latent vectors at P(l), in serialization order."""
        self._check_layer(l)
        b, c, *latent = z.shape
        assert tuple(latent) == self.latent_size, (
            f"latent {tuple(latent)} != pyramid latent {self.latent_size}"
        )
        idx = self.flat_index[l - 1].to(z.device)
        return z.reshape(b, c, self.num_positions).index_select(2, idx).transpose(1, 2)  # [b, n_l, c]

    def layer_size(self, l: int) -> tuple[int, ...]:
        self._check_layer(l)
        return self.layer_sizes[l - 1]

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
