"""Quantizers (eqs. 2-3): hand-computed SAQ / RQ / VQ steps, chunked search, straight-through."""

import pytest
import torch

from spae.codebook import FrozenCodebook
from spae.config import ConfigError, from_dict
from spae.pyramid import PyramidConfig, PyramidSpec
from spae.quantize import (
    KINDS,
    Quantizer,
    QuantizerConfig,
    QuantizerKind,
    nearest_codes,
    register_kind,
    rq_quantize,
    saq_quantize,
)

# A hand-made example: 4 codes in R^2, a 2x2 latent, a 2-layer pyramid 1x1 -> 2x2.
# Eq. 1: layer 1 (h' = 2) sits at (2 - 1 + 1) = 2 (1-indexed) -> (1, 1); layer 2 covers all positions.
CODES = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [4.0, 4.0]])  # e0, e1, e2, e3
Z = {(0, 0): (0.4, 0.2), (0, 1): (0.0, 1.8), (1, 0): (3.0, 3.0), (1, 1): (1.8, 0.9)}


def _z() -> torch.Tensor:
    z = torch.zeros(1, 2, 2, 2)
    for (y, x), vec in Z.items():
        z[0, :, y, x] = torch.tensor(vec)
    return z


def _pyr() -> PyramidSpec:
    return PyramidSpec(PyramidConfig(latent_size=(2, 2), layer_sizes=((1, 1), (2, 2))))


def _at(t: torch.Tensor, y: int, x: int) -> list[float]:
    return t[0, :, y, x].tolist()


def test_saq_hand_computed():
    out = saq_quantize(_z(), CODES, _pyr())
    # layer 1 at (1, 1): z_1 = z = (1.8, 0.9); d = 4.05, 0.85, 4.45, 14.45 -> k = 1, e = (2, 0)
    assert out.ids[0].tolist() == [[[1]]]
    assert out.layer_inputs[0][0, 0].tolist() == pytest.approx([1.8, 0.9])
    p1 = out.prefix_latents[0]
    assert _at(p1, 1, 1) == pytest.approx([2.0, 0.0])  # eq. 3 with one token
    assert _at(p1, 0, 0) == [0.0, 0.0] and _at(p1, 1, 0) == [0.0, 0.0]  # not covered yet
    # layer 2, eq. 2: z_2 = z + 1[P(1)] (z - e(k_1))
    #   (0,0) (0.4, 0.2) -> e0;  (0,1) (0, 1.8) -> e2;  (1,0) (3, 3) -> e3
    #   (1,1) 2 z - e1 = (1.6, 1.8): d = 5.8, 3.4, 2.6, 10.6 -> e2
    assert out.ids[1].tolist() == [[[0, 2], [3, 2]]]
    z2 = out.layer_inputs[1][0].tolist()
    for got, want in zip(z2, [[0.4, 0.2], [0.0, 1.8], [3.0, 3.0], [1.6, 1.8]], strict=True):
        assert got == pytest.approx(want)
    # eq. 3: the average of the tokens so far; (1,1) = (e1 + e2) / 2 = (1, 1)
    p2 = out.prefix_latents[1]
    assert _at(p2, 0, 0) == pytest.approx([0.0, 0.0])
    assert _at(p2, 0, 1) == pytest.approx([0.0, 2.0])
    assert _at(p2, 1, 0) == pytest.approx([4.0, 4.0])
    assert _at(p2, 1, 1) == pytest.approx([1.0, 1.0])
    # commitment (mean over positions and the c = 2 channels): layer 1 ||(1.8,.9)-(2,0)||^2 / 2 = .85 / 2;
    # layer 2 mean(.2, .04, 2, .65) / 2 = .7225 / 2
    assert out.losses["commitment"].item() == pytest.approx((0.85 + 0.7225) / 2)
    assert set(out.losses) == {"commitment"}  # a frozen table: no codebook term


