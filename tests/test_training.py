import math
from dataclasses import replace

import pytest
import torch

from spae.checkpoint import load_train_state, save_train_state
from spae.codebook import FrozenCodebook
from spae.config import to_dict
from spae.losses import LossConfig
from spae.model import SPAE, SPAEConfig
from spae.networks import Discriminator, NetworkConfig
from spae.pyramid import PyramidConfig
from spae.quantize import KINDS, QuantizerConfig, QuantizerKind, lookup_latent, register_kind
from spae.training import OptimConfig, SPAETrainer, _nonfinite, learning_rate

V, C, K = 64, 16, 6  # codebook rows, dim, pool size


def tiny_config() -> SPAEConfig:
    return SPAEConfig(
        image_size=16,
        pyramid=PyramidConfig(latent_size=(4, 4), layer_sizes=((1, 1), (2, 2), (4, 4), (4, 4))),
        network=NetworkConfig.preset("tiny", latent_dim=C, channel_multipliers=(1, 2, 2)),
    )


def tiny_loss(gan_weight: float = 0.1, alpha: float = 1.0) -> LossConfig:
    return LossConfig(
        alpha=alpha,
        semantic_layers=2,
        thresholds=(0.9, 0.5),
        gan_weight=gan_weight,
        perceptual_weight=0.0,
    )


def make_trainer(seed: int = 0, gan_start: int = 0, **optim) -> SPAETrainer:
    torch.manual_seed(seed)
    cfg = tiny_config()
    codebook = FrozenCodebook.from_tensor(torch.randn(V, C, generator=torch.Generator().manual_seed(1)))
    model = SPAE(cfg, codebook)
    disc = Discriminator(cfg.network, cfg.image_channels, cfg.image_size)
    ocfg = OptimConfig(
        **{"lr": 2e-3, "disc_lr": 1e-3, "warmup_steps": 0, "gan_start_step": gan_start, **optim}
    )
    return SPAETrainer(model, disc, tiny_loss(), ocfg, "cpu", seed=seed)


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    phase = torch.rand(n, 1, 1, generator=g) * 6.28
    images = (0.5 + 0.5 * torch.sin(xx / 3 + phase)).unsqueeze(1).expand(n, 3, 16, 16).contiguous()
    pool_ids = torch.randint(0, V, (n, K), generator=g)
    pool_scores = torch.linspace(1.0, 0.3, K).expand(n, K).contiguous()
    return images, pool_ids, pool_scores


def test_schedule_hand_values():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, cooldown_steps=20, total_steps=100)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)  # 1/10 of the way up
    assert learning_rate(4, cfg) == pytest.approx(5e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)  # warmup done
    assert learning_rate(39, cfg) == pytest.approx(1e-3 * math.sqrt(10 / 40))  # root-square decay
    # cooldown: the last 20 steps scale linearly to 0 (step 90: 10 steps left incl. this one)
    assert learning_rate(89, cfg) == pytest.approx(1e-3 * math.sqrt(10 / 90) * 11 / 20)
    assert learning_rate(99, cfg) == pytest.approx(1e-3 * math.sqrt(10 / 100) * 1 / 20)
    assert learning_rate(100, cfg) == 0.0
    flat = OptimConfig(lr=1e-3, warmup_steps=0, decay="rsqrt")
    assert learning_rate(500, flat) == pytest.approx(1e-3)  # no warmup -> no reference for the decay
    assert learning_rate(7, cfg, base=2e-3) == pytest.approx(2 * learning_rate(7, cfg))
    with pytest.raises(ValueError, match="betas"):
        OptimConfig(betas=(0.5, 1.5))


def test_loss_falls_and_all_terms_reported():
    trainer = make_trainer(gan_start=20)
    images, ids, scores = batch()
    history = [trainer.step(images, ids, scores) for _ in range(30)]
    first, last = history[0], history[-1]
    assert last["loss/reconstruction"] < 0.5 * first["loss/reconstruction"]
    assert last["loss/total"] < 0.5 * first["loss/total"]
    # eq. 9's dynamic weight: w = sg(L_app / L_sem) at every step (no cap configured)
    for m in (first, last):
        assert m["w"] == pytest.approx(m["loss/appearance"] / m["loss/semantic"], rel=1e-5)
        assert m["loss/total"] == pytest.approx(m["loss/appearance"] + m["w"] * m["loss/semantic"], rel=1e-5)
    for key in (
        "loss/total",
        "loss/appearance",
        "loss/commitment",
        "w",
        "lr",
        "z_norm",
        "tokens/l1",
        "tokens/l4",
    ):
        assert key in last and math.isfinite(last[key])
    assert "loss/gan" not in history[19] and "loss/gan" in history[20]  # GAN on at gan_start_step
    assert "loss/disc" in last and "loss/lecam" in last
    assert last["tokens/l1"] <= 8 and 1 <= last["tokens/l3"] <= 8 * 16
    assert last["skipped_steps"] == 0 and trainer.step_count == 30


