"""The Frechet distance between Gaussian fits of two feature sets, shared by FID (``spae.metrics``,
Heusel et al. 2017) and FVD (``spae.fvd``, Unterthiner et al. 2018):

    d = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

``Moments`` streams a set's mean and covariance batch by batch, ``frechet_distance`` compares two fits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))`` in float64 (real part).

    As in the reference FID code, a singular product gets ``eps * I`` added to both covariances.
    """
    from scipy import linalg  # lazy: scipy takes ~0.5 s to import and only a Frechet distance needs it

    m1, m2 = mu1.double().cpu().numpy(), mu2.double().cpu().numpy()
    s1, s2 = sigma1.double().cpu().numpy(), sigma2.double().cpu().numpy()
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


class Moments:
    """Running sum and outer-product sum of feature rows in float64 -> mean and unbiased covariance."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: Tensor | None = None  # [d]
        self.outer: Tensor | None = None  # [d, d]

    def update(self, feats: Tensor) -> None:
        f = feats.detach().double().cpu().reshape(feats.shape[0], -1)  # [b, d]
        if self.sum is None:
            self.sum, self.outer = f.new_zeros(f.shape[1]), f.new_zeros(f.shape[1], f.shape[1])
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def compute(self) -> tuple[Tensor, Tensor]:
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images per set for a covariance, got {self.n}")
        mu = self.sum / self.n  # [d]
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)  # [d, d]
        return mu, sigma
