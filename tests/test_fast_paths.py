"""CPU correctness of the GPU fast paths: the fused nearest-code kernel (through Triton's interpreter),
the CPU dispatch of ``nearest_codes``, and the fast training step (bf16 autocast, fused Adam)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

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
    ids_ref, d_ref = nearest_codes(x, e, chunk=64, search="chunked")
    assert torch.equal(ids_auto, ids_ref) and torch.equal(d_auto, d_ref)
    brute = torch.cdist(x.double(), e.double()).pow(2)
    assert torch.equal(ids_auto, brute.argmin(1))


def test_fused_search_can_be_turned_off(monkeypatch):
    """``search="chunked"`` never takes the fused kernel, even where it could run (made to look so here)."""
    from spae.quantize import search

    monkeypatch.setattr(search, "fused_search_available", lambda x, e: True)
    x, e = torch.randn(4, 32), torch.randn(64, 32)
    assert search.fused_kernel("auto", x, e) == "persistent"
    assert search.fused_kernel("chunked", x, e) is None
    ids, _ = nearest_codes(x, e, search="chunked")  # the fused kernel would fail on CPU tensors
    assert torch.equal(ids, torch.cdist(x.double(), e.double()).argmin(1))


# ----------------------------------------------------------------------------- the fast training step


LOSS = LossConfig(semantic_layers=2, thresholds=(0.98, 0.95))


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    cfg = preset("tiny")
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
    tr = SPAETrainer(model, disc, LOSS, optim, "cpu", amp_dtype=amp, seed=0)
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


# ----------------------------------------------------------------------------- the sync-free step


def _reference_step(tr: SPAETrainer, images, pool_ids, pool_scores) -> dict[str, float]:
    """The step as it was before it went sync-free: floats, ``unique`` per layer, ``LeCAMEMA.update``
    through ``discriminator_total``, a host-side NaN check and a foreach Adam (``tr``'s optimizers)."""
    from spae.losses import (
        appearance_loss,
        discriminator_total,
        dynamic_weight,
        generator_gan_loss,
        reconstruction_loss,
        sample_semantic_targets,
        semantic_loss,
        spae_total,
    )
    from spae.training import learning_rate

    cfg, lcfg, step = tr.cfg, tr.loss_cfg, tr.step_count
    for g in tr.opt_g.param_groups:
        g["lr"] = learning_rate(step, cfg)
    for g in tr.opt_d.param_groups:
        g["lr"] = learning_rate(step, cfg, base=cfg.disc_lr)
    if step == 0:
        tr.core.match_latent_to_codebook(images)
    out = tr.model(images)
    recons = list(out.reconstructions.values())
    fake = torch.cat(recons, 0)
    terms = {
        "reconstruction": torch.stack([reconstruction_loss(out.target, r) for r in recons]).mean(),
        "commitment": out.quant.losses["commitment"].float(),
        "gan": generator_gan_loss(tr.disc(fake)),
    }
    l_app = appearance_loss(terms, lcfg)
    targets = sample_semantic_targets(
        pool_ids, pool_scores, lcfg.thresholds, tr.core.pyramid.token_counts, tr._generator()
    )
    l_sem = semantic_loss(
        out.quant.layer_inputs[: lcfg.semantic_layers], tr.core.codebook.embeddings, targets
    )
    total = spae_total(l_app, l_sem, lcfg.alpha, dynamic_weight(l_app, l_sem))
    tr.opt_g.zero_grad()
    total.backward()
    norm = torch.nn.utils.clip_grad_norm_(tr.core.parameters(), cfg.grad_clip)
    if torch.isfinite(total) and torch.isfinite(norm):
        tr.opt_g.step()
    b = images.shape[0]
    logits = tr.disc(torch.cat([out.target.detach(), fake.detach()], 0))
    d_loss = discriminator_total(logits[:b], logits[b:], tr.lecam, lcfg)
    tr.opt_d.zero_grad()
    d_loss.backward()
    d_norm = torch.nn.utils.clip_grad_norm_(tr.disc.parameters(), cfg.grad_clip)
    if torch.isfinite(d_loss) and torch.isfinite(d_norm):
        tr.opt_d.step()
    tr.step_count += 1
    m = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
    m.update(
        {
            "loss/total": float(total.detach()),
            "loss/semantic": float(l_sem.detach()),
            "grad_norm": float(norm),
        }
    )
    m.update({f"tokens/l{i + 1}": float(ids.unique().numel()) for i, ids in enumerate(out.quant.ids)})
    return m


def _foreach(tr: SPAETrainer) -> SPAETrainer:
    """``tr`` with the default (foreach, unfused) Adam: the NaN guard then checks on the host."""
    o = tr.cfg
    kw = {"betas": o.betas, "weight_decay": o.weight_decay, "foreach": True}
    tr.opt_g = torch.optim.Adam([p for p in tr.core.parameters() if p.requires_grad], lr=o.lr, **kw)
    tr.opt_d = torch.optim.Adam(tr.disc.parameters(), lr=o.disc_lr, **kw)
    return tr


def test_sync_free_step_equals_the_reference_step():
    model, disc, batch = _tiny()
    fast = _trainer(copy.deepcopy(model), copy.deepcopy(disc), None)
    assert all(o.defaults["fused"] for o in (fast.opt_g, fast.opt_d))  # the default, on the CPU too
    ref = _foreach(_trainer(copy.deepcopy(model), copy.deepcopy(disc), None))
    for _ in range(3):
        m_fast, m_ref = fast.step(*batch), _reference_step(ref, *batch)
        for key, value in m_ref.items():
            assert m_fast[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert _max_rel_param_gap(fast.core, ref.core) < 1e-4  # fused vs foreach Adam: rounding only
    assert _max_rel_param_gap(fast.disc, ref.disc) < 1e-4
    for k, v in fast.lecam.state_dict().items():  # the device-side EMA update == LeCAMEMA.update
        assert torch.allclose(v.float(), ref.lecam.state_dict()[k].float(), rtol=1e-4), k
    assert int(fast.lecam.num_updates) == 3


def test_step_metrics_stay_on_the_device_until_read_then_one_copy(monkeypatch):
    from spae.training import StepMetrics

    model, disc, batch = _tiny()
    tr = _trainer(model, disc, None)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    m = tr.step(*batch)
    assert isinstance(m, StepMetrics) and not m.resolved and not reads
    m["images_per_s"] = 12.5  # callers add keys without reading
    assert "loss/total" in m and "loss/gan" in m and "images_per_s" in m and not m.resolved
    as_dict = dict(m)  # every value, all at once
    assert m.resolved and len(reads) == 1 and reads[0] == (len(m) - 3,)  # lr, step, images_per_s: floats
    assert all(isinstance(v, float) for v in as_dict.values())
    assert as_dict["images_per_s"] == 12.5 and as_dict["step"] == 0.0 and as_dict["skipped"] == 0.0
    m.update({"eval/x": 1.0})
    assert m["eval/x"] == 1.0 and m["loss/total"] == as_dict["loss/total"] and len(reads) == 1
    assert list(m)[:2] == ["lr", "step"]  # insertion order kept


def test_step_itself_reads_nothing_from_the_device(monkeypatch):
    """No ``item`` / ``bool`` / ``float`` / ``int`` / ``tolist`` on a tensor during ``step`` except, at most,
    from spae/losses.py (eq. 7) and spae/quantize/ (the SAQ walk); today neither reads anything. A control
    read after the step proves the spy records."""
    import traceback

    model, disc, batch = _tiny()
    tr = _trainer(model, disc, None)
    tr.step(*batch)  # step 0 also fits the latent to the codebook (once per run)
    callers: list[str] = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapped(t, *a, **kw):
            callers.append(traceback.extract_stack(limit=2)[0].filename)
            return original(t, *a, **kw)

        return wrapped

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    tr.step(*batch)
    torch.zeros(()).item()  # the control read
    monkeypatch.undo()
    assert callers and callers[-1] == __file__, "the spy saw nothing: the check would pass vacuously"
    callers = callers[:-1]  # the step's own reads
    known = os.path.join("spae", "losses.py")
    quantize = os.path.join("spae", "quantize") + os.sep
    assert all(f.endswith(known) or quantize in f for f in callers), sorted(set(callers))
    from_losses = [f for f in callers if f.endswith(os.path.join("spae", "losses.py"))]
    assert len(from_losses) <= tr.loss_cfg.semantic_layers


def test_distinct_tokens_equals_unique():
    from spae.training import distinct_tokens

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 50, (3, 1, 1), generator=g), torch.randint(0, 50, (3, 4, 4), generator=g)]
    ids.append(torch.full((3, 4, 4), 7))  # one token only
    assert distinct_tokens(ids, 50).tolist() == [int(i.unique().numel()) for i in ids]
    assert distinct_tokens(ids, 50)[2] == 1


