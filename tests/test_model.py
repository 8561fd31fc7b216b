"""The SPAE module: presets, config checks, one batched decoder pass, gradients, MNIST overfit."""

import pytest
import torch
import torch.nn.functional as F

from spae.codebook import FrozenCodebook
from spae.config import ConfigError, from_dict, to_dict
from spae.data import load_mnist, mnist_images
from spae.model import SPAE, SPAEConfig, preset


def _codebook(v: int, c: int = 384, seed: int = 0) -> FrozenCodebook:
    g = torch.Generator().manual_seed(seed)
    return FrozenCodebook.from_tensor(F.normalize(torch.randn(v, c, generator=g), dim=1))


def test_presets_round_trip_and_shapes():
    for name, size, latent, counts in [
        ("tiny", 16, (4, 4), (1, 4, 16, 16)),
        ("mnist", 32, (8, 8), (1, 4, 16, 64, 64)),
        ("paper", 128, (16, 16), (1, 4, 16, 64, 256, 256)),
    ]:
        cfg = preset(name)
        assert from_dict(SPAEConfig, to_dict(cfg)) == cfg
        assert cfg.image_size == size and cfg.latent_size == latent
        assert tuple(h * w for h, w in cfg.pyramid.layer_sizes) == counts
    with pytest.raises(ValueError, match="tiny, mnist, paper"):
        preset("huge")


def test_config_checks():
    with pytest.raises(ValueError, match="latent_size"):
        SPAEConfig(image_size=64)  # mnist network maps 64px to 16x16, pyramid says 8x8
    with pytest.raises(ValueError, match="divisible"):
        SPAEConfig(image_size=30)
    with pytest.raises(ConfigError, match="latent_size"):
        from_dict(SPAEConfig, {"image_size": 16, "pyramid": {"latent_size": [8, 8]}})
    with pytest.raises(ValueError, match="latent_dim=384 must equal the codebook dimension 16"):
        SPAE(preset("tiny"), _codebook(8, c=16))


def test_forward_one_batched_decoder_pass_and_gradients():
    torch.manual_seed(0)
    cb = _codebook(64)
    model = SPAE(preset("tiny"), cb)
    calls = []
    model.decoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    images = torch.rand(3, 3, 16, 16)
    out = model(images)
    assert calls == [6]  # prefixes 3 and 4 of 3 images, one decoder call
    assert sorted(out.reconstructions) == [3, 4]
    assert out.z.shape == (3, 384, 4, 4) and out.reconstructions[4].shape == (3, 3, 16, 16)
    torch.testing.assert_close(out.target, images * 2 - 1)
    loss = (
        sum(F.mse_loss(r, out.target) for r in out.reconstructions.values()) + out.quant.losses["commitment"]
    )
    loss.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters() if p.dim() > 1
    )
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert cb.embeddings.grad is None and not cb.embeddings.requires_grad
    assert "quantizer.codebook.embeddings" not in model.state_dict()
    with pytest.raises(ValueError, match=r"\[3, 4\]"):
        model(images, prefixes=[2])
    out = model(images, prefixes=[4])
    assert list(out.reconstructions) == [4]
    decoded = model.decode_latent(out.quant.prefix_latents[3]).detach()
    assert float(decoded.min()) >= 0 and float(decoded.max()) <= 1


def test_rq_and_vq_kinds_build_and_run():
    for kind in ("rq", "vq"):
        base = preset("tiny")
        cfg = from_dict(SPAEConfig, {**to_dict(base), "quantizer": {"kind": kind, "vq_codebook_size": 32}})
        model = SPAE(cfg, _codebook(64))
        out = model(torch.rand(2, 3, 16, 16))
        assert out.reconstructions[4].shape == (2, 3, 16, 16)
        if kind == "vq":
            assert int(out.quant.ids[-1].max()) < 32 and out.quant.losses["codebook"] > 0
            assert "quantizer.embedding.weight" in model.state_dict()


def _mnist(n: int) -> torch.Tensor:
    images, _ = load_mnist("train")
    return F.avg_pool2d(mnist_images(images[:n].copy(), 32), 2)  # [n, 3, 16, 16] in [0, 1]


def test_tiny_model_overfits_mnist_and_deeper_prefixes_reconstruct_better():
    # 32 digits, a 32-word random codebook: prefix 3 (one token per position at most places) cannot
    # carry every digit exactly, prefix 4 (an average of two tokens everywhere) carries more.
    # Measured on 2 idle cores: ~0.04 s/step, 300 steps ~12 s; train MSE (in [-1, 1]) 1.2 -> ~0.01.
    torch.manual_seed(0)
    images = _mnist(32)
    model = SPAE(preset("tiny"), _codebook(32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def errors() -> dict[int, float]:
        with torch.no_grad():
            out = model(images)
        return {l: F.mse_loss(r, out.target).item() for l, r in out.reconstructions.items()}

    start = errors()
    for _ in range(300):
        out = model(images[torch.randperm(32)[:16]])
        loss = (
            sum(F.mse_loss(r, out.target) for r in out.reconstructions.values())
            + 0.33 * out.quant.losses["commitment"]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = errors()
    assert end[3] < 0.05 * start[3] and end[4] < 0.05 * start[4]  # it overfits
    assert end[4] < end[3]  # the deeper prefix reconstructs better


def test_match_latent_to_codebook_moves_z_onto_the_codebook():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(300, 384, generator=g) * 0.05 + 0.5  # a codebook far from the origin
    model = SPAE(preset("tiny"), FrozenCodebook.from_tensor(emb))
    images = torch.rand(8, 3, 16, 16, generator=g)
    before = len(set(model(images).quant.ids[-1].flatten().tolist()))
    model.match_latent_to_codebook(images)
    z = model.encode_latent(images).permute(0, 2, 3, 1).flatten(0, 2)  # [b*h*w, c]
    torch.testing.assert_close(z.mean(0), emb.mean(0), atol=1e-4, rtol=1e-4)
    spread = lambda x: (x - x.mean(0)).pow(2).sum(1).mean().sqrt()  # noqa: E731
    torch.testing.assert_close(spread(z), spread(emb), atol=1e-4, rtol=1e-4)
    after = len(set(model(images).quant.ids[-1].flatten().tolist()))
    assert after > max(before, 10)  # from a handful of central words to many