def test_streaming_average_identity():
    # The paper prints z<=l+1 = z<=l + e(k_{l+1}) / (l^ + 1); the streaming average is
    # z<=l+1 = z<=l + (e(k_{l+1}) - z<=l) / (l^ + 1) (the printed form omits "- z<=l").
    # We implement eq. 3 (the average) and check the correct identity on random data.
    torch.manual_seed(0)
    spec = PyramidSpec(PyramidConfig(latent_size=(4, 4), layer_sizes=((1, 1), (2, 2), (4, 4), (4, 4))))
    codes = torch.randn(50, 3)
    out = saq_quantize(torch.randn(2, 3, 4, 4), codes, spec)
    for l in range(1, spec.num_layers):  # 0-indexed layer l + 1 extends prefix l
        prev, new = out.prefix_latents[l - 1], out.prefix_latents[l]
        for t, (y, x) in enumerate(spec.positions(l + 1)):
            l_hat = int(spec.coverage[l - 1, y, x])
            e = codes[out.ids[l].reshape(2, -1)[:, t]]  # [b, c]
            expected = prev[:, :, y, x] + (e - prev[:, :, y, x]) / (l_hat + 1)
            torch.testing.assert_close(new[:, :, y, x], expected)
    # the printed form differs whenever a position already had a token
    y, x = spec.positions(4)[0]
    printed = out.prefix_latents[2][:, :, y, x] + codes[out.ids[3].reshape(2, -1)[:, 0]] / 3
    assert not torch.allclose(printed, out.prefix_latents[3][:, :, y, x])


def test_rq_hand_computed():
    out = rq_quantize(_z(), CODES, _pyr())
    assert out.ids[0].tolist() == [[[1]]]
    # layer 2 at (1,1): r_2 = z - e1 = (-0.2, 0.9): d = .85, 5.65, 1.25, 27.25 -> e0
    assert out.ids[1].tolist() == [[[0, 2], [3, 0]]]
    assert out.layer_inputs[1][0, 3].tolist() == pytest.approx([-0.2, 0.9])
    assert _at(out.prefix_latents[1], 1, 1) == pytest.approx([2.0, 0.0])  # e1 + e0, a sum
    # commitment: layer 1 .85 / 2; layer 2 mean(.2, .04, 2, ||(1.8,.9)-(2,0)||^2 = .85) / 2 = .7725 / 2
    assert out.losses["commitment"].item() == pytest.approx((0.85 + 0.7725) / 2)


def _codebook(codes: torch.Tensor) -> FrozenCodebook:
    return FrozenCodebook.from_tensor(codes, [f"w{i}" for i in range(codes.shape[0])])


def test_vq_hand_computed_and_codebook_loss():
    q = Quantizer(QuantizerConfig(kind="vq", vq_codebook_size=4), _pyr(), _codebook(torch.zeros(4, 2)))
    with torch.no_grad():
        q.embedding.weight.copy_(CODES)  # the learned table, set to the hand-made codes
    z = _z().requires_grad_(True)
    out = q(z)
    assert out.ids[0].tolist() == [[[1]]] and out.ids[1].tolist() == [[[0, 2], [3, 2]]]
    # (sg(z_l) - e(k_l))^2 averaged over positions and c = 2: layer 1 .85 / 2;
    # layer 2 mean(.2, .04, 2, ||(1.6,1.8)-(0,2)||^2 = 2.6) / 2 = 1.21 / 2
    assert out.losses["codebook"].item() == pytest.approx((0.85 + 1.21) / 2)
    out.losses["codebook"].backward()
    assert q.embedding.weight.grad is not None and q.embedding.weight.grad.abs().sum() > 0
    assert z.grad is None  # the codebook loss stops the gradient to the encoder
    # one-layer full-resolution pyramid = plain VQ-VAE: nearest code per position
    flat = PyramidSpec(PyramidConfig(latent_size=(2, 2), layer_sizes=((2, 2),)))
    q1 = Quantizer(QuantizerConfig(kind="vq", vq_codebook_size=4), flat, _codebook(torch.zeros(4, 2)))
    with torch.no_grad():
        q1.embedding.weight.copy_(CODES)
    assert q1(_z()).ids[0].tolist() == [[[0, 2], [3, 1]]]