def test_nan_guard_skips_on_the_device_and_keeps_the_adam_step_count():
    model, disc, (images, ids, scores) = _tiny()
    tr = _trainer(model, disc, None)
    assert tr.opt_g.defaults["fused"]
    tr.step(images, ids, scores)
    weights = {k: v.clone() for k, v in tr.core.state_dict().items()}
    moments = {k: v.clone() for k, v in tr.opt_g.state[next(iter(tr.core.encoder.parameters()))].items()}
    poisoned = images.clone()
    poisoned[1, 2, 3, 4] = float("inf")
    m = tr.step(poisoned, ids, scores)
    assert m["skipped"] == 1.0 and m["skipped_steps"] == 1.0 and m["skipped_disc_steps"] == 1.0
    assert not torch.isfinite(torch.tensor(m["loss/total"]))
    for k, v in tr.core.state_dict().items():
        assert torch.equal(v, weights[k]), k
    state = tr.opt_g.state[next(iter(tr.core.encoder.parameters()))]
    for k, v in state.items():  # exp_avg, exp_avg_sq and the step counter (put back by the fused kernel)
        assert torch.equal(v, moments[k]), k
    assert float(state["step"]) == 1.0
    m = tr.step(images, ids, scores)
    assert m["skipped"] == 0.0 and m["skipped_steps"] == 1.0 and float(state["step"]) == 2.0
    assert tr.skipped_steps == 1 and tr.state_dict()["skipped_steps"] == 1


