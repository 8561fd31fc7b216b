"""The SPAE module: encoder -> pyramid quantizer (eqs. 1-3) -> decoder, for every covering prefix.

Legend: ``b`` batch, ``H W`` image size, ``h w`` latent grid, ``c`` codebook dim, ``l`` prefix length.

Video (``SPAEConfig.num_frames > 0``): the same module with the 3D networks of ``spae.networks3d``; clips
are ``[b, C, T, H, W]``, latents ``[b, c, t, h, w]`` and the pyramid is over ``(t, h, w)``. Every
method below takes either; read ``[b, C, H, W]`` as ``[b, C, T, H, W]`` for clips.

Value ranges: images enter the public API in ``[0, 1]``; the networks work in ``[-1, 1]``.
``SPAE.forward`` returns the network-space tensors the losses need: ``target`` (the input images
mapped to ``[-1, 1]``) and ``reconstructions`` (decoder outputs, unclamped, trained towards
``[-1, 1]``), so the pixel L2, the discriminator and the perceptual loss all see one range.
``decode_latent`` is the output path: it maps back to ``[0, 1]`` and clamps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spae.codebook import NUMBER_WORDS, CodebookConfig, FrozenCodebook, read_word_list
from spae.networks import Decoder, Encoder, NetworkConfig
from spae.networks3d import Decoder3D, Encoder3D
from spae.pyramid import PyramidConfig, PyramidSpec
from spae.quantize import Quantizer, QuantizerConfig, QuantizerOutput
from spae.scenes import WORDS as SCENE_WORDS


@dataclass(frozen=True)
class SPAEConfig:
    image_size: int = 32  # H = W
    image_channels: int = 3
    num_frames: int = 0  # T: 0 = images; > 0 = clips of T frames, 3D networks, a (t, h, w) pyramid
    pyramid: PyramidConfig = field(default_factory=PyramidConfig.mnist)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig.preset("mnist"))
    # no training settings here: this config travels with the tokenizer (encode / decode) and enters
    # its fingerprint; the loss is the trainer's (spae.losses.LossConfig, spae.losses.loss_preset)

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.image_channels < 1:
            raise ValueError(
                f"image_size={self.image_size} and image_channels={self.image_channels} must be >= 1"
            )
        if self.num_frames < 0:
            raise ValueError(f"num_frames={self.num_frames} must be >= 0 (0 = images)")
        f = self.network.downsample_factor
        if self.image_size % f:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by the network's downsample factor {f} "
                f"(network.channel_multipliers={self.network.channel_multipliers})"
            )
        latent: tuple[int, ...] = (self.image_size // f, self.image_size // f)
        if self.num_frames:
            ft = self.network.temporal_downsample_factor
            if self.num_frames % ft:
                raise ValueError(
                    f"num_frames={self.num_frames} is not divisible by the network's temporal downsample "
                    f"factor {ft} (network.temporal_downsample={self.network.temporal_downsample})"
                )
            latent = (self.num_frames // ft, *latent)
            if self.network.global_context:
                raise ValueError("network.global_context is for images (the 2D encoder); num_frames > 0")
        elif self.network.temporal_downsample:
            raise ValueError(
                "network.temporal_downsample is set but num_frames=0 (images); set num_frames for video"
            )
        if tuple(self.pyramid.latent_size) != latent:
            what = (
                f"{self.num_frames}x{self.image_size}px clips"
                if self.num_frames
                else f"{self.image_size}px images"
            )
            raise ValueError(
                f"pyramid.latent_size={tuple(self.pyramid.latent_size)} but the encoder maps "
                f"{what} to a {latent} latent (downsample factor {f})"
            )

    @property
    def latent_size(self) -> tuple[int, ...]:
        return tuple(self.pyramid.latent_size)

    @property
    def is_video(self) -> bool:
        return self.num_frames > 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One input without the batch axis: (C, H, W), or (C, T, H, W) for video."""
        side = (self.image_size, self.image_size)
        return (
            (self.image_channels, self.num_frames, *side) if self.num_frames else (self.image_channels, *side)
        )


