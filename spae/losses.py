"""The SPAE training losses (section 3.1): semantic (eq. 4, 7), appearance (eq. 8), total (eq. 9).

Legend: ``b`` batch, ``n_l`` tokens of layer l, ``c`` codebook dim, ``v`` codebook rows, ``k`` pool
size, ``l`` semantic layer. Every term is its own function; ``appearance_loss`` is the one place
that weighs the eq. 8 terms and ``spae_total`` the one place for eq. 9.

Semantic temperature: eq. 7 uses logits ``-||z_l - e||^2``. With codebook rows of norm ~1 the
softmax over thousands of words is nearly flat even at ``z_l = e(c)``, so training inflates
``|z|`` to sharpen it. ``semantic_temperature`` T < 1 (logits ``-||z_l - e||^2 / T``) sharpens the
softmax without inflating ``|z|``; T = 1 is eq. 7 as printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spae.metrics import IMAGENET_MEAN, IMAGENET_STD
from spae.video import frames_as_images


@dataclass(frozen=True)
class LossConfig:
    alpha: float = 1.0  # eq. 9 semantic weight
    beta: float = 0.33  # eq. 8 commitment
    gan_weight: float = 0.1  # lambda, eq. 8
    perceptual_weight: float = 0.1  # eta, eq. 8
    lecam_weight: float = 1e-4  # phi, eq. 8
    codebook_weight: float = 1.0  # VQ-VAE codebook loss of a learned table (not in eq. 8: frozen there)
    semantic_layers: int = 5  # D': layers 1..D' get the semantic loss
    thresholds: tuple[float, ...] = (0.98, 0.95, 0.9, 0.85, 0.8)  # rho_l, eq. 4 (len == semantic_layers)
    semantic_temperature: float = 1.0  # logits = -||z_l - e||^2 / T; T = 1 is eq. 7 as printed
    # eq. 7's c ~ C_l(I): "uniform" (the paper: every position draws a candidate at random) or "ranked"
    # (position j of layer l gets the candidate of rank j mod |C_l|: layer 1 the top word, layer 2 the top
    # four, ...; for images of several words, where uniform draws pull every position to one word)
    semantic_targets: Literal["uniform", "ranked"] = "uniform"
    dynamic_weight: bool = True  # w = sg(L_app / L_sem); False: w = 1
    max_dynamic_weight: float = 0.0  # 0 = no cap
    lecam_ema_decay: float = 0.999
    perceptual_weights: str = ""  # torchvision VGG16 weights file; "" = perceptual loss OFF

    def __post_init__(self) -> None:
        if len(self.thresholds) != self.semantic_layers:
            raise ValueError(
                f"thresholds has {len(self.thresholds)} values but semantic_layers={self.semantic_layers}"
            )
        if any(a < b for a, b in zip(self.thresholds, self.thresholds[1:], strict=False)):
            raise ValueError(f"thresholds {self.thresholds} must be non-increasing (rho_l >= rho_l+1, eq. 4)")
        if self.semantic_targets not in ("uniform", "ranked"):
            raise ValueError(f"semantic_targets={self.semantic_targets!r}; allowed: uniform, ranked")
        if self.semantic_temperature <= 0:
            raise ValueError(f"semantic_temperature={self.semantic_temperature} must be > 0")
        if not 0.0 <= self.lecam_ema_decay < 1.0:
            raise ValueError(f"lecam_ema_decay={self.lecam_ema_decay} must be in [0, 1)")
        if min(self.weights.values()) < 0 or min(self.alpha, self.max_dynamic_weight) < 0:
            raise ValueError("loss weights must be >= 0")

    @property
    def weights(self) -> dict[str, float]:
        """The weight of every named appearance term (eq. 8), in the order they are summed. A term
        without a weight here is an error in ``appearance_loss``, never dropped."""
        return {
            "reconstruction": 1.0,  # ||I - Î||^2
            "commitment": self.beta,  # beta sum_l ||Z - sg(Ẑ<=l)||^2
            "codebook": self.codebook_weight,  # ||sg(z_l) - e(k_l)||^2 (learned tables)
            "gan": self.gan_weight,  # lambda L_GAN
            "perceptual": self.perceptual_weight,  # eta L_Perceptual
            "lecam": self.lecam_weight,  # phi L_LeCAM
        }

    @property
    def perceptual_enabled(self) -> bool:
        return bool(self.perceptual_weights) and self.perceptual_weight > 0

    def describe(self) -> str:
        """One log line saying which eq. 8 / 9 terms are on."""
        perceptual = (
            f"perceptual ON (eta={self.perceptual_weight}, VGG16 weights {self.perceptual_weights})"
            if self.perceptual_enabled
            else "perceptual OFF (no perceptual_weights file)"
            if self.perceptual_weight > 0
            else "perceptual OFF (eta=0)"
        )
        w = f"dynamic w (cap {self.max_dynamic_weight or 'none'})" if self.dynamic_weight else "w=1"
        return (
            f"losses: L2 + beta={self.beta} x commitment, GAN lambda={self.gan_weight}, {perceptual}, "
            f"LeCAM phi={self.lecam_weight}; semantic alpha={self.alpha} on layers 1..{self.semantic_layers} "
            f"(rho={list(self.thresholds)}, T={self.semantic_temperature}), {w}"
        )


_SEMANTIC_12 = {"semantic_layers": 2, "thresholds": (0.98, 0.95)}
# per model preset (spae.model.PRESETS): the loss a run of that preset starts from. The small presets put
# the semantic loss on layers 1-2 (on layers 1-3 the mnist model loses ~1.5 dB, docs/RESULTS.md); the
# paper's layouts keep eq. 4's five thresholds.
_PRESET_LOSSES: dict[str, dict] = {
    "tiny": _SEMANTIC_12,
    "mnist": _SEMANTIC_12,
    "paper": {},
    "tiny3d": _SEMANTIC_12,
    "moving-mnist": _SEMANTIC_12,
    "kinetics": {},
    # colour scenes hold ~10 words each: the semantic loss on layers 1-3 (21 tokens); the word probe's pools
    # hold the key words at rho 0.95 (98% of held-out scenes) and 82% of all words at 0.8 (docs/RESULTS.md);
    # ranked targets, as uniform draws pull every position of a layer to one word
    "scenes": {"semantic_layers": 3, "thresholds": (0.98, 0.95, 0.8), "semantic_targets": "ranked"},
}


def loss_preset(name: str) -> LossConfig:
    """The training loss defaults of model preset ``name`` (``spae.model.preset``)."""
    if name not in _PRESET_LOSSES:
        raise ValueError(f"unknown SPAE preset {name!r}; allowed: {', '.join(_PRESET_LOSSES)}")
    return LossConfig(**_PRESET_LOSSES[name])


def check_semantic_layers(cfg: LossConfig, num_layers: int) -> None:
    """Eq. 7 applies to layers 1..D': D' must not exceed the pyramid's ``num_layers``."""
    if cfg.semantic_layers > num_layers:
        raise ValueError(
            f"loss.semantic_layers={cfg.semantic_layers} exceeds the pyramid's {num_layers} layers"
        )