def test_compile_and_tf32_options():
    with pytest.raises(ValueError, match="optim.compile"):
        OptimConfig(compile="yes")
    with pytest.raises(ValueError, match="optim.tf32"):
        OptimConfig(tf32="maybe")
    cfg = OptimConfig()
    assert cfg.compile == "auto" and cfg.tf32 == "auto"
    assert cfg.enabled("compile", "cuda") and not cfg.enabled("compile", "cpu")
    assert cfg.enabled("tf32", "cuda:1") and not cfg.enabled("tf32", "cpu")
    assert OptimConfig(compile="on").enabled("compile", "cpu")
    assert not OptimConfig(compile="off").enabled("compile", "cuda")
    assert not cfg.enabled("channels_last", "cuda")  # off unless asked
    assert OptimConfig(channels_last="auto").enabled("channels_last", "cuda")  # compiled on CUDA
    assert not OptimConfig(channels_last="auto", compile="off").enabled("channels_last", "cuda")
    model, disc, _ = _tiny()
    tr = _trainer(model, disc, None)  # auto on the CPU: eager
    assert not tr.compiled and tr.core.encoder._compiled_call_impl is None


def test_channels_last_step_equals_the_default_layout_step():
    model, disc, batch = _tiny()
    ref = _trainer(copy.deepcopy(model), copy.deepcopy(disc), None)
    cl = SPAETrainer(
        copy.deepcopy(model),
        copy.deepcopy(disc),
        LOSS,
        OptimConfig(warmup_steps=1, channels_last="on"),
        "cpu",
        amp_dtype=None,
    )
    conv = next(p for p in cl.core.encoder.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for _ in range(2):
        m_ref, m_cl = ref.step(*batch), cl.step(*batch)
        for key in ("loss/total", "loss/reconstruction", "loss/semantic", "loss/disc"):
            assert m_cl[key] == pytest.approx(m_ref[key], rel=1e-4, abs=1e-6), key
    assert _max_rel_param_gap(cl.core, ref.core) < 1e-4


def test_compiled_step_traces_whole_modules_and_equals_the_eager_step(monkeypatch):
    """``OptimConfig(compile="on")`` compiles the encoder, decoder and discriminator in place. Inductor on
    this CPU takes minutes (over 5 measured on the 2-core machine), so dynamo runs here with the "eager"
    backend: it still captures each module's graph (no graph break allowed) and the step must equal
    the uncompiled one. The GPU run (bench/train_step.py) uses inductor."""
    import functools

    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model, disc, batch = _tiny()
    eager = _trainer(copy.deepcopy(model), copy.deepcopy(disc), None)
    optim = OptimConfig(warmup_steps=1, compile="on")
    comp = SPAETrainer(copy.deepcopy(model), copy.deepcopy(disc), LOSS, optim, "cpu", amp_dtype=None)
    assert comp.compiled and comp.core.encoder._compiled_call_impl is not None
    assert comp.disc._compiled_call_impl is not None
    assert list(comp.core.state_dict()) == list(eager.core.state_dict())  # checkpoints keep their keys
    for _ in range(2):
        m_eager, m_comp = eager.step(*batch), comp.step(*batch)
        for key in ("loss/total", "loss/reconstruction", "loss/gan", "loss/disc", "grad_norm"):
            assert m_comp[key] == pytest.approx(m_eager[key], rel=1e-4, abs=1e-6), key
    assert _max_rel_param_gap(comp.core, eager.core) < 1e-4
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 4  # encoder, decoder, D(fake) [2b], D(real, fake) [3b]
    torch._dynamo.reset()
