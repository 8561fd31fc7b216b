"""The token pyramid (eq. 1): positions, counts, masks, coverage, gather, config validation."""

import pytest
import torch

from spae.config import ConfigError, from_dict
from spae.pyramid import PyramidConfig, PyramidSpec

# Eq. 1 worked by hand for the paper's 16x16 latent (0-indexed = 1-indexed - 1):
#   layer 1, h_l = 1:  h' = 16, row = 16*1 - 8 + 1 = 9           -> 8
#   layer 2, h_l = 2:  h' = 8,  row = 8i - 4 + 1 = 5, 13         -> 4, 12
#   layer 3, h_l = 4:  h' = 4,  row = 4i - 2 + 1 = 3, 7, 11, 15  -> 2, 6, 10, 14
#   layer 4, h_l = 8:  h' = 2,  row = 2i - 1 + 1 = 2, 4, ..., 16 -> 1, 3, ..., 15
#   layers 5, 6, h_l = 16: h' = 1, row = i - 1 + 1 = i           -> 0..15
PAPER_ROWS = {
    1: [8],
    2: [4, 12],
    3: [2, 6, 10, 14],
    4: [1, 3, 5, 7, 9, 11, 13, 15],
    5: list(range(16)),
    6: list(range(16)),
}


def test_paper_positions_match_hand_table():
    spec = PyramidSpec(PyramidConfig.paper())
    for l, rows in PAPER_ROWS.items():
        expected = [(y, x) for y in rows for x in rows]  # square grids: same rows and columns, row-major
        assert spec.positions(l) == expected, f"layer {l}"
    assert spec.positions(2) == [(4, 4), (4, 12), (12, 4), (12, 12)]


def test_paper_counts():
    spec = PyramidSpec(PyramidConfig.paper())
    assert spec.num_layers == 6
    assert spec.token_counts == (1, 4, 16, 64, 256, 256)
    assert spec.cumulative_counts == (1, 5, 21, 85, 341, 597)
    # layers 1-4 fall on disjoint positions; layer 5 is the first to cover all 256 positions
    assert [int(spec.masks[l].sum()) for l in range(6)] == [1, 4, 16, 64, 256, 256]
    assert [int((spec.coverage[l] > 0).sum()) for l in range(6)] == [1, 5, 21, 85, 256, 256]
    assert spec.covering_layers == (5, 6)
    assert int(spec.coverage[5, 8, 8]) == 3  # layer 1, 5 and 6 tokens all sit at (8, 8)
    assert int(spec.coverage[5, 0, 0]) == 2


def test_mnist_preset():
    spec = PyramidSpec(PyramidConfig.mnist())
    assert spec.token_counts == (1, 4, 16, 64, 64)
    assert spec.cumulative_counts == (1, 5, 21, 85, 149)
    assert spec.covering_layers == (4, 5)
    assert spec.positions(1) == [(4, 4)]  # h' = 8: 8 - 4 + 1 = 5 -> 4
    assert spec.positions(2) == [(2, 2), (2, 6), (6, 2), (6, 6)]  # h' = 4: 4i - 2 + 1 = 3, 7


def test_rectangular_and_flat_index():
    spec = PyramidSpec(PyramidConfig(latent_size=(4, 6), layer_sizes=((1, 2), (2, 3), (4, 6))))
    # layer 1: h' = 4 -> row 4 - 2 = 2; w' = 3 -> cols 3j - 2 + 1 - 1 = 1, 4
    assert spec.positions(1) == [(2, 1), (2, 4)]
    # layer 2: h' = 2 -> rows 1, 3; w' = 2 -> cols 1, 3, 5
    assert spec.positions(2) == [(1, 1), (1, 3), (1, 5), (3, 1), (3, 3), (3, 5)]
    assert spec.flat_index[0].tolist() == [2 * 6 + 1, 2 * 6 + 4]
    assert spec.covering_layers == (3,)


def test_gather_order():
    spec = PyramidSpec(PyramidConfig.mnist())
    z = torch.arange(2 * 3 * 64, dtype=torch.float32).view(2, 3, 8, 8)
    g = spec.gather(z, 2)
    assert g.shape == (2, 4, 3)
    for t, (y, x) in enumerate(spec.positions(2)):
        assert torch.equal(g[:, t, :], z[:, :, y, x])


@pytest.mark.parametrize(
    "latent, layers, needle",
    [
        ((8, 8), ((2, 2), (1, 1), (8, 8)), "layer 2"),  # shrinks
        ((8, 8), ((1, 1), (3, 3), (8, 8)), "layer 2"),  # 8 % 3 != 0
        ((8, 8), ((1, 1), (2, 2), (4, 4)), "layer 3"),  # last != latent
        ((8, 8), ((1, 1), (2, 4), (4, 2), (8, 8)), "layer 3"),  # w shrinks
        ((8, 8), ((0, 1), (8, 8)), "layer 1"),
    ],
)
def test_invalid_configs_name_the_layer(latent, layers, needle):
    with pytest.raises(ValueError, match=needle):
        PyramidConfig(latent_size=latent, layer_sizes=layers)


def test_config_system_round_trip_and_errors():
    cfg = from_dict(PyramidConfig, {"latent_size": [16, 16], "layer_sizes": [[1, 1], [4, 4], [16, 16]]})
    assert cfg.layer_sizes == ((1, 1), (4, 4), (16, 16))
    assert hash(cfg) == hash(PyramidConfig((16, 16), ((1, 1), (4, 4), (16, 16))))
    with pytest.raises(ConfigError, match="layer 2"):
        from_dict(PyramidConfig, {"latent_size": [8, 8], "layer_sizes": [[2, 2], [1, 1], [8, 8]]})


def test_layer_out_of_range():
    spec = PyramidSpec(PyramidConfig.mnist())
    with pytest.raises(ValueError, match="1..5"):
        spec.positions(0)
    with pytest.raises(ValueError, match="1..5"):
        spec.positions(6)