def preset(name: str) -> SPAEConfig:
    """``tiny`` (tests: 16x16 images, 4x4x384 latent, layers 1,2,4,4), ``mnist`` (32x32, 8x8x384,
    layers 1,2,4,8,8, MiniLM codebook) or ``paper`` (128x128, 16x16x384, layers 1,2,4,8,16,16); video:
    ``tiny3d`` (tests: 4 frames of 16x16, 2x4x4x384 latent), ``moving-mnist`` (16 frames of 32x32, 4x8x8x384,
    layers 1x1x1, 1x2x2, 2x4x4, 4x8x8, 4x8x8) or ``kinetics`` (16 frames of 128x128, 4x16x16x384); colour
    scenes (``spae.scenes``): ``scenes`` (64x64, the paper's downsampling by 8 to an 8x8x384 latent, layers
    1, 2, 4, 8, 8, the MiniLM codebook with every scene word kept)."""
    if name == "tiny":
        return SPAEConfig(
            image_size=16,
            pyramid=PyramidConfig(latent_size=(4, 4), layer_sizes=((1, 1), (2, 2), (4, 4), (4, 4))),
            codebook=CodebookConfig(top_n=512),
            network=NetworkConfig.preset("tiny", latent_dim=384, channel_multipliers=(1, 2, 2)),
        )
    if name == "mnist":  # 4,096 MiniLM words, the number words and numerals always kept;
        # 16 base channels: a quarter of the FLOPs of 32 for ~0.7 dB (docs/RESULTS.md), so the CPU demo fits
        return SPAEConfig(
            codebook=CodebookConfig(top_n=4096, keep_words=tuple(read_word_list(NUMBER_WORDS))),
            network=NetworkConfig.preset("mnist", base_channels=16),
        )
    if name == "paper":  # the paper's layout; c = 384 fits the offline MiniLM codebook (set
        # network.latent_dim to the codebook's dimension for another LLM, e.g. 768)
        return SPAEConfig(
            image_size=128,
            pyramid=PyramidConfig.paper(),
            network=NetworkConfig.preset("paper", latent_dim=384),
        )
    if name == "tiny3d":
        return SPAEConfig(
            image_size=16,
            num_frames=4,
            pyramid=PyramidConfig(
                latent_size=(2, 4, 4), layer_sizes=((1, 1, 1), (1, 2, 2), (2, 4, 4), (2, 4, 4))
            ),
            codebook=CodebookConfig(top_n=512),
            network=NetworkConfig.preset("tiny3d", latent_dim=384),
        )
    if name == "moving-mnist":  # the mnist codebook, on clips
        return SPAEConfig(
            num_frames=16,
            pyramid=PyramidConfig.moving_mnist(),
            codebook=CodebookConfig(top_n=4096, keep_words=tuple(read_word_list(NUMBER_WORDS))),
            network=NetworkConfig.preset("moving-mnist"),
        )
    if name == "scenes":  # the paper's shape at 64 px: 8x downsampling, 2^k x 2^k layers, the last repeated
        return SPAEConfig(
            image_size=64,
            pyramid=PyramidConfig.mnist(),
            codebook=CodebookConfig(
                top_n=4096, keep_words=tuple(dict.fromkeys((*SCENE_WORDS, *read_word_list(NUMBER_WORDS))))
            ),
            network=NetworkConfig.preset("mnist", base_channels=16, channel_multipliers=(1, 2, 4, 4)),
        )
    if name == "kinetics":  # the paper's video setting (Kinetics-600: 16 frames of 128x128)
        return SPAEConfig(
            image_size=128,
            num_frames=16,
            pyramid=PyramidConfig.kinetics(),
            network=NetworkConfig.preset("kinetics", latent_dim=384),
        )
    raise ValueError(f"unknown SPAE preset {name!r}; allowed: {', '.join(PRESETS)}")


PRESETS = ("tiny", "mnist", "paper", "tiny3d", "moving-mnist", "kinetics", "scenes")


@dataclass
class SPAEOutput:
    """z [b, c, h, w] encoder output; quant (see ``QuantizerOutput``); target [b, C, H, W] the input
    images in [-1, 1]; reconstructions: prefix length l -> [b, C, H, W] decoder output in [-1, 1]
    network space (unclamped)."""

    z: Tensor
    quant: QuantizerOutput
    target: Tensor
    reconstructions: dict[int, Tensor]