def test_quantizer_module_matches_functional_and_lookup():
    torch.manual_seed(1)
    spec = PyramidSpec(PyramidConfig.mnist())
    cb = _codebook(torch.randn(300, 8))
    z = torch.randn(3, 8, 8, 8)
    for kind, fn in (("saq", saq_quantize), ("rq", rq_quantize)):
        q = Quantizer(QuantizerConfig(kind=kind, search_chunk=64, search_dtype="float32"), spec, cb)
        out, ref = q(z), fn(z, cb.embeddings, spec)
        for a, b in zip(out.ids, ref.ids, strict=True):
            assert torch.equal(a, b)
        for l in spec.covering_layers + (1, 2):
            torch.testing.assert_close(q.lookup(out.ids, l), out.prefix_latents[l - 1])


def test_straight_through_gradients():
    spec = PyramidSpec(PyramidConfig.mnist())
    cb = _codebook(torch.randn(100, 8))
    q = Quantizer(QuantizerConfig(kind="saq"), spec, cb)
    z = torch.randn(2, 8, 8, 8, requires_grad=True)
    out = q(z)
    out.prefix_latents[-1].sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # identity gradient through a covering prefix
    z.grad = None
    q(z).prefix_latents[0].sum().backward()
    mask = spec.masks[0].float().expand(2, 8, 8, 8)
    assert torch.equal(z.grad, mask)  # only covered positions pass gradient
    z.grad = None
    out = q(z)
    (out.losses["commitment"] + out.layer_inputs[2].pow(2).sum()).backward()
    assert z.grad.abs().sum() > 0  # commitment and eq. 2's z_l carry gradient to the encoder
    assert not cb.embeddings.requires_grad and cb.embeddings.grad is None
    assert list(q.parameters()) == []  # the frozen codebook is never a Parameter


