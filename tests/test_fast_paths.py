"""CPU correctness of the GPU fast paths: the fused nearest-code kernel (through Triton's interpreter),
the CPU dispatch of ``nearest_codes``, and the fast training step (bf16 autocast, fused Adam)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from spae.codebook import FrozenCodebook
from spae.losses import LossConfig
from spae.model import SPAE, preset
from spae.networks import Discriminator
from spae.quantize import fused_search_available, nearest_codes
from spae.training import OptimConfig, SPAETrainer

triton = pytest.importorskip("triton", reason="the fused search kernel is written in Triton")

KERNEL_CHECK = textwrap.dedent(
    """
    import torch
    from spae.quantize import fused_nearest_codes

    torch.manual_seed(0)
    for n, v, c, block in [(70, 700, 64, (32, 64)), (5, 130, 96, (16, 32))]:
        # small integers: every dot product and norm is exact in fp16/fp32, so ties are real ties
        x = torch.randint(-3, 4, (n, c)).to(torch.float16)
        e = torch.randint(-3, 4, (v, c)).to(torch.float16)
        e[v - 1] = e[3]  # a duplicate row in another tile and another split: row 3 must win
        x[0] = e[3]
        sq = e.float().pow(2).sum(1)
        d, ids = fused_nearest_codes(x, e, sq, block=block)
        dist = sq[None, :] - 2.0 * x.double() @ e.double().T  # [n, v], exact
        ref_d = dist.min(1).values
        ref_i = torch.where(dist == ref_d[:, None], torch.arange(v), v).min(1).values  # lowest row of ties
        assert ids.dtype == torch.int64 and d.dtype == torch.float32
        assert torch.equal(ids, ref_i), (ids, ref_i)
        assert torch.equal(d.double(), ref_d), (d, ref_d)
        assert ids[0] == 3
    print("fused kernel ok")
    """
)


def test_fused_kernel_matches_exact_argmin_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fused kernel ok" in out.stdout


def test_cpu_search_never_takes_the_fused_kernel():
    x, e = torch.randn(40, 32), torch.randn(300, 32)
    assert not fused_search_available(x, e)
    assert not fused_search_available(x.bfloat16(), e.bfloat16())  # bf16, but on the CPU
    ids_auto, d_auto = nearest_codes(x, e, chunk=64)
    ids_ref, d_ref = nearest_codes(x, e, chunk=64, fused=False)
    assert torch.equal(ids_auto, ids_ref) and torch.equal(d_auto, d_ref)
    brute = torch.cdist(x.double(), e.double()).pow(2)
    assert torch.equal(ids_auto, brute.argmin(1))


def test_fused_search_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SPAE_FUSED_SEARCH", "0")
    x, e = torch.randn(4, 32), torch.randn(64, 32)
    assert not fused_search_available(x, e)


# ----------------------------------------------------------------------------- the fast training step


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    cfg = replace(preset("tiny"), loss=LossConfig(semantic_layers=2, thresholds=(0.98, 0.95)))
    v, c = 128, cfg.network.latent_dim
    emb = torch.nn.functional.normalize(torch.randn(v, c), dim=1)
    words = [f"w{i}" for i in range(v)]
    model = SPAE(cfg, FrozenCodebook(emb, words, words, list(range(v)), {"source": "random"}))
    disc = Discriminator(cfg.network, cfg.image_channels, cfg.image_size)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, cfg.image_size, cfg.image_size, generator=g)
    model.match_latent_to_codebook(images)
    pool_ids = torch.randint(0, v, (4, 8), generator=g)
    pool_scores = torch.sort(torch.rand(4, 8, generator=g), dim=1, descending=True).values
    pool_scores[:, 0] = 1.0
    return model, disc, (images, pool_ids, pool_scores)


def _trainer(model, disc, amp, fused_adam=False):
    optim = OptimConfig(warmup_steps=1)
    tr = SPAETrainer(model, disc, model.cfg.loss, optim, "cpu", amp_dtype=amp, seed=0)
    if fused_adam:
        kw = {"betas": optim.betas, "weight_decay": optim.weight_decay, "fused": True}
        tr.opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=optim.lr, **kw)
        tr.opt_d = torch.optim.Adam(disc.parameters(), lr=optim.disc_lr, **kw)
    return tr


def _max_rel_param_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        float((p - q).detach().norm() / q.detach().norm().clamp_min(1e-12))
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def _update(after: torch.nn.Module, before: torch.nn.Module) -> torch.Tensor:
    return torch.cat(
        [(p - q).detach().flatten() for p, q in zip(after.parameters(), before.parameters(), strict=True)]
    )


def test_bf16_autocast_step_matches_the_fp32_step():
    model, disc, batch = _tiny()
    ref = _trainer(copy.deepcopy(model), copy.deepcopy(disc), None)
    fast = _trainer(copy.deepcopy(model), copy.deepcopy(disc), torch.bfloat16)
    for _ in range(2):
        m_ref, m_fast = ref.step(*batch), fast.step(*batch)
        assert m_fast["skipped"] == 0.0
        for key in ("loss/reconstruction", "loss/commitment", "loss/semantic", "loss/gan", "loss/total"):
            assert m_fast[key] == pytest.approx(m_ref[key], rel=3e-2, abs=1e-3), key
    # Adam's first steps move each weight by ~lr x sign(grad): the two runs must move the same way
    u_ref, u_fast = _update(ref.core, model), _update(fast.core, model)
    assert (
        torch.nn.functional.cosine_similarity(u_ref, u_fast, dim=0) > 0.75
    )  # ~0.9 measured; unrelated updates give ~0
    assert u_fast.abs().max() > 0


def test_fused_adam_step_equals_the_foreach_step():
    model, disc, batch = _tiny()
    ref = _trainer(copy.deepcopy(model), copy.deepcopy(disc), None)
    fused = _trainer(copy.deepcopy(model), copy.deepcopy(disc), None, fused_adam=True)
    for _ in range(2):
        m_ref, m_fused = ref.step(*batch), fused.step(*batch)
        assert m_fused["loss/total"] == pytest.approx(m_ref["loss/total"], rel=1e-5)
    assert _max_rel_param_gap(fused.core, ref.core) < 1e-5
    assert _max_rel_param_gap(fused.disc, ref.disc) < 1e-5
    assert _max_rel_param_gap(fused.core, model) > 0
