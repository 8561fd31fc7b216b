"""Encoder / decoder / discriminator shapes for the presets."""

from __future__ import annotations

import pytest
import torch

from spae.networks import NETWORK_PRESETS, Decoder, Discriminator, Encoder, NetworkConfig


@pytest.mark.parametrize(("preset", "size", "latent"), [("tiny", 16, 8), ("mnist", 32, 8)])
def test_encoder_decoder_shapes(preset, size, latent):
    cfg = NetworkConfig.preset(preset)
    x = torch.rand(2, 3, size, size) * 2 - 1
    z = Encoder(cfg)(x)
    assert z.shape == (2, cfg.latent_dim, latent, latent) and size // cfg.downsample_factor == latent
    y = Decoder(cfg)(z)
    assert y.shape == x.shape


def test_latent_dim_override_and_grey_images():
    cfg = NetworkConfig.preset("tiny", latent_dim=5)
    z = Encoder(cfg, image_channels=1)(torch.zeros(1, 1, 8, 8))
    assert z.shape == (1, 5, 4, 4)
    assert Decoder(cfg, image_channels=1)(z).shape == (1, 1, 8, 8)


def test_paper_preset_geometry():
    cfg = NETWORK_PRESETS["paper"]
    assert cfg.latent_dim == 768 and cfg.downsample_factor == 8 and 128 // cfg.downsample_factor == 16
    with pytest.raises(ValueError, match="unknown network preset"):
        NetworkConfig.preset("huge")


def test_discriminator_patch_logits_and_gradients():
    cfg = NetworkConfig.preset("tiny")  # 2 stride-2 layers
    disc = Discriminator(cfg, image_size=16)
    x = (torch.rand(3, 3, 16, 16) * 2 - 1).requires_grad_(True)
    logits = disc(x)
    assert logits.shape == (3, 1, 4, 4) and disc.output_size == 4
    logits.mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in disc.parameters())
    mnist = Discriminator(NetworkConfig.preset("mnist"), image_size=32)
    assert mnist(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 4, 4)
    with pytest.raises(ValueError, match="image_size"):
        Discriminator(cfg, image_size=18)


def test_channels_last_and_bfloat16():
    cfg = NetworkConfig.preset("tiny")
    enc, dec = Encoder(cfg).to(torch.bfloat16), Decoder(cfg).to(torch.bfloat16)
    x = torch.rand(1, 3, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    out = dec(enc(x))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 8, 8)


def test_global_context_reads_the_layer_1_token_from_the_whole_map():
    """``network.global_context`` on the ``mnist`` preset's encoder: the layer-1 position's output tells
    apart two contents of a far corner that the convolutions' GroupNorm statistics cannot (the same values
    swapped between the channels of one group); the same encoder without it cannot. Off in every preset
    (docs/RESULTS.md, issue 18: measured, it did not lift moved digits)."""
    from spae.config import replace
    from spae.model import PRESETS, preset
    from spae.pyramid import PyramidSpec

    assert not any(preset(n).network.global_context for n in PRESETS)
    cfg = replace(preset("mnist"), network={"global_context": True})
    spec = PyramidSpec(cfg.pyramid)
    assert (0, 0) not in spec.positions(1)  # the corner is not where layer 1 reads
    torch.manual_seed(0)
    enc = Encoder(cfg.network)
    torch.nn.init.normal_(enc.context.weight, std=0.5)  # trained: zero is where it starts, not where it stays
    plain = Encoder(replace(cfg.network, global_context=False))
    plain.load_state_dict({k: v for k, v in enc.state_dict().items() if not k.startswith("context.")})
    ch, groups = enc.norm_out.num_channels, enc.norm_out.num_groups
    background = torch.randn(1, ch, 1, 1).expand(1, ch, *cfg.pyramid.latent_size)  # [1, ch, h, w]
    corner = torch.randn(ch)
    swapped = corner.view(groups, -1).flip(1).reshape(ch)  # per group: same mean and variance

    def layer1(encoder: Encoder, at_corner: torch.Tensor) -> torch.Tensor:
        """The layer-1 latent vector [c] when the trunk map is ``background``, ``at_corner`` at (0, 0)."""
        h = background.clone()
        h[0, :, 0, 0] = at_corner
        hook = encoder.mid.register_forward_hook(lambda module, args, out: h)
        with torch.no_grad():
            z = encoder(torch.zeros(1, 3, cfg.image_size, cfg.image_size))  # [1, c, 8, 8]
        hook.remove()
        return spec.gather(z, 1)[0, 0]

    assert torch.allclose(layer1(plain, corner), layer1(plain, swapped), atol=1e-5)
    assert (layer1(enc, corner) - layer1(enc, swapped)).abs().max() > 1e-3  # ~2e-2
