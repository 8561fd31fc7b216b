import math

import numpy as np
import pytest
import torch

from spae.metrics import (
    MissingMetricDependency,
    TokenUsage,
    check_optional_metrics,
    gaussian_window,
    label_word_accuracy,
    psnr,
    semantic_relevance,
    ssim,
    token_usage,
)


def test_psnr_identical_is_inf_and_known_mse():
    x = torch.rand(2, 3, 8, 8)
    assert torch.isinf(psnr(x, x)).all()
    y = x.clone()
    y[0] = (x[0] + 0.1).clamp(max=2.0)  # MSE exactly 0.01 -> 20 dB
    y[1] = x[1] + 0.01  # MSE 1e-4 -> 40 dB
    out = psnr(x, y)
    assert out[0].item() == pytest.approx(20.0, abs=1e-3)
    assert out[1].item() == pytest.approx(40.0, abs=1e-3)


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Direct loop form of SSIM for one grey image (valid windows), independent of the conv code."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    g /= g.sum()
    win = np.outer(g, g)
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (win * a).sum(), (win * b).sum()
            va = (win * (a - ma) ** 2).sum()
            vb = (win * (b - mb) ** 2).sum()
            cov = (win * (a - ma) * (b - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_identical_is_one_and_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 14, 13, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    ref = _ssim_reference(x[0, 0].numpy(), y[0, 0].numpy())
    assert ssim(x, y).item() == pytest.approx(ref, abs=1e-5)
    assert ref < 0.9  # the noise is visible
    # per channel then mean: a 3-channel image with the same content per channel gives the same value
    assert ssim(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)).item() == pytest.approx(ref, abs=1e-5)


def test_ssim_window_and_small_image_error():
    w = gaussian_window()
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0)
    assert w[5, 5] == w.max()
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_token_usage_hand_histogram():
    usage = TokenUsage(vocab_size=8)
    usage.update(torch.tensor([[0, 0], [1, 1]]))
    usage.update(torch.tensor([2, 3, 2, 3]))  # whole set: rows 0..3 twice each
    stats = usage.compute()
    assert stats.distinct == 4 and stats.total == 8
    assert stats.utilization == pytest.approx(0.5)
    assert stats.perplexity == pytest.approx(4.0)  # uniform over 4 rows
    skew = token_usage(torch.tensor([5, 5, 5, 6]), vocab_size=8)  # p = (3/4, 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert skew.perplexity == pytest.approx(math.exp(h))
    assert skew.utilization == pytest.approx(2 / 8)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        usage.update(torch.tensor([8]))


def test_semantic_relevance_hand_example():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # [v=3, d=2]
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # [b=2, d]
    # raw scores: image 0 -> (1, 0, .6), image 1 -> (0, 1, .8); s_min 0, s_max 1 for both
    ids = torch.tensor([[0, 2], [2, 2]])
    rel = semantic_relevance(ids, image, text, torch.zeros(2), torch.ones(2))
    assert rel.tolist() == pytest.approx([(1.0 + 0.6) / 2, 0.8])
    # normalisation of eq. 6: s_min .5, s_max 1 -> (0.6 - .5) / .5 = .2
    rel = semantic_relevance(torch.tensor([[2]]), image[:1], text, torch.tensor([0.5]), torch.tensor([1.0]))
    assert rel.item() == pytest.approx(0.2)


def test_label_word_accuracy():
    rows = [{10, 11}, {20}, {30, 31}]
    acc = label_word_accuracy(torch.tensor([10, 20, 99, 31]), torch.tensor([0, 1, 2, 2]), rows)
    assert acc == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="label 5"):
        label_word_accuracy(torch.tensor([1]), torch.tensor([5]), rows)


def test_optional_metrics_name_package_and_weights():
    with pytest.raises(MissingMetricDependency, match=r"inception_v3 state dict.*weights\.fid=PATH"):
        check_optional_metrics(["fid"], {})
    with pytest.raises(MissingMetricDependency, match="lpips"):
        check_optional_metrics(["lpips"], {"lpips": "/nonexistent.pth"})
    with pytest.raises(ValueError, match="unknown optional metric"):
        check_optional_metrics(["bleu"], {})