def test_nan_guard_skips_the_update():
    trainer = make_trainer()
    images, ids, scores = batch()
    trainer.step(images, ids, scores)
    before = {k: v.clone() for k, v in trainer.core.state_dict().items()}
    disc_before = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    anchors = {k: v.clone() for k, v in trainer.lecam.state_dict().items()}
    poisoned = images.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    out = trainer.step(poisoned, ids, scores)
    assert out["skipped"] == 1.0 and trainer.skipped_steps == 1 and trainer.skipped_disc_steps == 1
    for k, v in trainer.core.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in trainer.disc.state_dict().items():
        assert torch.equal(v, disc_before[k]), k
    for k, v in trainer.lecam.state_dict().items():
        assert torch.equal(v, anchors[k]), k
    after = trainer.step(images, ids, scores)  # training goes on with finite weights
    assert after["skipped"] == 0.0 and math.isfinite(after["loss/total"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_flag_over_all_inputs():
    ok, vec = torch.tensor(1.5), torch.tensor([0.0, 2.0])
    assert _nonfinite(ok, vec).item() == 0.0 and _nonfinite(ok, vec).dtype == torch.float32
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert _nonfinite(ok, torch.tensor([0.0, bad])).item() == 1.0
        assert _nonfinite(torch.tensor(bad), vec).item() == 1.0


def test_state_round_trip_gives_identical_next_step(tmp_path):
    a = make_trainer(seed=3)
    images, ids, scores = batch()
    for _ in range(3):
        a.step(images, ids, scores)
    save_train_state(tmp_path / "ckpt", a.state_dict(), {"model": to_dict(a.core.cfg)})
    state, config = load_train_state(tmp_path / "ckpt")
    assert config["model"]["image_size"] == 16
    assert isinstance(state["optimizer"]["state"], dict) and 0 in state["optimizer"]["state"]  # int keys kept
    b = make_trainer(seed=3)  # fresh weights, same seed (the seed enters the target sampling)
    b.step(*batch(seed=9))  # diverge first, so the load really has to restore everything
    b.load_state_dict(state)
    assert b.step_count == 3
    out_a, out_b = a.step(images, ids, scores), b.step(images, ids, scores)
    assert out_a == out_b
    for (ka, va), (kb, vb) in zip(a.core.state_dict().items(), b.core.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    assert a.state_dict()["rng"]["torch"].equal(b.state_dict()["rng"]["torch"])


def test_semantic_loss_off_without_alpha():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = SPAE(cfg, FrozenCodebook.from_tensor(torch.randn(V, C)))
    trainer = SPAETrainer(
        model, None, tiny_loss(gan_weight=0.0, alpha=0.0), OptimConfig(warmup_steps=0), "cpu"
    )
    out = trainer.step(*batch())
    assert out["loss/semantic"] == 0.0 and out["w"] == 0.0
    assert out["loss/total"] == pytest.approx(out["loss/appearance"])
    assert "loss/disc" not in out


def _poisoned_rank_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    trainer = make_trainer()  # the same weights on both ranks
    images, ids, scores = batch(seed=rank)
    trainer.step(images, ids, scores)
    before = [p.detach().clone() for p in trainer.core.parameters()]
    if rank == 1:
        images = images.clone()
        images[0, 0, 0, 0] = float("nan")  # only rank 1 sees a poisoned batch
    m = trainer.step(images, ids, scores)
    unchanged = all(torch.equal(p, q) for p, q in zip(trainer.core.parameters(), before, strict=True))
    torch.save(
        {"skipped": m["skipped"], "unchanged": unchanged, "count": trainer.skipped_steps}, f"{out}.{rank}"
    )
    dist.destroy_process_group()


def test_nan_guard_skips_on_every_rank_when_one_rank_is_poisoned(tmp_path):
    """The device flag is all-reduced (MAX) without a host read: rank 0's clean batch is skipped too."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank")
    mp.start_processes(_poisoned_rank_worker, args=(port, out), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        r = torch.load(f"{out}.{rank}")
        assert r == {"skipped": 1.0, "unchanged": True, "count": 1}, (rank, r)


def test_the_vq_baselines_codebook_learns():
    """The learned table of the ``vq`` baseline gets the codebook loss ||sg(z) - e||^2: its rows move and the
    loss falls; frozen codebooks have no such term."""
    torch.manual_seed(0)
    cfg = replace(tiny_config(), quantizer=QuantizerConfig(kind="vq", vq_codebook_size=32))
    model = SPAE(
        cfg, FrozenCodebook.from_tensor(torch.randn(V, C, generator=torch.Generator().manual_seed(1)))
    )
    lcfg = tiny_loss(gan_weight=0.0, alpha=0.0)
    trainer = SPAETrainer(model, None, lcfg, OptimConfig(lr=2e-3, warmup_steps=0), "cpu", seed=0)
    table = model.quantizer.embedding.weight
    before = table.detach().clone()
    images, ids, scores = batch()
    history = [trainer.step(images, ids, scores) for _ in range(25)]
    assert history[-1]["loss/codebook"] < 0.5 * history[0]["loss/codebook"]
    moved = (table.detach() - before).norm(dim=1)
    assert (moved > 0).sum() >= 1 and moved.max() > 1e-3
    frozen = make_trainer().step(*batch())
    assert "loss/codebook" not in frozen


@pytest.fixture
def residual_learned_kind():
    """A test-only quantizer kind, registered for one test: the residual walk over a learned table."""
    kind = register_kind(QuantizerKind("rvq-test", "residual", "learned"))
    yield kind
    del KINDS[kind.name]  # the registry as it was


def test_a_kind_added_as_one_registry_entry_trains(residual_learned_kind):
    """Adding a kind is one registry entry: an SPAE with it builds, and the trainer sums its codebook term
    (weight ``LossConfig.codebook_weight``) so the learned table moves."""
    torch.manual_seed(0)
    cfg = replace(
        tiny_config(), quantizer=QuantizerConfig(kind=residual_learned_kind.name, vq_codebook_size=32)
    )
    model = SPAE(
        cfg, FrozenCodebook.from_tensor(torch.randn(V, C, generator=torch.Generator().manual_seed(1)))
    )
    assert model.quantizer.kind == residual_learned_kind
    lcfg = tiny_loss(gan_weight=0.0, alpha=0.0)
    trainer = SPAETrainer(model, None, lcfg, OptimConfig(lr=2e-3, warmup_steps=0), "cpu", seed=0)
    table = model.quantizer.embedding.weight
    before = table.detach().clone()
    history = [trainer.step(*batch()) for _ in range(4)]
    assert all(math.isfinite(m["loss/codebook"]) and m["skipped"] == 0.0 for m in history)
    assert (table.detach() - before).norm(dim=1).max() > 1e-4
    assert all(int(ids.max()) < 32 for ids in model(batch()[0]).quant.ids)
    # the residual target: Ẑ<=l is the sum of the chosen rows (the average kinds divide by the count)
    ids = model.quantizer.encode_ids(model.encode_latent(batch()[0]))
    l = model.pyramid.covering_layers[-1]
    torch.testing.assert_close(
        model.quantizer.lookup(ids, l), lookup_latent(ids, table.detach(), model.pyramid, l, average=False)
    )


def test_a_loss_term_without_a_weight_is_an_error_not_dropped(monkeypatch):
    """Every term of ``QuantizerOutput.losses`` reaches the total; one the loss config has no weight for
    stops the step with its name."""
    trainer = make_trainer()
    forward = trainer.core.quantizer.forward

    def with_extra_term(z):
        out = forward(z)
        out.losses["entropy"] = out.losses["commitment"] * 0
        return out

    monkeypatch.setattr(trainer.core.quantizer, "forward", with_extra_term)
    with pytest.raises(KeyError, match=r"\['entropy'\] have no weight in the loss config"):
        trainer.step(*batch())


def test_semantic_layers_beyond_the_pyramid_are_refused_by_the_trainer():
    model = SPAE(tiny_config(), FrozenCodebook.from_tensor(torch.randn(V, C)))
    lcfg = LossConfig(semantic_layers=5, thresholds=(0.9, 0.8, 0.7, 0.6, 0.5))
    with pytest.raises(ValueError, match="loss.semantic_layers=5 exceeds the pyramid's 4 layers"):
        SPAETrainer(model, None, lcfg, OptimConfig(), "cpu")