# --------------------------------------------------------------------------- semantic loss


def candidate_mask(pool_scores: Tensor, thresholds: Sequence[float]) -> Tensor:
    """Eq. 4: ``[b, k]`` normalised scores (eq. 6, computed by the pools job) -> ``[l, b, k]`` bool.

    Padding entries should carry a NaN or -inf score; they never pass a threshold.
    """
    # thresholds stay Python floats: no host -> device copy (a sync) per step
    return torch.stack(
        [pool_scores >= float(rho) for rho in thresholds]
    )  # [l, b, k], s(I, k) >= rho_l (eq. 4)


def sample_semantic_targets(
    pool_ids: Tensor,
    pool_scores: Tensor,
    thresholds: Sequence[float],
    token_counts: Sequence[int],
    generator: torch.Generator | None = None,
    mode: str = "uniform",
) -> list[Tensor]:
    """A candidate c in C_l(I) for every latent position of layers 1..len(thresholds): drawn uniformly
    (``mode="uniform"``, eq. 7), or (``"ranked"``) the candidate of rank ``j mod |C_l(I)|`` in pool order
    (highest score first) for the layer's ``j``-th position in serialization order.

    pool_ids ``[b, k]`` codebook rows (-1 = padding), pool_scores ``[b, k]``; returns per semantic
    layer ``[b, n_l]`` int64 codebook rows, -1 where an image has no candidate at that layer.
    """
    if len(token_counts) < len(thresholds):
        raise ValueError(f"{len(thresholds)} thresholds but only {len(token_counts)} pyramid layers")
    valid = pool_ids >= 0  # [b, k]
    mask = candidate_mask(pool_scores, thresholds) & valid  # [l, b, k]
    targets = []
    for layer, n in enumerate(token_counts[: len(thresholds)]):
        m = mask[layer]  # [b, k]
        has = m.any(dim=1)  # [b]
        if mode == "ranked":
            order = torch.sort(
                pool_scores.masked_fill(~m, float("-inf")), dim=1, descending=True, stable=True
            )
            count = m.sum(dim=1).clamp_min(1)  # [b] |C_l(I)|
            rank = torch.arange(n, device=m.device)[None, :] % count[:, None]  # [b, n_l]
            picks = order.indices.gather(1, rank)  # [b, n_l] pool columns, best first
        else:
            probs = torch.where(has[:, None], m, torch.ones_like(m)).float()  # uniform over candidates
            picks = torch.multinomial(probs, n, replacement=True, generator=generator)  # [b, n_l]
        rows = pool_ids.long().gather(1, picks)  # [b, n_l]
        targets.append(torch.where(has[:, None], rows, torch.full_like(rows, -1)))
    return targets