class SPAE(nn.Module):
    def __init__(self, cfg: SPAEConfig, codebook: FrozenCodebook):
        super().__init__()
        if cfg.network.latent_dim != codebook.dim:
            raise ValueError(
                f"network.latent_dim={cfg.network.latent_dim} must equal the codebook dimension "
                f"{codebook.dim} (codebook {codebook.card.get('source')!r}, {len(codebook)} rows)"
            )
        self.cfg = cfg
        self.pyramid = PyramidSpec(cfg.pyramid)
        encoder, decoder = (Encoder3D, Decoder3D) if cfg.is_video else (Encoder, Decoder)
        self.encoder = encoder(cfg.network, cfg.image_channels)
        self.decoder = decoder(cfg.network, cfg.image_channels)
        self.quantizer = Quantizer(cfg.quantizer, self.pyramid, codebook)

    @property
    def codebook(self) -> FrozenCodebook:
        return self.quantizer.codebook

    def encode_latent(self, images: Tensor) -> Tensor:
        """images [b, C, H, W] in [0, 1] -> z [b, c, h, w]."""
        self._check_images(images)
        return self.encoder(images * 2.0 - 1.0)

    def decode_latent(self, zq: Tensor) -> Tensor:
        """Ẑ [b, c, h, w] -> images [b, C, H, W] in [0, 1] (clamped: the output path, not the loss path)."""
        return ((self.decoder(zq) + 1.0) / 2.0).clamp(0.0, 1.0)

    def check_prefixes(self, prefixes: Sequence[int]) -> tuple[int, ...]:
        bad = [l for l in prefixes if l not in self.pyramid.covering_layers]
        if bad or not prefixes:
            raise ValueError(
                f"prefix lengths {list(prefixes)} cannot be decoded: only prefixes that cover every latent "
                f"position can, here {list(self.pyramid.covering_layers)}"
            )
        return tuple(prefixes)

    def forward(self, images: Tensor, prefixes: Sequence[int] | None = None) -> SPAEOutput:
        """images [b, C, H, W] in [0, 1]; decodes every prefix in ``prefixes`` (default: all covering
        prefixes) in one batched decoder pass."""
        prefixes = self.check_prefixes(self.pyramid.covering_layers if prefixes is None else prefixes)
        self._check_images(images)
        x = images * 2.0 - 1.0  # [b, C, H, W] in [-1, 1]
        z = self.encoder(x)  # [b, c, h, w]
        quant = self.quantizer(z)
        zq = torch.cat([quant.prefix_latents[l - 1] for l in prefixes], dim=0)  # [len(prefixes) * b, c, h, w]
        recon = self.decoder(zq).chunk(len(prefixes), dim=0)  # each [b, C, H, W]
        return SPAEOutput(z=z, quant=quant, target=x, reconstructions=dict(zip(prefixes, recon, strict=True)))

    @torch.no_grad()
    def match_latent_to_codebook(self, images: Tensor) -> None:
        """Start the encoder output where the codebook lives: rescale and shift its output layer so that z
        over ``images`` has the codebook's mean row and spread. From a default init |z| sits far from every
        word and nearest-code search collapses onto the few words of smallest norm (docs/RESULTS.md)."""
        self._check_images(images)
        conv = self.encoder.conv_out
        h = self.encoder.features(images * 2.0 - 1.0)  # [b, ch, h, w] ([b, ch, t, h, w] for video)
        conv_nd = F.conv3d if h.dim() == 5 else F.conv2d
        z = conv_nd(h, conv.weight).movedim(1, -1).flatten(0, -2)  # [b*h*w, c] without the bias
        z_mean = z.mean(0)
        z_spread = (z - z_mean).pow(2).sum(1).mean().sqrt()
        e = self.codebook.embeddings  # [v, c]
        e_mean = e.mean(0)
        e_spread = (e - e_mean).pow(2).sum(1).mean().sqrt()
        scale = e_spread / z_spread.clamp_min(1e-8)
        conv.weight.mul_(scale)
        conv.bias.copy_(e_mean - z_mean * scale)

    def _check_images(self, images: Tensor) -> None:
        want = self.cfg.input_shape
        if images.dim() != 1 + len(want) or tuple(images.shape[1:]) != want:
            what = "clips" if self.cfg.is_video else "images"
            raise ValueError(
                f"expected {what} [b, {', '.join(map(str, want))}] in [0, 1], got {tuple(images.shape)}"
            )