def _brute(x: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = ((x[:, None, :] - codes[None, :, :]) ** 2).sum(-1)  # [n, v]
    return d.argmin(1), d.min(1).values


def test_nearest_codes_chunked_equals_brute_force():
    torch.manual_seed(2)
    x, codes = torch.randn(97, 16, dtype=torch.float64), torch.randn(1000, 16, dtype=torch.float64)
    ids, dist = nearest_codes(x, codes, chunk=128)  # v = 1000 > chunk, last chunk partial
    ref_ids, ref_d = _brute(x, codes)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(dist, ref_d)
    ids2, _ = nearest_codes(x, codes, chunk=128, max_elements=300)  # rows blocked too
    assert torch.equal(ids2, ref_ids)
    ids32, d32 = nearest_codes(x.float(), codes.float(), chunk=100)
    assert (ids32 == ref_ids).float().mean() > 0.99
    assert dist.dtype == torch.float64 and d32.dtype == torch.float32


def test_nearest_codes_ties_go_to_lowest_row():
    # integer data: exact distances; row 3 is duplicated at rows 130 and 700 (other chunks)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-3, 4, (800, 4), generator=g).float()
    codes[130] = codes[3]
    codes[700] = codes[3]
    x = torch.cat([codes[3:4], codes[130:131], torch.randint(-3, 4, (40, 4), generator=g).float()])
    ids, dist = nearest_codes(x, codes, chunk=128)
    ref, ref_d = _brute(x, codes)  # torch.argmin: first minimum
    assert ids[0] == ids[1] and dist[0] == 0
    assert torch.equal(ids, ref) and torch.equal(dist, ref_d)
    assert ids[0] == int((codes == codes[3]).all(1).nonzero()[0])


def test_bfloat16_search_dtype():
    torch.manual_seed(4)
    x, codes = torch.randn(64, 32), torch.randn(500, 32)
    ids, dist = nearest_codes(x, codes.to(torch.bfloat16), chunk=100)
    assert dist.dtype == torch.float32  # distances accumulated in fp32
    ref, _ = _brute(x, codes)
    assert (ids == ref).float().mean() > 0.8  # bf16 rounding may flip near-ties only


def test_latent_shape_errors():
    with pytest.raises(ValueError, match="latent grid"):
        saq_quantize(torch.randn(1, 2, 3, 3), CODES, _pyr())
    with pytest.raises(ValueError, match="codebook dim"):
        saq_quantize(torch.randn(1, 3, 2, 2), CODES, _pyr())


# ----------------------------------------------------------------------------- kinds and search as config


def test_kinds_are_registry_entries():
    assert {k: (v.target, v.table) for k, v in KINDS.items()} == {
        "saq": ("average", "frozen"),
        "rq": ("residual", "frozen"),
        "vq": ("average", "learned"),
    }
    with pytest.raises(ValueError, match=r"'nope' is not a registered kind; registered: saq, rq, vq"):
        QuantizerConfig(kind="nope")
    with pytest.raises(ConfigError, match="quantizer.kind 'nope'"):
        from_dict(QuantizerConfig, {"kind": "nope"}, "quantizer")
    with pytest.raises(ValueError, match="already registered"):
        register_kind(QuantizerKind("saq", "average", "frozen"))
    with pytest.raises(ValueError, match="target 'mean'"):
        QuantizerKind("x", "mean", "frozen")


def test_a_registered_kind_builds_from_its_entry_alone():
    """A test-only kind (residual walk over a learned table) is one registry entry: the Quantizer gives it
    a learned table, the residual target (Ẑ<=l = sum of codes) and the codebook loss."""
    register_kind(QuantizerKind("rvq-test", "residual", "learned"))
    try:
        q = Quantizer(
            QuantizerConfig(kind="rvq-test", vq_codebook_size=4), _pyr(), _codebook(torch.zeros(4, 2))
        )
        with torch.no_grad():
            q.embedding.weight.copy_(CODES)
        out = q(_z())
        ref = rq_quantize(_z(), CODES, _pyr())  # the same walk over the same (here: copied) table
        assert all(torch.equal(a, b) for a, b in zip(out.ids, ref.ids, strict=True))
        assert set(out.losses) == {"commitment", "codebook"} and out.losses["codebook"].requires_grad
        torch.testing.assert_close(q.lookup(out.ids, 2), ref.prefix_latents[1])
    finally:
        del KINDS["rvq-test"]
    with pytest.raises(ValueError, match="rvq-test"):
        QuantizerConfig(kind="rvq-test")


def test_chunked_and_auto_search_give_the_same_ids_on_cpu():
    torch.manual_seed(5)
    spec = PyramidSpec(PyramidConfig.mnist())
    cb = _codebook(torch.randn(300, 32))
    z = torch.randn(3, 32, 8, 8)
    ids = {}
    for search in ("auto", "chunked"):
        q = Quantizer(QuantizerConfig(search=search, search_chunk=64), spec, cb)
        ids[search] = (q(z).ids, q.encode_ids(z))
    for a, b in zip(ids["auto"][0] + ids["auto"][1], ids["chunked"][0] + ids["chunked"][1], strict=True):
        assert torch.equal(a, b)
    x, e = torch.randn(50, 32), torch.randn(300, 32)
    assert torch.equal(nearest_codes(x, e, 64)[0], nearest_codes(x, e, 64, search="chunked")[0])


@pytest.mark.parametrize("search", ["fused", "fused-tiled"])
def test_a_fused_search_where_it_cannot_run_is_an_error(search):
    """An explicit fused kernel on the CPU (or a fp32 table) is refused with the reason, never a silent
    fallback to the chunked search."""
    x, e = torch.randn(4, 32), torch.randn(64, 32)
    with pytest.raises(ValueError, match=rf"search='{search}' needs the fused Triton kernel.*cpu tensors"):
        nearest_codes(x, e, search=search)
    q = Quantizer(QuantizerConfig(search=search), _pyr(), _codebook(torch.randn(8, 2)))
    with pytest.raises(ValueError, match="float32 table of dim 2"):
        q.encode_ids(_z())
    with pytest.raises(ValueError, match="quantizer.search 'fast'"):
        QuantizerConfig(search="fast")
