"""Video SPAE: presets, shapes, the tokenizer on clips, and a tiny 3D model overfitting Moving MNIST."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from spae.codebook import FrozenCodebook
from spae.config import from_dict, to_dict
from spae.model import SPAE, SPAEConfig, preset
from spae.networks3d import Decoder3D, Encoder3D
from spae.pyramid import PyramidSpec
from spae.tokenizer import SPAETokenizer
from spae.video import MovingMnistConfig, clips_to_float, moving_mnist, sample_frame_indices


def _codebook(v: int, c: int = 384, seed: int = 0) -> FrozenCodebook:
    g = torch.Generator().manual_seed(seed)
    words = [f"w{i}" for i in range(v)]
    return FrozenCodebook.from_tensor(F.normalize(torch.randn(v, c, generator=g), dim=1), words)


def _clips(n: int) -> torch.Tensor:
    """n Moving MNIST clips of 4 frames of 16x16 (8px digits): [n, 3, 4, 16, 16] in [0, 1]."""
    return clips_to_float(
        moving_mnist("train", 0, n, MovingMnistConfig(frames=4, size=16, digit_size=8)).clips
    )


def test_video_presets_round_trip_and_shapes():
    for name, shape, latent, counts in [
        ("tiny3d", (3, 4, 16, 16), (2, 4, 4), (1, 4, 32, 32)),
        ("moving-mnist", (3, 16, 32, 32), (4, 8, 8), (1, 4, 32, 256, 256)),
        ("kinetics", (3, 16, 128, 128), (4, 16, 16), (1, 4, 32, 256, 1024, 1024)),
    ]:
        cfg = preset(name)
        assert from_dict(SPAEConfig, to_dict(cfg)) == cfg
        assert cfg.is_video and cfg.input_shape == shape and cfg.latent_size == latent
        assert _counts(cfg) == counts
    with pytest.raises(ValueError, match="temporal downsample factor 2"):
        dataclasses.replace(preset("tiny3d"), num_frames=3)
    with pytest.raises(ValueError, match="latent_size"):  # a 2D pyramid for a video model
        SPAEConfig(num_frames=16, network=preset("moving-mnist").network)


def _counts(cfg: SPAEConfig) -> tuple[int, ...]:
    return PyramidSpec(cfg.pyramid).token_counts


def test_model_picks_3d_networks_and_checks_clip_shapes():
    model = SPAE(preset("tiny3d"), _codebook(16))
    assert isinstance(model.encoder, Encoder3D) and isinstance(model.decoder, Decoder3D)
    out = model(torch.rand(2, 3, 4, 16, 16))
    assert out.z.shape == (2, 384, 2, 4, 4) and out.reconstructions[4].shape == (2, 3, 4, 16, 16)
    assert [tuple(i.shape) for i in out.quant.ids] == [(2, 1, 1, 1), (2, 1, 2, 2), (2, 2, 4, 4), (2, 2, 4, 4)]
    with pytest.raises(ValueError, match=r"clips \[b, 3, 4, 16, 16\]"):
        model(torch.rand(2, 3, 16, 16))


def test_moving_mnist_is_seeded_and_sliceable():
    cfg = MovingMnistConfig(frames=6, size=32, digits=2)
    a = moving_mnist("train", 0, 5, cfg)
    b = moving_mnist("train", 3, 5, cfg)
    assert a.clips.shape == (5, 6, 32, 32) and a.labels.shape == (5, 2)
    assert (a.clips[3:] == b.clips).all() and (a.labels[3:] == b.labels).all()
    assert not (a.clips[:, 0] == a.clips[:, -1]).all()  # the digits move
    assert int(a.clips.max()) > 200
    from spae.data import load_mnist

    assert (load_mnist("train")[1][a.mnist_index] == a.labels).all()
    assert sample_frame_indices(16, 4) == [2, 6, 10, 14] and sample_frame_indices(2, 4) == [0, 1]


def test_tokenizer_on_clips_text_round_trip_and_save_load(tmp_path):
    torch.manual_seed(0)
    tok = SPAETokenizer(SPAE(preset("tiny3d"), _codebook(16)))
    clips = _clips(2)
    p = tok.encode(clips)
    assert [tuple(t.shape) for t in p.ids] == [(2, 1, 1, 1), (2, 1, 2, 2), (2, 2, 4, 4), (2, 2, 4, 4)]
    text = tok.to_text(p)
    assert len(text[0].split()) == 4 + 1 + 4 + 32 + 32
    back, reports = tok.from_text(text)
    assert back == p and all(r.ok for r in reports)
    # a missing layer 3 is filled from layer 2 by nearest-neighbour upsampling over (t, h, w)
    short = text[0].split(" [L3] ")[0]
    filled, rep = tok.from_text(short, layers=[1, 2, 3])
    assert rep[0].missing_layers == [3]
    up = (
        p.layer_ids(2)[0].repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
    )  # [2, 4, 4]
    assert torch.equal(filled.layer_ids(3)[0], up)
    out = tok.decode(p)
    assert out.shape == (2, 3, 4, 16, 16) and float(out.min()) >= 0 and float(out.max()) <= 1
    tok.save_pretrained(tmp_path / "tok")
    again = SPAETokenizer.from_pretrained(tmp_path / "tok")
    assert again.config == tok.config and again.fingerprint() == tok.fingerprint()
    torch.testing.assert_close(again.decode(p), out)


def test_tiny_3d_model_overfits_moving_mnist_and_deeper_prefixes_reconstruct_better():
    # 8 clips of 4 frames 16x16, a 16-word random codebook; prefix 3 holds one token per latent position,
    # prefix 4 the average of two (eq. 3). Measured: ~0.04 s/step on 2 idle cores (~0.2 busy); MSE in
    # [-1, 1] 1.23 -> 0.029 (prefix 3) / 0.028 (prefix 4), an all-black guess scores 0.071.
    torch.manual_seed(0)
    clips = _clips(8)
    model = SPAE(preset("tiny3d"), _codebook(16))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    blank = F.mse_loss(torch.full_like(clips, -1.0), clips * 2 - 1).item()

    def errors() -> tuple[dict[int, float], dict[int, float]]:
        with torch.no_grad():
            out = model(clips)
        pixels = {l: F.mse_loss(r, out.target).item() for l, r in out.reconstructions.items()}
        latent = {l: (out.z - out.quant.prefix_latents[l - 1]).pow(2).mean().item() for l in pixels}
        return pixels, latent

    start, _ = errors()
    for _ in range(150):
        out = model(clips[torch.randperm(8)])
        loss = (
            sum(F.mse_loss(r, out.target) for r in out.reconstructions.values())
            + 0.33 * out.quant.losses["commitment"]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    end, latent = errors()
    assert end[3] < 0.05 * start[3] and end[4] < 0.05 * start[4]  # it overfits...
    assert end[3] < 0.6 * blank and end[4] < 0.6 * blank  # ...and draws the digits, not a black frame
    assert latent[4] < latent[3]  # eq. 3: the average of more tokens sits closer to z
    assert end[4] < end[3]  # the deeper prefix reconstructs better