class _StreamingLogSumExp(torch.autograd.Function):
    """lse_k((2 z.e_k - |e_k|^2) / T) over codebook chunks; backward recomputes the softmax per chunk.

    Memory is ``[N, chunk]`` in both passes; the codebook gets no gradient. Each chunk's logits are one
    GEMM with the ``-|e_k|^2 / T`` row folded in (``addmm``), and the backward turns them into softmax
    probabilities in place: no elementwise pass over ``[N, chunk]`` beyond the softmax itself.
    d lse / d z = (2 / T) sum_k p_k e_k.
    """

    @staticmethod
    def forward(ctx, z: Tensor, codebook: Tensor, temperature: float, chunk: int) -> Tensor:
        z = z.float()  # [N, c]
        bias = codebook.float().square().sum(-1).div_(-temperature)  # [v]: -|e_k|^2 / T
        lse = torch.full((z.shape[0],), float("-inf"), device=z.device)  # [N], running logsumexp
        for start in range(0, codebook.shape[0], chunk):
            logits = _logits(z, codebook, bias, temperature, start, chunk)  # [N, v']
            lse = torch.logaddexp(lse, torch.logsumexp(logits, -1))
        ctx.save_for_backward(z, codebook, bias, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return lse

    @staticmethod
    def backward(ctx, grad_lse: Tensor):
        z, codebook, bias, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        expected = torch.zeros_like(z)  # [N, c]: sum_k p_k e_k
        for start in range(0, codebook.shape[0], chunk):
            p = _logits(z, codebook, bias, t, start, chunk).sub_(lse[:, None]).exp_()  # [N, v'] softmax
            expected.addmm_(p, codebook[start : start + chunk].float())
        grad_z = grad_lse[:, None] * (2.0 / t) * expected
        return grad_z, None, None, None


def _logits(z: Tensor, codebook: Tensor, bias: Tensor, t: float, start: int, chunk: int) -> Tensor:
    """``-||z - e||^2 / T`` for codebook rows ``start .. start + chunk``, up to the per-row constant
    ``-|z|^2 / T`` (it cancels in eq. 7): ``bias + (2 / T) z e^T`` in one GEMM."""
    e = codebook[start : start + chunk].float()  # [v', c]
    return torch.addmm(bias[start : start + chunk], z, e.T, alpha=2.0 / t)  # [N, v']


def semantic_loss(
    layer_inputs: Sequence[Tensor],
    codebook: Tensor,
    targets: Sequence[Tensor],
    temperature: float = 1.0,
    chunk: int = 8192,
) -> Tensor:
    """Eq. 7: mean over layers, positions and sampled targets of ``-log softmax(-||z_l - e||^2 / T)[c]``.

    layer_inputs: per semantic layer ``[b, n_l, c]`` (z_l of eq. 2); codebook ``[v, c]`` (no gradient);
    targets: per layer ``[b, n_l]`` codebook rows, -1 = skip. Layers without any target are left
    out of the mean; with no target at all the loss is a graph-connected zero. Computed in float32
    (autocast off): bf16 logits would blur a softmax over thousands of nearly equal distances.
    """
    if len(targets) > len(layer_inputs):
        raise ValueError(f"{len(targets)} target layers but {len(layer_inputs)} layer inputs")
    with torch.autocast(codebook.device.type, enabled=False):
        return _semantic_loss(layer_inputs, codebook.detach(), targets, temperature, chunk)


def _semantic_loss(
    layer_inputs: Sequence[Tensor], e_all: Tensor, targets: Sequence[Tensor], temperature: float, chunk: int
) -> Tensor:
    layers = list(zip(layer_inputs, targets, strict=False))
    if not layers:
        return sum((z.sum() * 0.0 for z in layer_inputs), torch.zeros((), device=e_all.device))
    z = torch.cat([z_l.reshape(-1, z_l.shape[-1]).float() for z_l, _ in layers])  # [N, c], N = sum b * n_l
    c = torch.cat([c_l.reshape(-1) for _, c_l in layers]).long()  # [N] codebook rows, -1 = no target
    keep = c >= 0  # [N]
    e_c = e_all[c.clamp_min(0)].float()  # [N, c] (row 0 where no target)
    target_logit = (2.0 * (z * e_c).sum(-1) - (e_c * e_c).sum(-1)) / temperature  # [N]
    lse = _StreamingLogSumExp.apply(z, e_all, float(temperature), int(chunk))  # [N]: all layers, one pass
    nll = (lse - target_logit) * keep  # [N]: -log softmax(-||z - e||^2 / T)[c] where c is a target
    # Masked means per layer, not boolean indexing: no data-dependent shape, so no host sync.
    sizes = [c_l.numel() for _, c_l in layers]
    per_layer = torch.stack([x.sum() for x in nll.split(sizes)])  # [l]
    n = torch.stack([k.sum() for k in keep.split(sizes)])  # [l] targets per layer
    has = (n > 0).float()  # [l]: layers without any target are left out of the mean
    return (per_layer / n.clamp_min(1) * has).sum() / has.sum().clamp_min(1)  # E_l E_z E_c (eq. 7)


# --------------------------------------------------------------------------- appearance terms (eq. 8)


def reconstruction_loss(images: Tensor, recon: Tensor) -> Tensor:
    """``||I - Î||^2`` of eq. 8, as a mean over pixels (both in the same range)."""
    return F.mse_loss(recon.float(), images.float())


def generator_gan_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss (VQGAN's L_GAN of eq. 8): ``softplus(-D(fake))``."""
    return F.softplus(-fake_logits.float()).mean()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """``softplus(-D(real)) + softplus(D(fake))`` (logistic loss on all patch logits)."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


class LeCAMEMA(nn.Module):
    """EMA anchors alpha_R, alpha_F of the mean discriminator outputs on real and fake images.

    The first ``update`` copies the batch means; later ones blend with ``decay``.
    """

    ema_real: Tensor
    ema_fake: Tensor
    num_updates: Tensor

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, real_logits: Tensor, fake_logits: Tensor) -> None:
        """The first update copies the means; the decay is picked on the device (no host sync)."""
        d = torch.where(self.num_updates > 0, self.decay, 0.0)  # []
        self.ema_real.mul_(d).add_((1 - d) * real_logits.detach().float().mean())
        self.ema_fake.mul_(d).add_((1 - d) * fake_logits.detach().float().mean())
        self.num_updates += 1


def lecam_loss(real_logits: Tensor, fake_logits: Tensor, ema: LeCAMEMA) -> Tensor:
    """LeCAM regulariser (Tseng et al. 2021, "Regularizing GANs under limited data", eq. 3):
    ``E[relu(D(real) - alpha_F)^2] + E[relu(alpha_R - D(fake))^2]`` -- the relu form of the
    authors' code (google/lecam-gan ``lecam_reg``) also used by MAGVIT. Call ``ema.update`` first.
    """
    real_term = F.relu(real_logits.float() - ema.ema_fake).pow(2).mean()
    fake_term = F.relu(ema.ema_real - fake_logits.float()).pow(2).mean()
    return real_term + fake_term


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on torchvision VGG16 features, without LPIPS's learned linear heads.

    Inputs ``[b, 3, H, W]`` in [-1, 1]; features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 are
    unit-normalised over channels, squared differences are summed over channels, averaged over
    positions, summed over stages and averaged over the batch. Clips ``[b, 3, T, H, W]`` are taken
    frame by frame: the distance is averaged over all ``b * T`` frames. Weights come from a file
    (a ``vgg16`` state dict, or just its ``features.*`` part); the network is frozen.
    """

    STAGES = (3, 8, 15, 22, 29)  # indices of relu1_2 ... relu5_3 in vgg16.features

    def __init__(self, weights_path: str | Path) -> None:
        super().__init__()
        import torchvision

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual loss weights file {str(path)!r} does not exist")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        with torch.device("meta"):  # no random init: every weight comes from the file
            vgg = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])[: self.STAGES[-1] + 1]
        missing, _ = vgg.load_state_dict(features, strict=False, assign=True)
        if missing:
            raise ValueError(f"{str(path)!r} is not a VGG16 state dict (missing features.{missing[0]}, ...)")
        self.vgg = vgg.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.vgg.eval()  # always frozen
        return self

    def _features(self, x: Tensor) -> list[Tensor]:
        h = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet normalisation
        out = []
        for i, layer in enumerate(self.vgg):
            h = layer(h)
            if i in self.STAGES:
                out.append(h)
        return out

    def forward(self, images: Tensor, recon: Tensor) -> Tensor:
        return self.mean_distance(images, [recon])

    def mean_distance(self, images: Tensor, recons: Sequence[Tensor]) -> Tensor:
        """The mean of ``forward(images, r)`` over ``recons`` (the prefixes' decodes); the target's
        features are computed once."""
        if images.dim() == 5:  # clips [b, 3, T, H, W] -> frames [b * T, 3, H, W]
            images, recons = frames_as_images(images), [frames_as_images(r) for r in recons]
        target = [F.normalize(f.float(), dim=1, eps=1e-10) for f in self._features(images)]
        per_recon = []
        for recon in recons:
            dist = images.new_zeros((images.shape[0],), dtype=torch.float32)  # [b]
            for na, fb in zip(target, self._features(recon), strict=True):
                nb = F.normalize(fb.float(), dim=1, eps=1e-10)
                dist = dist + (na - nb).pow(2).sum(1).mean(dim=(1, 2))  # [b]
            per_recon.append(dist.mean())
        return torch.stack(per_recon).mean()


