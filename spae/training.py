"""One SPAE optimisation step in plain PyTorch, shared by the Ray Train loop and local runs.

``SPAETrainer.step(images, pool_ids, pool_scores)`` does, in this order:

1. the generator step: the model on the batch, every covering prefix decoded; eq. 8 terms
   (pixel L2 averaged over prefixes, beta x commitment, lambda x GAN and eta x perceptual once on),
   eq. 7 on layers 1..D' with a target sampled per latent position from the pool candidates of
   eq. 4, the dynamic weight ``w = sg(L_app / L_sem)`` and eq. 9; backward, gradient clipping;
2. once ``step >= gan_start_step`` (and lambda > 0), a discriminator step: logistic loss on real
   images vs. the (detached) reconstructions + phi x LeCAM with its EMA anchors.

Both updates are guarded: a non-finite loss or gradient norm skips that update and counts it in
``skipped_steps`` (the weights, the optimizer moments and the LeCAM anchors stay as they were).
Under ``torch.distributed`` the decision is all-reduced so every rank skips together.

The trainer takes the module to call (``model`` may be a DDP wrapper around ``SPAE``) and finds the
bare ``SPAE`` behind it for the pyramid and the codebook. Targets for step ``s`` on rank ``r`` are
drawn from a generator seeded with ``(seed, r, s)``, so a resumed run samples what an uninterrupted
one would have.

Learning rate (section 4.1: "linear warmup/cooldown and root square decay"): linear warmup to
``lr`` over ``warmup_steps``, then ``lr * sqrt(warmup_steps / step)``, times a linear cooldown to 0
over the last ``cooldown_steps`` of ``total_steps``.

Adam betas: the paper names Adam only; we default to VQGAN's (0.5, 0.9) (taming-transformers), whose
GAN objective eq. 8 builds on: a low beta1 keeps the generator and discriminator from chasing
stale momentum once the adversarial terms switch on.

DDP: the generator's GAN term calls the bare discriminator (no DDP forward, so its gradients stay
local and are discarded before the discriminator step); the discriminator step makes ONE DDP
forward over ``cat([real, fake])`` so its gradients are all-reduced once. The LeCAM anchors are
updated from each rank's own logits; the checkpoint keeps rank 0's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from spae.losses import (
    LeCAMEMA,
    LossConfig,
    PerceptualLoss,
    appearance_loss,
    discriminator_loss,
    discriminator_total,
    dynamic_weight,
    generator_gan_loss,
    lecam_loss,
    reconstruction_loss,
    sample_semantic_targets,
    semantic_loss,
    spae_total,
)
from spae.model import SPAE


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # section 4.1
    disc_lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)  # VQGAN's; the paper names Adam only (see module docstring)
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    decay: Literal["rsqrt", "constant"] = "rsqrt"  # root-square decay after warmup, or none
    cooldown_steps: int = 0
    total_steps: int = 0  # 0 = the job's number of steps
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still checked)
    gan_start_step: int = 0  # the discriminator and the GAN term switch on at this step
    latent_init: bool = True  # step 0 of a fresh run: start z on the codebook (SPAE.match_latent_to_codebook)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.lr <= 0 or self.disc_lr <= 0:
            raise ValueError(f"optim.lr={self.lr} and optim.disc_lr={self.disc_lr} must be > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if min(self.warmup_steps, self.cooldown_steps, self.total_steps, self.gan_start_step) < 0:
            raise ValueError(
                "optim.warmup_steps, cooldown_steps, total_steps and gan_start_step must be >= 0"
            )
        if self.decay not in ("rsqrt", "constant"):
            raise ValueError(f"optim.decay={self.decay!r}; allowed: rsqrt, constant")
        if self.total_steps and self.cooldown_steps > self.total_steps:
            raise ValueError(
                f"optim.cooldown_steps={self.cooldown_steps} exceeds total_steps={self.total_steps}"
            )
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("optim.grad_clip and optim.weight_decay must be >= 0")


def learning_rate(step: int, cfg: OptimConfig, base: float | None = None) -> float:
    """The rate for the 0-indexed ``step`` about to be taken (``base`` defaults to ``cfg.lr``)."""
    lr = cfg.lr if base is None else base
    s = step + 1  # steps taken once this one is done
    warm = cfg.warmup_steps
    if warm and s <= warm:
        factor = s / warm  # linear warmup
    elif cfg.decay == "rsqrt" and warm:
        factor = math.sqrt(warm / s)  # root-square decay
    else:
        factor = 1.0
    if cfg.total_steps and cfg.cooldown_steps:
        left = cfg.total_steps - step  # steps left including this one
        factor *= min(1.0, max(0.0, left / cfg.cooldown_steps))  # linear cooldown to 0
    return lr * factor


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") else module  # DDP / FSDP-style wrappers


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (a no-op outside torch.distributed)."""
    if not _distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _finite(x: Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x)).all())


