"""Eqs. 4, 7, 8, 9 and their pieces against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spae.losses import (
    LeCAMEMA,
    LossConfig,
    PerceptualLoss,
    appearance_loss,
    candidate_mask,
    check_semantic_layers,
    discriminator_loss,
    discriminator_total,
    dynamic_weight,
    generator_gan_loss,
    lecam_loss,
    loss_preset,
    reconstruction_loss,
    sample_semantic_targets,
    semantic_loss,
    spae_total,
)

# 3 words in 2-d: e0 = (1, 0), e1 = (0, 1), e2 = (0, 0)
CODEBOOK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])


def test_semantic_loss_hand_computed():
    # z = (1, 0), target e0: squared distances 0, 2, 1 -> -log(1 / (1 + e^-2 + e^-1))
    z = torch.tensor([[[1.0, 0.0]]])  # [b=1, n=1, c=2]
    loss = semantic_loss([z], CODEBOOK, [torch.tensor([[0]])])
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2) + math.exp(-1)), abs=1e-6)
    # T = 0.5 doubles every logit: -log(1 / (1 + e^-4 + e^-2))
    sharp = semantic_loss([z], CODEBOOK, [torch.tensor([[0]])], temperature=0.5)
    assert sharp.item() == pytest.approx(math.log(1 + math.exp(-4) + math.exp(-2)), abs=1e-6)
    # target e1 at z = (1, 0): logits 0, -2, -1 -> -log(e^-2 / (1 + e^-2 + e^-1))
    other = semantic_loss([z], CODEBOOK, [torch.tensor([[1]])])
    assert other.item() == pytest.approx(2 + math.log(1 + math.exp(-2) + math.exp(-1)), abs=1e-6)


def test_semantic_loss_means_over_layers_positions_and_skips_padding():
    z1 = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # layer 1, [b=2, n=1, c]
    z2 = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[5.0, 5.0], [5.0, 5.0]]])  # layer 2, [2, 2, c]
    t1 = torch.tensor([[0], [-1]])  # image 2 has no candidate at layer 1
    t2 = torch.tensor([[0, 2], [-1, -1]])
    a = math.log(1 + math.exp(-2) + math.exp(-1))  # z = e0, target e0
    b = math.log(1 + 2 * math.exp(-1))  # z = e2 = (0, 0), target e2: distances 1, 1, 0
    loss = semantic_loss([z1, z2], CODEBOOK, [t1, t2])
    assert loss.item() == pytest.approx((a + (a + b) / 2) / 2, abs=1e-6)
    # a layer without targets is left out; no target at all gives a graph-connected zero
    assert semantic_loss([z1, z2], CODEBOOK, [t1, torch.full_like(t2, -1)]).item() == pytest.approx(
        a, abs=1e-6
    )
    zg = z1.clone().requires_grad_(True)
    empty = semantic_loss([zg], CODEBOOK, [torch.full_like(t1, -1)])
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(zg.grad, torch.zeros_like(zg))


def _reference(z, codebook, targets, t):
    logits = -((z[:, None, :] - codebook[None]) ** 2).sum(-1) / t  # [N, v]
    return F.cross_entropy(logits, targets)


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_chunked_matches_full_softmax_values_and_gradients(temperature):
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(50, 8, generator=g)
    z = torch.randn(3, 4, 8, generator=g)
    targets = torch.randint(0, 50, (3, 4), generator=g)
    z_a = z.clone().requires_grad_(True)
    z_b = z.clone().requires_grad_(True)
    chunked = semantic_loss([z_a], codebook, [targets], temperature=temperature, chunk=7)
    full = _reference(z_b.reshape(-1, 8), codebook, targets.reshape(-1), temperature)
    chunked.backward()
    full.backward()
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    assert torch.allclose(z_a.grad, z_b.grad, rtol=1e-4, atol=1e-4)


def test_layers_searched_together_match_each_layer_alone():
    # eq. 7 runs one streaming pass over every layer's positions; the result must be the mean of
    # per-layer full-softmax cross-entropies (padding skipped), with each layer's own gradient
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(61, 8, generator=g)
    zs = [torch.randn(2, n, 8, generator=g) for n in (1, 4, 16)]
    ts = [torch.randint(0, 61, (2, n), generator=g) for n in (1, 4, 16)]
    ts[1][0, :3] = -1  # some padding in layer 2
    ts[2][:] = -1  # layer 3 has no target at all: left out of the mean
    za = [z.clone().requires_grad_(True) for z in zs]
    zb = [z.clone().requires_grad_(True) for z in zs]
    loss = semantic_loss(za, codebook, ts, temperature=0.3, chunk=16)
    refs = []
    for z, t in zip(zb[:2], ts[:2], strict=True):
        keep = t.reshape(-1) >= 0
        refs.append(_reference(z.reshape(-1, 8)[keep], codebook, t.reshape(-1)[keep], 0.3))
    ref = torch.stack(refs).mean() + 0.0 * zb[2].sum()
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(za, zb, strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(za[2].grad, torch.zeros_like(za[2]))


def test_gradients_reach_layer_inputs_never_the_codebook():
    codebook = CODEBOOK.clone().requires_grad_(True)  # even a table that asks for gradients gets none
    z = torch.tensor([[[0.3, 0.2]]], requires_grad=True)
    semantic_loss([z], codebook, [torch.tensor([[1]])]).backward()
    assert codebook.grad is None
    # d/dz = 2 (sum_k p_k e_k - e_c); p from logits -||z - e_k||^2
    p = torch.softmax(-((z.detach()[0, 0] - CODEBOOK) ** 2).sum(-1), 0)
    expected = 2 * (p @ CODEBOOK - CODEBOOK[1])
    assert torch.allclose(z.grad[0, 0], expected, atol=1e-6)


def test_candidate_mask_eq4():
    scores = torch.tensor([[1.0, 0.96, 0.5, float("nan")]])
    mask = candidate_mask(scores, (0.98, 0.95))
    assert mask.tolist() == [[[True, False, False, False]], [[True, True, False, False]]]


def test_sampling_respects_thresholds_and_padding():
    ids = torch.tensor([[5, 6, 7, -1], [8, 9, -1, -1]])
    scores = torch.tensor([[1.0, 0.96, 0.5, 1.0], [0.9, 0.85, 1.0, 1.0]])  # padding scores are ignored
    g = torch.Generator().manual_seed(0)
    t1, t2 = sample_semantic_targets(ids, scores, (0.98, 0.95), (1, 64, 64), generator=g)
    assert t1.shape == (2, 1) and t2.shape == (2, 64) and t2.dtype == torch.int64
    assert t1.tolist() == [[5], [-1]]  # image 2 has nothing >= 0.98 (or >= 0.95)
    assert set(t2[0].tolist()) == {5, 6} and set(t2[1].tolist()) == {-1}
    with pytest.raises(ValueError, match="thresholds"):
        sample_semantic_targets(ids, scores, (0.98, 0.95), (1,))


def test_pixel_and_gan_terms():
    assert reconstruction_loss(
        torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    ).item() == pytest.approx(0.5)
    # softplus(-0) = ln 2, softplus(-ln 3) = ln(4 / 3)
    fake = torch.tensor([0.0, math.log(3.0)])
    assert generator_gan_loss(fake).item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, abs=1e-6)
    assert discriminator_loss(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)).item() == pytest.approx(
        2 * math.log(2), abs=1e-6
    )


def test_lecam_ema_and_loss():
    ema = LeCAMEMA(decay=0.5)
    ema.update(torch.tensor([1.0, 3.0]), torch.tensor([-1.0]))  # first update copies the means
    assert (ema.ema_real.item(), ema.ema_fake.item()) == (2.0, -1.0)
    ema.update(torch.tensor([4.0]), torch.tensor([1.0]))  # 0.5 * old + 0.5 * new
    assert (ema.ema_real.item(), ema.ema_fake.item()) == (3.0, 0.0)
    # relu(D(real) - 0)^2 = [1, 0]; relu(3 - D(fake))^2 = [1, 0] -> 0.5 + 0.5
    assert lecam_loss(torch.tensor([1.0, -1.0]), torch.tensor([2.0, 4.0]), ema).item() == pytest.approx(1.0)
    state = ema.state_dict()
    assert set(state) == {"ema_real", "ema_fake", "num_updates"} and int(state["num_updates"]) == 2
    # the discriminator total: logistic loss + phi * LeCAM after updating the anchors
    fresh = LeCAMEMA(decay=0.5)
    total = discriminator_total(torch.zeros(2), torch.zeros(2), fresh, LossConfig(lecam_weight=1.0))
    assert total.item() == pytest.approx(2 * math.log(2)) and int(fresh.num_updates) == 1


def test_dynamic_weight_has_no_gradient_and_eq9():
    l_app = torch.tensor(2.0, requires_grad=True)
    l_sem = torch.tensor(4.0, requires_grad=True)
    w = dynamic_weight(l_app, l_sem)
    assert w.item() == pytest.approx(0.5) and not w.requires_grad
    assert dynamic_weight(l_app, l_sem, max_weight=0.3).item() == pytest.approx(0.3)
    total = spae_total(l_app, l_sem, alpha=1.0, w=w)  # 2 + 1 * 0.5 * 4
    total.backward()
    assert total.item() == pytest.approx(4.0)
    assert l_app.grad.item() == pytest.approx(1.0) and l_sem.grad.item() == pytest.approx(0.5)


def test_appearance_loss_eq8_weights():
    cfg = LossConfig()
    t = {
        k: torch.tensor(v)
        for k, v in dict(reconstruction=1.0, commitment=2.0, gan=3.0, perceptual=4.0).items()
    }
    assert appearance_loss(t, cfg).item() == pytest.approx(1 + 0.33 * 2 + 0.1 * 3 + 0.1 * 4)
    assert appearance_loss({**t, "lecam": torch.tensor(5.0)}, cfg).item() == pytest.approx(2.36 + 1e-4 * 5)
    with pytest.raises(KeyError, match="commitment"):
        appearance_loss({"reconstruction": torch.tensor(1.0)}, cfg)


def test_config_validation_and_description():
    with pytest.raises(ValueError, match="semantic_layers"):
        LossConfig(semantic_layers=2)
    with pytest.raises(ValueError, match="non-increasing"):
        LossConfig(semantic_layers=2, thresholds=(0.8, 0.9))
    assert "perceptual OFF" in LossConfig().describe()
    assert "perceptual ON" in LossConfig(perceptual_weights="/x/vgg.pth").describe()


def test_perceptual_loss_with_random_vgg_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    loss_fn = PerceptualLoss(path)
    assert all(not p.requires_grad for p in loss_fn.parameters())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    y = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_(True)
    assert loss_fn(x, x).item() == pytest.approx(0.0, abs=1e-6)
    d = loss_fn(x, y)
    d.backward()
    assert d.item() > 0 and y.grad is not None and y.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        PerceptualLoss(tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="VGG16"):
        PerceptualLoss(tmp_path / "other.pth")


def test_semantic_loss_ignores_autocast():
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(300, 16, generator=g)
    z = torch.randn(2, 5, 16, generator=g)
    targets = torch.randint(0, 300, (2, 5), generator=g)
    ref = semantic_loss([z], codebook, [targets])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = semantic_loss([z.bfloat16()], codebook, [targets])
    assert under.dtype == torch.float32
    assert under.item() == pytest.approx(
        semantic_loss([z.bfloat16().float()], codebook, [targets]).item(), rel=1e-6
    )
    assert under.item() == pytest.approx(ref.item(), rel=1e-2)


def test_appearance_loss_weighs_every_named_term_and_refuses_an_unweighted_one():
    cfg = LossConfig(codebook_weight=0.5)
    t = {k: torch.tensor(v) for k, v in dict(reconstruction=1.0, commitment=2.0, codebook=4.0).items()}
    assert appearance_loss(t, cfg).item() == pytest.approx(1 + 0.33 * 2 + 0.5 * 4)
    assert list(cfg.weights)[:3] == ["reconstruction", "commitment", "codebook"]
    with pytest.raises(KeyError, match=r"\['entropy'\] have no weight in the loss config"):
        appearance_loss({**t, "entropy": torch.tensor(1.0)}, cfg)
    with pytest.raises(ValueError, match="loss weights must be >= 0"):
        LossConfig(codebook_weight=-1.0)


def test_every_model_preset_has_its_loss_defaults():
    from spae.model import PRESETS, preset

    for name in PRESETS:
        cfg = loss_preset(name)
        check_semantic_layers(cfg, len(preset(name).pyramid.layer_sizes))  # fits the preset's pyramid
    assert loss_preset("mnist").semantic_layers == 2 and loss_preset("paper") == LossConfig()
    with pytest.raises(ValueError, match="unknown SPAE preset 'huge'"):
        loss_preset("huge")
    with pytest.raises(ValueError, match="loss.semantic_layers=5 exceeds the pyramid's 4 layers"):
        check_semantic_layers(LossConfig(), 4)
