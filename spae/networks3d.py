"""3D convolutional encoder, decoder and discriminator for video SPAE (MAGVIT's 3D-VQGAN style).

Legend: ``b`` batch, ``C`` image channels, ``T H W`` clip frames and size, ``t h w`` latent grid,
``c`` latent (= codebook) dimension. Clips enter the networks as ``[b, C, T, H, W]`` in ``[-1, 1]``.

Non-causal: every 3x3x3 convolution pads time symmetrically, so a latent step sees the frames on
both sides (MAGVIT v1's 3D-VQGAN). A clip is tokenized as a whole; there is no frame-by-frame
streaming and no special first frame (a causal variant would pad time on the left only).

Resolution: each of the ``len(channel_multipliers) - 1`` downsamplings halves H and W, and halves T
when ``temporal_downsample[i]`` is true (``NetworkConfig.temporal_downsample_factor``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from spae.networks import NetworkConfig, _norm


class ResBlock3D(nn.Module):
    """x + conv3(SiLU(GN(conv3(SiLU(GN(x)))))); a 1x1x1 conv on the skip when channels change."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv3d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv3d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # [b, c_in, T, H, W] -> [b, c_out, T, H, W]
        y = self.conv1(F.silu(self.norm1(x)))
        y = self.conv2(F.silu(self.norm2(y)))
        return self.skip(x) + y


class Upsample3D(nn.Module):
    """Nearest-neighbour x2 in (H, W), and in T when ``temporal``, then a 3x3x3 conv."""

    def __init__(self, ch: int, temporal: bool) -> None:
        super().__init__()
        self.scale = (2.0 if temporal else 1.0, 2.0, 2.0)
        self.conv = nn.Conv3d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


def _level(c_in: int, c_out: int, n: int, groups: int) -> tuple[nn.Sequential, int]:
    blocks = []
    for _ in range(n):
        blocks.append(ResBlock3D(c_in, c_out, groups))
        c_in = c_out
    return nn.Sequential(*blocks), c_in


def _temporal(cfg: NetworkConfig, i: int) -> bool:
    return bool(cfg.temporal_downsample[i]) if cfg.temporal_downsample else False


class Encoder3D(nn.Module):
    """``[b, C, T, H, W]`` in [-1, 1] -> ``z [b, c, T / f_t, H / f, W / f]``."""

    def __init__(self, cfg: NetworkConfig, image_channels: int = 3) -> None:
        super().__init__()
        ch = cfg.base_channels
        self.conv_in = nn.Conv3d(image_channels, ch, 3, padding=1)
        layers: list[nn.Module] = []
        for i, mult in enumerate(cfg.channel_multipliers):
            level, ch = _level(ch, cfg.base_channels * mult, cfg.num_res_blocks, cfg.norm_groups)
            layers.append(level)
            if i < len(cfg.channel_multipliers) - 1:
                st = 2 if _temporal(cfg, i) else 1
                # [T, H, W] -> [T / st, H / 2, W / 2]; kernel 4 (time: 3 when not strided), symmetric pad
                kt = 4 if st == 2 else 3
                layers.append(nn.Conv3d(ch, ch, (kt, 4, 4), stride=(st, 2, 2), padding=1))
        self.down = nn.Sequential(*layers)
        self.mid = ResBlock3D(ch, ch, cfg.norm_groups)
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv3d(ch, cfg.latent_dim, 1)

    def features(self, x: Tensor) -> Tensor:
        """The activations the output layer reads: [b, ch, t, h, w]."""
        return F.silu(self.norm_out(self.mid(self.down(self.conv_in(x)))))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.features(x))  # [b, c, t, h, w]


class Decoder3D(nn.Module):
    """``zq [b, c, t, h, w]`` -> ``[b, C, t * f_t, h * f, w * f]``, unbounded (trained towards [-1, 1])."""

    def __init__(self, cfg: NetworkConfig, image_channels: int = 3) -> None:
        super().__init__()
        mults = cfg.channel_multipliers[::-1]
        n_down = len(mults) - 1
        ch = cfg.base_channels * mults[0]
        self.conv_in = nn.Conv3d(cfg.latent_dim, ch, 1)
        self.mid = ResBlock3D(ch, ch, cfg.norm_groups)
        layers: list[nn.Module] = []
        for i, mult in enumerate(mults):
            level, ch = _level(ch, cfg.base_channels * mult, cfg.num_res_blocks, cfg.norm_groups)
            layers.append(level)
            if i < n_down:
                layers.append(Upsample3D(ch, _temporal(cfg, n_down - 1 - i)))  # mirrors the encoder
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv3d(ch, image_channels, 3, padding=1)

    def forward(self, zq: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(zq)))  # [b, ch, T, H, W]
        return self.conv_out(F.silu(self.norm_out(h)))  # [b, C, T, H, W]


class Discriminator3D(nn.Module):
    """PatchGAN over clips: ``[b, C, T, H, W]`` in [-1, 1] -> patch logits ``[b, 1, t', H / 2^n, W / 2^n]``.

    Stride 2 in (H, W) per layer and in T while T stays >= 2; the GAN losses of ``spae.losses`` average
    over all logits, so they take this output as they take the 2D one.
    """

    def __init__(
        self, cfg: NetworkConfig, image_channels: int = 3, image_size: int = 32, num_frames: int = 16
    ):
        super().__init__()
        if image_size % (2**cfg.disc_num_layers):
            raise ValueError(f"image_size={image_size} is not divisible by 2^disc_num_layers")
        ch, t = cfg.disc_base_channels, num_frames
        layers: list[nn.Module] = []
        for i in range(cfg.disc_num_layers):
            c_out = cfg.disc_base_channels * min(2**i, 8)
            st = 2 if t >= 2 else 1
            t = (t + st - 1) // st
            layers.append(nn.Conv3d(ch if i else image_channels, c_out, (3, 4, 4), (st, 2, 2), padding=1))
            if i:
                layers.append(_norm(c_out, cfg.norm_groups))
            layers.append(nn.LeakyReLU(0.2))
            ch = c_out
        layers.append(nn.Conv3d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
