"""Convolutional encoder, decoder and GAN discriminator in the VQGAN / MAGVIT style.

Legend: ``b`` batch, ``C`` image channels, ``H W`` image size, ``h w`` latent grid, ``c`` latent
(= codebook) dimension. Images enter the networks in ``[-1, 1]``.

Resolution: ``len(channel_multipliers) - 1`` downsamplings by 2 (MNIST 32 -> 8, paper 128 -> 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class NetworkConfig:
    latent_dim: int = 384  # c: equal to the codebook dimension (the model checks)
    base_channels: int = 32
    channel_multipliers: tuple[int, ...] = (1, 2, 4)  # one level each; len - 1 downsamplings
    num_res_blocks: int = 1  # per level
    norm_groups: int = 8
    disc_base_channels: int = 32
    disc_num_layers: int = 3  # stride-2 convolutions of the patch discriminator
    # video (spae.networks3d) only: per downsampling, whether it also halves time; () = never
    temporal_downsample: tuple[bool, ...] = ()
    # encoder: add a learned map of the mean over positions to every position, so the one position a
    # layer-1 token reads knows the whole image (a digit moved off the centre is still named); 2D only
    global_context: bool = False

    def __post_init__(self) -> None:
        if self.latent_dim < 1 or self.base_channels < 1 or not self.channel_multipliers:
            raise ValueError("latent_dim, base_channels >= 1 and channel_multipliers non-empty are required")
        if self.num_res_blocks < 0 or self.disc_num_layers < 1 or self.norm_groups < 1:
            raise ValueError("num_res_blocks >= 0, disc_num_layers >= 1 and norm_groups >= 1 are required")
        n_down = len(self.channel_multipliers) - 1
        if self.temporal_downsample and len(self.temporal_downsample) != n_down:
            raise ValueError(
                f"network.temporal_downsample has {len(self.temporal_downsample)} entries; give one per "
                f"downsampling ({n_down} for channel_multipliers={self.channel_multipliers}) or none"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def temporal_downsample_factor(self) -> int:
        """Frames per latent step of the 3D networks (1 for images)."""
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @classmethod
    def preset(cls, name: str, **overrides) -> NetworkConfig:
        """``tiny`` (tests), ``mnist`` (32x32 -> 8x8), ``paper`` (128x128 -> 16x16); video (3D networks):
        ``tiny3d`` (tests, 4x16x16 -> 2x4x4), ``moving-mnist`` (16x32x32 -> 4x8x8), ``kinetics``
        (16x128x128 -> 4x16x16)."""
        if name not in NETWORK_PRESETS:
            raise ValueError(f"unknown network preset {name!r}; allowed: {', '.join(NETWORK_PRESETS)}")
        return replace(NETWORK_PRESETS[name], **overrides)


NETWORK_PRESETS: dict[str, NetworkConfig] = {
    "tiny": NetworkConfig(16, 8, (1, 2), 1, 4, 8, 2),
    "mnist": NetworkConfig(384, 32, (1, 2, 4), 1, 8, 32, 3),
    "paper": NetworkConfig(768, 128, (1, 1, 2, 4), 2, 32, 64, 3),
    "tiny3d": NetworkConfig(16, 8, (1, 2, 2), 1, 4, 8, 2, (True, False)),
    "moving-mnist": NetworkConfig(384, 32, (1, 2, 4), 1, 8, 32, 3, (True, True)),
    "kinetics": NetworkConfig(384, 64, (1, 2, 2, 4), 2, 32, 64, 3, (False, True, True)),
}


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))); a 1x1 conv on the skip when channels change."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # [b, c_in, H, W] -> [b, c_out, H, W]
        y = self.conv1(F.silu(self.norm1(x)))
        y = self.conv2(F.silu(self.norm2(y)))
        return self.skip(x) + y


def _level(c_in: int, c_out: int, n: int, groups: int) -> tuple[nn.Sequential, int]:
    blocks = []
    for _ in range(n):
        blocks.append(ResBlock(c_in, c_out, groups))
        c_in = c_out
    return nn.Sequential(*blocks), c_in


class Encoder(nn.Module):
    """``[b, C, H, W]`` in [-1, 1] -> ``z [b, c, H / f, W / f]`` (f = cfg.downsample_factor)."""

    def __init__(self, cfg: NetworkConfig, image_channels: int = 3) -> None:
        super().__init__()
        ch = cfg.base_channels
        self.conv_in = nn.Conv2d(image_channels, ch, 3, padding=1)
        layers: list[nn.Module] = []
        for i, mult in enumerate(cfg.channel_multipliers):
            level, ch = _level(ch, cfg.base_channels * mult, cfg.num_res_blocks, cfg.norm_groups)
            layers.append(level)
            if i < len(cfg.channel_multipliers) - 1:
                layers.append(nn.Conv2d(ch, ch, 4, stride=2, padding=1))  # H -> H / 2
        self.down = nn.Sequential(*layers)
        self.mid = ResBlock(ch, ch, cfg.norm_groups)
        self.context = nn.Linear(ch, ch) if cfg.global_context else None
        if self.context is not None:  # starts as no change
            nn.init.zeros_(self.context.weight)
            nn.init.zeros_(self.context.bias)
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, cfg.latent_dim, 1)

    def features(self, x: Tensor) -> Tensor:
        """The activations the output layer reads: [b, ch, h, w]."""
        h = self.mid(self.down(self.conv_in(x)))  # [b, ch, h, w]
        if self.context is not None:
            h = h + self.context(h.mean((2, 3)))[:, :, None, None]  # [b, ch] -> every position
        return F.silu(self.norm_out(h))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.features(x))  # [b, c, h, w]


class Decoder(nn.Module):
    """``zq [b, c, h, w]`` -> ``[b, C, h * f, w * f]``, unbounded (trained towards [-1, 1])."""

    def __init__(self, cfg: NetworkConfig, image_channels: int = 3) -> None:
        super().__init__()
        mults = cfg.channel_multipliers[::-1]
        ch = cfg.base_channels * mults[0]
        self.conv_in = nn.Conv2d(cfg.latent_dim, ch, 1)
        self.mid = ResBlock(ch, ch, cfg.norm_groups)
        layers: list[nn.Module] = []
        for i, mult in enumerate(mults):
            level, ch = _level(ch, cfg.base_channels * mult, cfg.num_res_blocks, cfg.norm_groups)
            layers.append(level)
            if i < len(mults) - 1:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, image_channels, 3, padding=1)

    def forward(self, zq: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(zq)))  # [b, ch, H, W]
        return self.conv_out(F.silu(self.norm_out(h)))  # [b, C, H, W]


class Discriminator(nn.Module):
    """PatchGAN discriminator (VQGAN's NLayerDiscriminator, GroupNorm instead of BatchNorm).

    ``[b, C, H, W]`` in [-1, 1] -> patch logits ``[b, 1, H / 2^n, W / 2^n]`` (n = disc_num_layers);
    every loss in ``spae.losses`` averages over all logits, so patch and scalar outputs both work.
    """

    def __init__(self, cfg: NetworkConfig, image_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        if image_size % (2**cfg.disc_num_layers):
            raise ValueError(f"image_size={image_size} is not divisible by 2^disc_num_layers")
        ch = cfg.disc_base_channels
        layers: list[nn.Module] = [nn.Conv2d(image_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, cfg.disc_num_layers):
            c_out = cfg.disc_base_channels * min(2**i, 8)
            layers += [nn.Conv2d(ch, c_out, 4, stride=2, padding=1), _norm(c_out, cfg.norm_groups)]
            layers.append(nn.LeakyReLU(0.2))
            ch = c_out
        layers.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.output_size = image_size // 2**cfg.disc_num_layers

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # [b, 1, H / 2^n, W / 2^n]
