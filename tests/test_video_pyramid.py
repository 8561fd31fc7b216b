"""The 3D token pyramid (eq. 1 per axis over (t, h, w)) and SAQ on clip latents, by hand-computed tables."""

import pytest
import torch
import torch.nn.functional as F

from spae.config import ConfigError, from_dict
from spae.pyramid import PyramidConfig, PyramidSpec
from spae.quantize import lookup_latent, saq_quantize


def test_moving_mnist_pyramid_positions_and_counts_by_hand():
    spec = PyramidSpec(PyramidConfig.moving_mnist())  # latent (4, 8, 8)
    # eq. 1 per axis, 0-indexed: ratio r = D / n, coordinate r*i - ceil(r/2) for i = 1..n
    assert spec.positions(1) == [(2, 4, 4)]  # r = (4, 8, 8): 4-2, 8-4, 8-4
    assert spec.positions(2) == [(2, 2, 2), (2, 2, 6), (2, 6, 2), (2, 6, 6)]  # r = (4, 4, 4): t 2; y, x 2, 6
    p3 = spec.positions(3)  # r = (2, 2, 2): t in {1, 3}, y, x in {1, 3, 5, 7}; time outermost
    assert len(p3) == 32 and p3[:5] == [(1, 1, 1), (1, 1, 3), (1, 1, 5), (1, 1, 7), (1, 3, 1)]
    assert p3[16] == (3, 1, 1) and p3[-1] == (3, 7, 7)
    assert spec.positions(4)[:3] == [(0, 0, 0), (0, 0, 1), (0, 0, 2)] and spec.positions(4)[64] == (1, 0, 0)
    assert spec.token_counts == (1, 4, 32, 256, 256)
    assert spec.cumulative_counts == (1, 5, 37, 293, 549)
    assert spec.covering_layers == (4, 5)
    assert spec.masks.shape == (5, 4, 8, 8) and int(spec.masks.sum()) == 549
    assert int(spec.flat_index[0]) == 2 * 64 + 4 * 8 + 4  # row-major over (t, y, x)
    # tokens per position after all 5 layers: (2,4,4) in L1, L4, L5; (1,1,1) in L3, L4, L5; (0,0,0) in L4, L5
    assert (
        spec.coverage[4, 2, 4, 4] == 3 and spec.coverage[4, 1, 1, 1] == 3 and spec.coverage[4, 0, 0, 0] == 2
    )
    assert spec.coverage[4, 2, 2, 2] == 3  # L2, L4, L5
    assert not bool((spec.coverage[2] > 0).all())


def test_kinetics_pyramid_counts():
    spec = PyramidSpec(PyramidConfig.kinetics())  # latent (4, 16, 16)
    assert spec.token_counts == (1, 4, 32, 256, 1024, 1024)
    assert spec.positions(1) == [(2, 8, 8)]
    assert spec.covering_layers == (5, 6)


def test_gather_3d_follows_serialization_order():
    spec = PyramidSpec(PyramidConfig(latent_size=(2, 4, 4), layer_sizes=((1, 1, 1), (2, 2, 2), (2, 4, 4))))
    assert spec.positions(2) == [
        (0, 1, 1),
        (0, 1, 3),
        (0, 3, 1),
        (0, 3, 3),
        (1, 1, 1),
        (1, 1, 3),
        (1, 3, 1),
        (1, 3, 3),
    ]
    z = torch.randn(2, 5, 2, 4, 4)
    g = spec.gather(z, 2)  # [b, n_l, c]
    assert g.shape == (2, 8, 5)
    for n, (t, y, x) in enumerate(spec.positions(2)):
        assert torch.equal(g[:, n], z[:, :, t, y, x])


@pytest.mark.parametrize(
    "latent, layers, needle",
    [
        ((4, 8, 8), ((2, 1, 1), (1, 2, 2), (4, 8, 8)), "layer 2"),  # time shrinks
        ((4, 8, 8), ((1, 1, 1), (3, 2, 2), (4, 8, 8)), "layer 2"),  # 4 % 3 != 0
        ((4, 8, 8), ((1, 1, 1), (2, 8, 8)), "layer 2"),  # last != latent
        ((4, 8, 8), ((1, 1), (4, 8, 8)), "same length"),  # mixed 2D / 3D
    ],
)
def test_invalid_3d_configs_name_the_problem(latent, layers, needle):
    with pytest.raises(ValueError, match=needle):
        PyramidConfig(latent_size=latent, layer_sizes=layers)


def test_3d_config_round_trips_through_the_config_system():
    cfg = from_dict(PyramidConfig, {"latent_size": [2, 4, 4], "layer_sizes": [[1, 1, 1], [2, 4, 4]]})
    assert cfg.dims == 3 and cfg.layer_sizes == ((1, 1, 1), (2, 4, 4))
    with pytest.raises(ConfigError, match="layer 2"):
        from_dict(PyramidConfig, {"latent_size": [2, 4, 4], "layer_sizes": [[2, 1, 1], [1, 4, 4], [2, 4, 4]]})


def test_saq_on_clip_latents_matches_eq_3_and_lookup():
    torch.manual_seed(0)
    spec = PyramidSpec(PyramidConfig(latent_size=(2, 2, 2), layer_sizes=((1, 1, 1), (2, 2, 2))))
    emb = F.normalize(torch.randn(16, 4), dim=1)  # [v, c]
    z = torch.randn(3, 4, 2, 2, 2)  # [b, c, t, h, w]
    out = saq_quantize(z, emb, spec)
    assert [tuple(i.shape) for i in out.ids] == [(3, 1, 1, 1), (3, 2, 2, 2)]
    # layer 1 sits at (t, y, x) = (1, 1, 1): eq. 1 with ratio 2 is 2*1 - ceil(2/2) + 1 = 2 (1-indexed)
    assert spec.positions(1) == [(1, 1, 1)]
    # eq. 2: z_2 = 2 z - e(k_1) there (flat index 7), z elsewhere
    k1 = out.ids[0].reshape(3)
    z2 = out.layer_inputs[1]  # [b, 8, c]
    torch.testing.assert_close(z2[:, 7], 2 * z[:, :, 1, 1, 1] - emb[k1])
    torch.testing.assert_close(z2[:, 0], z[:, :, 0, 0, 0])
    # eq. 3: the prefix of 2 layers averages e(k_1) and e(k_2) at (1,1,1), e(k_2) alone elsewhere
    k2 = out.ids[1].reshape(3, 8)
    zq = out.prefix_latents[1]  # [b, c, t, h, w]
    torch.testing.assert_close(zq[:, :, 1, 1, 1], (emb[k1] + emb[k2[:, 7]]) / 2)
    torch.testing.assert_close(zq[:, :, 1, 0, 1], emb[k2[:, 5]])
    torch.testing.assert_close(lookup_latent(out.ids, emb, spec, 2, average=True), zq)