# --------------------------------------------------------------------------- totals (eq. 8, 9)


def appearance_loss(terms: dict[str, Tensor], cfg: LossConfig) -> Tensor:
    """Eq. 8 from its named terms: the sum of every term times its weight in ``cfg.weights``.
    ``reconstruction`` and ``commitment`` are required; the quantizer's ``losses`` bring their own
    (``codebook`` for a learned table), the trainer ``gan`` and ``perceptual`` once on. A term with no
    weight in the config is an error naming it: no loss is silently dropped.

    LeCAM regularises the discriminator; the usual place for it is ``discriminator_total``.
    """
    missing = {"reconstruction", "commitment"} - set(terms)
    if missing:
        raise KeyError(f"appearance_loss needs terms {sorted(missing)}; got {sorted(terms)}")
    weights = cfg.weights
    unweighted = [k for k in terms if k not in weights]
    if unweighted:
        raise KeyError(
            f"appearance terms {unweighted} have no weight in the loss config (weighted terms: "
            f"{', '.join(weights)})"
        )
    # ||I - Î||^2 + beta sum_l ||Z - sg(Ẑ<=l)||^2 + lambda L_GAN + eta L_Perceptual (+ phi L_LeCAM), eq. 8
    return sum(weights[k] * terms[k] for k in weights if k in terms)


def discriminator_total(real_logits: Tensor, fake_logits: Tensor, ema: LeCAMEMA, cfg: LossConfig) -> Tensor:
    """Discriminator objective: logistic loss + phi * LeCAM (updates the EMA anchors first)."""
    ema.update(real_logits, fake_logits)
    reg = lecam_loss(real_logits, fake_logits, ema)
    return discriminator_loss(real_logits, fake_logits) + cfg.lecam_weight * reg  # + phi L_LeCAM


def dynamic_weight(l_app: Tensor, l_sem: Tensor, max_weight: float = 0.0) -> Tensor:
    """``w = sg(L_app / L_sem)`` (eq. 9 context): no gradient; clamped to ``max_weight`` if > 0."""
    w = l_app.detach().float() / l_sem.detach().float().clamp_min(1e-8)
    return w.clamp(max=max_weight) if max_weight > 0 else w


def spae_total(l_app: Tensor, l_sem: Tensor, alpha: float, w: Tensor | float) -> Tensor:
    """Eq. 9: ``L_app + alpha * w * L_sem``."""
    return l_app + alpha * w * l_sem