class SPAETrainer:
    """Owns the optimizers, the schedule, the LeCAM anchors and the counters of one training run."""

    def __init__(
        self,
        model: nn.Module,
        discriminator: nn.Module | None,
        loss_cfg: LossConfig,
        optim_cfg: OptimConfig,
        device: torch.device | str,
        amp_dtype: torch.dtype | None | Literal["auto"] = "auto",
        perceptual: PerceptualLoss | None = None,
        seed: int = 0,
        rank: int = 0,
    ):
        self.model = model
        self.core: SPAE = _unwrap(model)  # type: ignore[assignment]
        if not isinstance(self.core, SPAE):
            raise TypeError(
                f"SPAETrainer needs an SPAE (or a wrapper of one), got {type(self.core).__name__}"
            )
        self.disc = discriminator
        self.loss_cfg = loss_cfg
        self.cfg = optim_cfg
        self.device = torch.device(device)
        if amp_dtype == "auto":
            amp_dtype = torch.bfloat16 if self.device.type == "cuda" else None  # bf16 on GPU, fp32 on CPU
        self.amp_dtype = amp_dtype
        if loss_cfg.perceptual_enabled and perceptual is None:
            raise ValueError(
                f"loss.perceptual_weights={loss_cfg.perceptual_weights!r} turns the perceptual loss on; "
                "pass perceptual=PerceptualLoss(path)"
            )
        self.perceptual = perceptual if loss_cfg.perceptual_weight > 0 else None
        self.gan_on = loss_cfg.gan_weight > 0 and discriminator is not None
        self.seed, self.rank = int(seed), int(rank)
        self.opt_g = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad],
            lr=optim_cfg.lr,
            betas=optim_cfg.betas,
            weight_decay=optim_cfg.weight_decay,
            fused=self.device.type == "cuda",  # one kernel for all parameters (docs/BENCHMARKS.md)
        )
        self.opt_d = (
            torch.optim.Adam(
                discriminator.parameters(),
                lr=optim_cfg.disc_lr,
                betas=optim_cfg.betas,
                weight_decay=optim_cfg.weight_decay,
                fused=self.device.type == "cuda",
            )
            if discriminator is not None
            else None
        )
        self.lecam = LeCAMEMA(loss_cfg.lecam_ema_decay).to(self.device)
        self.step_count = 0  # steps attempted (the schedule position)
        self.skipped_steps = 0  # generator updates skipped by the NaN/inf guard
        self.skipped_disc_steps = 0

    # ------------------------------------------------------------------ the step

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _generator(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + self.rank * 7_919 + self.step_count) % (2**63))
        return g

    def step(self, images: Tensor, pool_ids: Tensor, pool_scores: Tensor) -> dict[str, float]:
        """images [b, 3, H, W] in [0, 1], pool_ids [b, k] codebook rows (-1 = padding), pool_scores [b, k]
        normalised eq. 6 scores -> every loss term, w, lr, |z| and distinct tokens per layer."""
        cfg, lcfg = self.cfg, self.loss_cfg
        step = self.step_count
        lr = learning_rate(step, cfg)
        for group in self.opt_g.param_groups:
            group["lr"] = lr
        if self.opt_d is not None:
            for group in self.opt_d.param_groups:
                group["lr"] = learning_rate(step, cfg, base=cfg.disc_lr)
        images = images.to(self.device, torch.float32)
        pool_ids = pool_ids.to(self.device)
        pool_scores = pool_scores.to(self.device, torch.float32)
        gan_active = self.gan_on and step >= cfg.gan_start_step
        if step == 0 and cfg.latent_init:
            self._match_latent(images)
        self.model.train()
        metrics: dict[str, float] = {"lr": lr, "step": float(step)}

        # ---- generator: eq. 7, 8, 9
        with self._autocast():
            out = self.model(images)
            recons = list(out.reconstructions.values())  # each [b, C, H, W] in [-1, 1]
            fake = torch.cat(recons, 0)  # [P * b, C, H, W]
            terms = {
                "reconstruction": torch.stack([reconstruction_loss(out.target, r) for r in recons]).mean(),
                "commitment": out.quant.commitment.float(),
            }
            if self.perceptual is not None:
                terms["perceptual"] = torch.stack([self.perceptual(out.target, r) for r in recons]).mean()
            if gan_active:
                terms["gan"] = generator_gan_loss(_unwrap(self.disc)(fake))  # no DDP sync: see module notes
            l_app = appearance_loss(terms, lcfg)  # eq. 8
            d_sem = lcfg.semantic_layers if lcfg.alpha > 0 else 0
            if d_sem:
                targets = sample_semantic_targets(
                    pool_ids, pool_scores, lcfg.thresholds, self.core.pyramid.token_counts, self._generator()
                )  # per layer l <= D': [b, n_l]
                l_sem = semantic_loss(
                    out.quant.layer_inputs[:d_sem],
                    self.core.codebook.embeddings,
                    targets,
                    lcfg.semantic_temperature,
                    self.core.cfg.quantizer.search_chunk,
                )  # eq. 7
                w = dynamic_weight(l_app, l_sem, lcfg.max_dynamic_weight) if lcfg.dynamic_weight else 1.0
                total = spae_total(l_app, l_sem, lcfg.alpha, w)  # eq. 9
            else:
                l_sem, w, total = torch.zeros((), device=self.device), 0.0, l_app
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()  # always: under DDP every rank must join the gradient all-reduce
        params = [p for g in self.opt_g.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        bad = not (_finite(total) and _finite(grad_norm))
        if _any_rank(bad, self.device):
            self.skipped_steps += 1
            self.opt_g.zero_grad(set_to_none=True)
            metrics["skipped"] = 1.0
        else:
            self.opt_g.step()
            metrics["skipped"] = 0.0

        # ---- discriminator: logistic loss + phi LeCAM
        if gan_active:
            metrics.update(self._disc_step(out.target.detach(), fake.detach(), images.shape[0]))

        with torch.no_grad():
            metrics.update({f"loss/{k}": float(v) for k, v in terms.items()})
            metrics["loss/appearance"] = float(l_app)
            metrics["loss/semantic"] = float(l_sem)
            metrics["loss/total"] = float(total)
            metrics["w"] = float(w)
            metrics["grad_norm"] = float(grad_norm)
            metrics["z_norm"] = float(out.z.detach().float().norm(dim=1).mean())  # mean |z| over positions
            for l, ids in enumerate(out.quant.ids, start=1):
                metrics[f"tokens/l{l}"] = float(ids.unique().numel())  # distinct tokens in the batch
        self.step_count += 1
        metrics["skipped_steps"] = float(self.skipped_steps)
        return metrics

    def _match_latent(self, images: Tensor) -> None:
        """Rank 0 fits the encoder's output layer to the codebook on its first batch; every rank copies it."""
        self.core.match_latent_to_codebook(images)
        if _distributed():
            conv = self.core.encoder.conv_out
            for p in (conv.weight, conv.bias):
                dist.broadcast(p.data, src=0)

    def _disc_step(self, real: Tensor, fake: Tensor, b: int) -> dict[str, float]:
        assert self.disc is not None and self.opt_d is not None
        anchors = {k: v.clone() for k, v in self.lecam.state_dict().items()}
        with self._autocast():
            logits = self.disc(torch.cat([real, fake], 0))  # one pass: DDP syncs once
            real_logits, fake_logits = logits[:b], logits[b:]
            loss = discriminator_total(real_logits, fake_logits, self.lecam, self.loss_cfg)  # updates the EMA
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(list(self.disc.parameters()), clip)
        if _any_rank(not (_finite(loss) and _finite(norm)), self.device):
            self.skipped_disc_steps += 1
            self.opt_d.zero_grad(set_to_none=True)
            self.lecam.load_state_dict(anchors)  # the anchors never see a poisoned batch
        else:
            self.opt_d.step()
        with torch.no_grad():
            return {
                "loss/disc": float(discriminator_loss(real_logits, fake_logits)),
                "loss/lecam": float(lecam_loss(real_logits, fake_logits, self.lecam)),
                "disc/real": float(real_logits.float().mean()),
                "disc/fake": float(fake_logits.float().mean()),
                "skipped_disc_steps": float(self.skipped_disc_steps),
            }

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (nested dicts of tensors and numbers; see spae.checkpoint)."""
        state: dict[str, Any] = {
            "model": self.core.state_dict(),
            "optimizer": self.opt_g.state_dict(),
            "lecam": self.lecam.state_dict(),
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "skipped_disc_steps": self.skipped_disc_steps,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": _python_state_to_json(random.getstate()),
                "numpy": _numpy_state(np.random.get_state()),
            },
        }
        if torch.cuda.is_available() and self.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.disc is not None and self.opt_d is not None:
            state["discriminator"] = _unwrap(self.disc).state_dict()
            state["disc_optimizer"] = self.opt_d.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing, unexpected = self.core.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if not k.startswith("quantizer.codebook.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
        self.opt_g.load_state_dict(state["optimizer"])
        self.lecam.load_state_dict({k: v.to(self.device) for k, v in state["lecam"].items()})
        if "discriminator" in state:
            if self.disc is None or self.opt_d is None:
                raise ValueError("the checkpoint has a discriminator but this trainer was built without one")
            _unwrap(self.disc).load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["disc_optimizer"])
        self.step_count = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.skipped_disc_steps = int(state.get("skipped_disc_steps", 0))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].to(torch.uint8))
        random.setstate(_python_state_from_json(rng["python"]))
        np.random.set_state(_numpy_state_back(rng["numpy"]))
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].to(torch.uint8), self.device)


def _python_state_to_json(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _python_state_from_json(d: dict[str, Any]) -> tuple:
    return (d["version"], tuple(int(v) for v in d["internal"]), d["gauss"])


def _numpy_state(state: tuple) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = state
    return {
        "kind": kind,
        "keys": np.asarray(keys),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": cached,
    }


def _numpy_state_back(d: dict[str, Any]) -> tuple:
    return (d["kind"], np.asarray(d["keys"], dtype=np.uint32), d["pos"], d["has_gauss"], d["cached"])
