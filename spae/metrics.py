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

Optional metrics, computed only from LOCAL weight files the user points to (nothing is downloaded):

- ``FID``: Frechet distance between Inception-v3 pool features (2048-d) of real and reconstructed
  images, ``|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` (Heusel et al. 2017).
- ``InceptionScore``: ``exp(E_x KL(p(y|x) || p(y)))`` of the reconstructions (Salimans et al. 2016),
  over the whole set as ONE split (``splits=1``; the usual 10-split mean is not computed).
- ``LPIPS``: Zhang et al. (2018), VGG16 variant (v0.1 form); with the published linear-layer weights it
  is LPIPS, without them the channels are averaged uniformly ("LPIPS-style, uncalibrated").

The Inception-v3 / VGG16 networks are torchvision's architectures with weights from a torchvision
state-dict file; ``check_optional_metrics`` names the weights key and the file that is missing. The
weight files and their errors live in ``spae.metric_weights``, the Frechet distance (FID, FVD) in
``spae.frechet``; ``OptionalMetrics`` also runs FVD (``spae.fvd``) on clips.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from spae.frechet import Moments, frechet_distance
from spae.fvd import FVD, I3D_SIZE, I3DFeatures
from spae.metric_weights import WEIGHT_FILES, MissingMetricDependency, load_weights
from spae.video import frames_as_images

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

OPTIONAL_METRICS: tuple[str, ...] = ("fid", "is", "lpips", "fvd")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_SIZE = 299
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS ScalingLayer, for inputs in [-1, 1]
LPIPS_SCALE = (0.458, 0.448, 0.450)
VGG16_STAGES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # features[a:b] -> relu1_2 ... relu5_3
VGG16_CHANNELS = (64, 128, 256, 512, 512)


def check_optional_metrics(names: Sequence[str], weights: Mapping[str, str]) -> None:
    """Raise ``MissingMetricDependency`` naming the weights key and file each requested metric needs.

    ``names`` e.g. ``["fid", "lpips"]``; ``weights`` maps a key of ``WEIGHT_FILES`` to a local path.
    ``lpips_linear`` is optional: without it LPIPS is reported as ``lpips_uncalibrated``.
    """
    for key in weights:
        if key not in WEIGHT_FILES:
            raise ValueError(f"unknown weights key {key!r}; choose from {', '.join(WEIGHT_FILES)}")
    for name in names:
        if name not in OPTIONAL_METRICS:
            raise ValueError(f"unknown optional metric {name!r}; choose from {', '.join(OPTIONAL_METRICS)}")
        keys = [name] + (["lpips_linear"] if name == "lpips" and weights.get("lpips_linear") else [])
        for key in keys:
            path = weights.get(key)
            if not path or not Path(path).is_file():
                raise MissingMetricDependency(
                    f"metric '{name}' needs {WEIGHT_FILES[key]} on local disk; set weights.{key}=PATH "
                    f"(got {path!r}, {'not a file' if path else 'unset'}); nothing is downloaded"
                )


def _load_into(module: torch.nn.Module, key: str, path: str | Path) -> None:
    try:
        module.load_state_dict(load_weights(key, path), strict=True)
    except RuntimeError as err:  # missing / unexpected keys, shape mismatches
        raise MissingMetricDependency(
            f"weights.{key}={str(path)!r} does not fit the network: {err}; it must hold {WEIGHT_FILES[key]}"
        ) from err


@dataclass(frozen=True)
class InceptionOutput:
    pool: Tensor  # [b, 2048] average-pooled features (before the fc), the FID features
    logits: Tensor  # [b, 1000] class logits, the IS predictions


class InceptionFeatures(torch.nn.Module):
    """torchvision Inception-v3 with local weights: images [b, 3, H, W] in [0, 1] -> pool + logits."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path: str | Path, key: str = "fid") -> InceptionFeatures:
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        _load_into(net, key, path)
        return cls(net)

    @torch.no_grad()
    def forward(self, images: Tensor) -> InceptionOutput:
        x = F.interpolate(images.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear")
        x = (x - self.mean) / self.std  # [b, 3, 299, 299]
        n = self.net
        for layer in (
            n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
            n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
            n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c,
        ):  # fmt: skip
            x = layer(x)  # the aux classifier is skipped: it only matters in training
        pool = n.avgpool(x).flatten(1)  # [b, 2048]
        return InceptionOutput(pool, n.fc(pool))  # [b, 2048], [b, 1000]


class FID:
    """FID over a whole evaluation set: ``update(real, fake)`` per batch, then ``compute()``.

    ``features`` maps images [b, 3, H, W] in [0, 1] to [b, d] (``InceptionFeatures`` -> pool, d = 2048);
    ``update_features`` takes features computed elsewhere (shared with IS).
    """

    def __init__(self, inception: InceptionFeatures | None = None):
        self.inception = inception
        self.real, self.fake = Moments(), Moments()

    def update(self, real: Tensor, fake: Tensor) -> None:
        _check_images(real, fake)
        assert self.inception is not None, "FID.update needs an inception network; use update_features"
        self.update_features(self.inception(real).pool, self.inception(fake).pool)

    def update_features(self, real: Tensor, fake: Tensor) -> None:
        self.real.update(real)
        self.fake.update(fake)

    def compute(self) -> float:
        return frechet_distance(*self.real.compute(), *self.fake.compute())


def inception_score_from_probs(probs: Tensor) -> float:
    """``exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y)`` the mean of ``probs`` [n, k] (one split)."""
    p = probs.double()
    marginal = p.mean(0, keepdim=True)  # [1, k]  p(y)
    kl = torch.xlogy(p, p).sum(1) - torch.xlogy(p, marginal.expand_as(p)).sum(1)  # [n]
    return math.exp(float(kl.mean()))


class InceptionScore:
    """IS of the reconstructions over the whole set as one split (``splits=1``).

    Streams ``sum_x sum_y p log p`` and ``sum_x p(y|x)``, since
    ``mean_x KL(p(y|x) || p(y)) = mean_x sum_y p log p - sum_y p(y) log p(y)``.
    """

    def __init__(self, inception: InceptionFeatures | None = None):
        self.inception = inception
        self.n = 0
        self.neg_entropy = 0.0
        self.prob_sum: Tensor | None = None  # [k]

    def update(self, images: Tensor) -> None:
        assert self.inception is not None, "InceptionScore.update needs an inception network"
        self.update_logits(self.inception(images).logits)

    def update_logits(self, logits: Tensor) -> None:
        p = logits.detach().double().cpu().softmax(-1)  # [b, k]  p(y|x)
        self.n += p.shape[0]
        self.neg_entropy += float(torch.xlogy(p, p).sum())
        self.prob_sum = p.sum(0) if self.prob_sum is None else self.prob_sum + p.sum(0)

    def compute(self) -> float:
        if self.n == 0:
            raise ValueError("InceptionScore.compute() before any update()")
        marginal = self.prob_sum / self.n  # [k]
        return math.exp(self.neg_entropy / self.n - float(torch.xlogy(marginal, marginal).sum()))


def _linear_weights(state: Mapping[str, Tensor], path: str | Path) -> list[Tensor]:
    """lin0..lin4 weights [1, C, 1, 1]; keys ``lin<i>``, ``lin<i>.weight`` or ``lin<i>.model.1.weight``."""
    out = []
    for i, c in enumerate(VGG16_CHANNELS):
        found = [state[k] for k in (f"lin{i}", f"lin{i}.weight", f"lin{i}.model.1.weight") if k in state]
        if not found or tuple(found[0].shape) != (1, c, 1, 1):
            raise MissingMetricDependency(
                f"weights.lpips_linear={str(path)!r}: needs lin{i} of shape [1, {c}, 1, 1] "
                f"(keys lin{i}, lin{i}.weight or lin{i}.model.1.weight), found "
                f"{tuple(found[0].shape) if found else 'none'}; it must hold {WEIGHT_FILES['lpips_linear']}"
            )
        out.append(found[0].float())
    return out


class LPIPS(torch.nn.Module):
    """LPIPS-VGG (v0.1 form): images [b, 3, H, W] in [0, 1] x2 -> [b] distance.

    Per stage (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16): features unit-normalised over
    channels, squared difference, weighted by the linear layer ``w_c`` and summed over channels (or, with
    no linear weights, averaged over channels: uncalibrated), averaged over positions; summed over stages.
    """

    def __init__(self, vgg_features: torch.nn.Sequential, linear: Sequence[Tensor] | None = None):
        super().__init__()
        self.stages = torch.nn.ModuleList(vgg_features[a:b] for a, b in VGG16_STAGES).eval()
        self.calibrated = linear is not None
        lin = linear or [torch.full((1, c, 1, 1), 1.0 / c) for c in VGG16_CHANNELS]  # uniform = mean
        for i, w in enumerate(lin):
            self.register_buffer(f"lin{i}", w.float(), persistent=False)  # [1, C, 1, 1]
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    @property
    def name(self) -> str:
        return "lpips" if self.calibrated else "lpips_uncalibrated"

    @classmethod
    def from_files(cls, vgg_path: str | Path, linear_path: str | Path | None = None) -> LPIPS:
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"])  # vgg16.features; the classifier is never needed
        state = load_weights("lpips", vgg_path)
        if any(k.startswith("features.") for k in state):  # a whole vgg16 state dict
            state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        try:
            features.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise MissingMetricDependency(
                f"weights.lpips={str(vgg_path)!r} does not fit vgg16.features: {err}; "
                f"it must hold {WEIGHT_FILES['lpips']}"
            ) from err
        linear = (
            _linear_weights(load_weights("lpips_linear", linear_path), linear_path) if linear_path else None
        )
        return cls(features, linear)

    def _features(self, images: Tensor) -> list[Tensor]:
        x = (images.float() * 2.0 - 1.0 - self.shift) / self.scale  # [b, 3, H, W]  ScalingLayer
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # [b, C, h, w] unit channels
        return feats

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_images(x, y)
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for i, (fx, fy) in enumerate(zip(self._features(x), self._features(y), strict=True)):
            d = (fx - fy).pow(2) * getattr(self, f"lin{i}")  # [b, C, h, w]
            total = total + d.sum(1).flatten(1).mean(1)  # [b]  channels, then spatial mean
        return total


class OptionalMetrics:
    """The requested FID / IS / LPIPS / FVD, built from local files, accumulated over a whole evaluation set.

    ``update(real, fake)`` per batch, then ``compute()`` ->
    ``{"fid": ..., "is": ..., "lpips" | "lpips_uncalibrated": ..., "fvd": ...}``. Inputs are images
    ``[b, 3, H, W]`` or clips ``[b, 3, T, H, W]`` in [0, 1]: for clips FID / IS / LPIPS run on every
    frame (``[b*T, 3, H, W]``) and FVD on the clips; FVD with images is an error. One Inception network
    is shared when FID and IS use the same file. ``fvd_size``: the frame side fed to I3D (224, the
    reference; smaller only for quick tests).
    """

    def __init__(
        self,
        names: Sequence[str],
        weights: Mapping[str, str],
        device: str | torch.device = "cpu",
        fvd_size: int | None = None,
    ):
        check_optional_metrics(names, weights)
        nets: dict[str, InceptionFeatures] = {}

        def inception(key: str) -> InceptionFeatures:
            path = str(Path(weights[key]).resolve())
            if path not in nets:
                nets[path] = InceptionFeatures.from_file(path, key).to(device)
            return nets[path]

        self.fid = FID(inception("fid")) if "fid" in names else None
        self.inception_score = InceptionScore(inception("is")) if "is" in names else None
        self.lpips = (
            LPIPS.from_files(weights["lpips"], weights.get("lpips_linear") or None).to(device)
            if "lpips" in names
            else None
        )
        self.lpips_sum, self.lpips_n = 0.0, 0
        self.fvd = None
        if "fvd" in names:
            self.fvd = FVD(I3DFeatures.from_file(weights["fvd"], size=fvd_size or I3D_SIZE).to(device))

    @torch.no_grad()
    def update(self, real: Tensor, fake: Tensor) -> None:
        if real.dim() == 5 and fake.dim() == 5:  # clips [b, 3, T, H, W]
            if real.shape != fake.shape:
                raise ValueError(
                    f"expected two clip batches [b, c, T, H, W] of the same shape, "
                    f"got {real.shape} and {fake.shape}"
                )
            if self.fvd is not None:
                self.fvd.update(real, fake)
            real, fake = frames_as_images(real), frames_as_images(fake)  # [b*T, 3, H, W]
        elif self.fvd is not None:
            raise ValueError(
                f"metric 'fvd' needs clips [b, 3, T, H, W]; got inputs of shape {tuple(real.shape)} "
                f"and {tuple(fake.shape)}"
            )
        self._update_images(real, fake)

    def _update_images(self, real: Tensor, fake: Tensor) -> None:
        _check_images(real, fake)
        fake_out = None
        if self.fid is not None:
            both = self.fid.inception(torch.cat([real, fake]))  # one batched pass: [2b, ...]
            b = real.shape[0]
            fake_out = InceptionOutput(both.pool[b:], both.logits[b:])
            self.fid.update_features(both.pool[:b], fake_out.pool)
        if self.inception_score is not None:
            shared = fake_out is not None and self.inception_score.inception is self.fid.inception
            self.inception_score.update_logits(
                (fake_out if shared else self.inception_score.inception(fake)).logits
            )
        if self.lpips is not None:
            self.lpips_sum += float(self.lpips(real, fake).double().sum())
            self.lpips_n += real.shape[0]

    def compute(self) -> dict[str, float]:
        out = {}
        if self.fid is not None:
            out["fid"] = self.fid.compute()
        if self.inception_score is not None:
            out["is"] = self.inception_score.compute()
        if self.lpips is not None:
            if self.lpips_n == 0:
                raise ValueError("OptionalMetrics.compute() before any update()")
            out[self.lpips.name] = self.lpips_sum / self.lpips_n
        if self.fvd is not None:
            out["fvd"] = self.fvd.compute()
        return out
