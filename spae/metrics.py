"""Evaluation metrics: reconstruction (PSNR, SSIM), codebook usage, semantic relevance, label words.

Images are float tensors ``[b, 3, H, W]`` in ``[0, 1]``. Every image metric is computed per image
and returned as ``[b]`` so an evaluator can average over a whole evaluation set batch by batch.

- ``psnr``: ``10 log10(1 / MSE)`` per image (``inf`` for identical images).
- ``ssim``: Wang et al. (2004) with an 11x11 gaussian window (sigma 1.5), ``K1 = 0.01``,
  ``K2 = 0.03``, data range 1, "valid" filtering, averaged over channels and positions.
- ``TokenUsage``: counts of every codebook row over the WHOLE evaluation set (not a buffer) ->
  utilization (fraction of rows used) and perplexity (``exp`` of the entropy of the histogram).
- ``semantic_relevance``: the mean normalised eq. 6 score ``s(I, k)`` of the tokens an image was
  given, the analogue of the paper's CLIP score.
- ``label_word_accuracy``: the fraction of images whose top-layer token is one of its class's words.

FID / IS / LPIPS need third-party packages and pretrained weights that this project does not
ship; ``check_optional_metrics`` names what is missing.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_images(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"expected two image batches [b, c, H, W] of the same shape, got {x.shape} and {y.shape}"
        )


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """[b, c, H, W] x2 -> [b] dB; ``inf`` where the images are identical."""
    _check_images(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)  # [b]
    return (10.0 * torch.log10(data_range**2 / mse)).float()  # mse == 0 -> inf


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """[size, size] normalised gaussian kernel."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)  # [size, size]


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """[b, c, H, W] x2 -> [b] mean SSIM per image (gaussian window 11, sigma 1.5, valid filtering)."""
    _check_images(x, y)
    b, c, h, w = x.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    x, y = x.double(), y.double()
    kernel = gaussian_window().to(x.device).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)  # [c, 1, 11, 11]

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=c)  # [b, c, H - 10, W - 10]

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(1).float()  # [b]


@dataclass(frozen=True)
class UsageStats:
    utilization: float  # fraction of codebook rows used at least once
    perplexity: float  # exp(entropy of the usage histogram), in [1, vocab_size]
    distinct: int  # rows used at least once
    total: int  # tokens counted


class TokenUsage:
    """Codebook usage over a whole evaluation set: ``update(ids)`` per batch, then ``compute()``."""

    def __init__(self, vocab_size: int):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        self.counts = torch.zeros(vocab_size, dtype=torch.long)  # [v]

    def update(self, ids: Tensor) -> None:
        flat = ids.detach().reshape(-1).long().cpu()
        if flat.numel() and (flat.min() < 0 or flat.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got [{flat.min()}, {flat.max()}]"
            )
        self.counts += torch.bincount(flat, minlength=self.vocab_size)

    def compute(self) -> UsageStats:
        total = int(self.counts.sum())
        if total == 0:
            raise ValueError("TokenUsage.compute() before any update(): no tokens counted")
        p = self.counts.double() / total
        nz = p[p > 0]
        entropy = float(-(nz * nz.log()).sum())
        distinct = int((self.counts > 0).sum())
        return UsageStats(distinct / self.vocab_size, math.exp(entropy), distinct, total)


def token_usage(ids: Tensor, vocab_size: int) -> UsageStats:
    """Usage of one batch of ids (any shape); for an evaluation set use ``TokenUsage``."""
    usage = TokenUsage(vocab_size)
    usage.update(ids)
    return usage.compute()


def semantic_relevance(
    ids: Tensor, image_features: Tensor, text_features: Tensor, s_min: Tensor, s_max: Tensor
) -> Tensor:
    """Mean normalised eq. 6 score of the tokens each image was given.

    ids [b, n] codebook rows, image_features [b, d], text_features [v, d], s_min / s_max [b]
    (the min and max of ``f_I(I) . f_T(j)`` over the whole vocabulary, from the pools table) -> [b].
    """
    if ids.dim() == 1:
        ids = ids[:, None]
    ids = ids.reshape(ids.shape[0], -1).long()
    feats = text_features[ids].float()  # [b, n, d]
    raw = torch.einsum("bnd,bd->bn", feats, image_features.float())  # [b, n]  s'(I, k)
    span = (s_max - s_min).float().clamp_min(1e-12)[:, None]
    score = (raw - s_min.float()[:, None]) / span  # [b, n]  eq. 6
    return score.mean(1)  # [b]


def label_word_accuracy(top_ids: Tensor, labels: Tensor, class_token_rows: Sequence[set[int]]) -> float:
    """Fraction of images whose top-layer token is one of its class's words.

    top_ids [b] (layer-1 token per image), labels [b] class indices into ``class_token_rows``
    (e.g. for MNIST class 7 -> the rows of "seven" and "7").
    """
    top = top_ids.reshape(-1).tolist()
    labs = labels.reshape(-1).tolist()
    if len(top) != len(labs):
        raise ValueError(f"{len(top)} top-layer tokens for {len(labs)} labels")
    if not top:
        raise ValueError("label_word_accuracy on an empty batch")
    for lab in labs:
        if not 0 <= lab < len(class_token_rows):
            raise ValueError(f"label {lab} has no class words; classes are 0..{len(class_token_rows) - 1}")
    hits = sum(int(t in class_token_rows[lab]) for t, lab in zip(top, labs, strict=True))
    return hits / len(top)


# ----------------------------------------------------------------------------- optional metrics

# metric -> (python package that implements it, pretrained weights it needs)
OPTIONAL_METRICS: dict[str, tuple[str, str]] = {
    "fid": (
        "torchmetrics (with torch-fidelity)",
        "the FID Inception-v3 weights pt_inception-2015-12-05-6726825d.pth",
    ),
    "is": (
        "torchmetrics (with torch-fidelity)",
        "the FID Inception-v3 weights pt_inception-2015-12-05-6726825d.pth",
    ),
    "lpips": ("lpips", "the LPIPS backbone and linear-layer weights (e.g. vgg16 + lpips v0.1 vgg.pth)"),
}
_PACKAGE_MODULES = {
    "fid": ("torchmetrics", "torch_fidelity"),
    "is": ("torchmetrics", "torch_fidelity"),
    "lpips": ("lpips",),
}


class MissingMetricDependency(RuntimeError):
    """An optional metric was asked for without its package or its local weights."""


def check_optional_metrics(names: Sequence[str], weights: Mapping[str, str]) -> None:
    """Raise ``MissingMetricDependency`` naming the package and weights file each requested metric needs.

    ``names`` e.g. ``["fid", "lpips"]``; ``weights`` maps a metric to a local weights path. Nothing is
    downloaded: every metric needs its package installed and its weights file on disk.
    """
    for name in names:
        if name not in OPTIONAL_METRICS:
            raise ValueError(f"unknown optional metric {name!r}; choose from {', '.join(OPTIONAL_METRICS)}")
        package, needs = OPTIONAL_METRICS[name]
        missing = [m for m in _PACKAGE_MODULES[name] if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingMetricDependency(
                f"metric '{name}' needs the package {package} (missing: {', '.join(missing)}), which this "
                f"project does not install, and {needs} on local disk (weights.{name}=PATH); "
                f"install the package yourself or drop '{name}' from the metrics"
            )
        path = weights.get(name)
        if not path or not Path(path).is_file():
            raise MissingMetricDependency(
                f"metric '{name}' needs {needs} on local disk; set weights.{name}=PATH "
                f"(got {path!r}); nothing is downloaded"
            )
