"""Reference computations shared by the metric tests (FID, FVD)."""

from __future__ import annotations

import numpy as np
import torch


def numpy_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Frechet distance written out with numpy: tr sqrt(S1 S2) = sum of sqrt(eigenvalues of S1 S2)."""
    a, b = a.double().numpy(), b.double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum())


def streamed_distance(metric, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Feed ``metric`` (FID, FVD) one row pair at a time, then compute: the accumulation must be exact."""
    for i in range(real.shape[0]):
        metric.update_features(real[i : i + 1], fake[i : i + 1])
    return metric.compute()
