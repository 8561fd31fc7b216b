"""One SPAE optimisation step in plain PyTorch, shared by the Ray Train loop and local runs.

``SPAETrainer.step(images, pool_ids, pool_scores)`` does, in this order:

1. the generator step: the model on the batch, every covering prefix decoded; eq. 8 terms
   (pixel L2 averaged over prefixes, every term of the quantizer's ``losses``: beta x commitment and,
   for a learned table, the codebook loss; lambda x GAN and eta x perceptual once on; each times its
   ``LossConfig.weights`` entry, a term without one is an error),
   eq. 7 on layers 1..D' with a target sampled per latent position from the pool candidates of
   eq. 4, the dynamic weight ``w = sg(L_app / L_sem)`` and eq. 9; backward, gradient clipping;
2. once ``step >= gan_start_step`` (and lambda > 0), a discriminator step: logistic loss on real
   images vs. the (detached) reconstructions + phi x LeCAM with its EMA anchors.

Both updates are guarded: a non-finite loss or gradient norm skips that update and counts it in
``skipped_steps`` (the weights, the optimizer moments and the LeCAM anchors stay as they were).
Under ``torch.distributed`` the decision is all-reduced so every rank skips together.

No host sync in the trainer (docs/BENCHMARKS.md, section 2): its own code never waits for the
device. The guard is a device flag handed to the fused Adam as ``found_inf`` (the kernel skips the
update and puts the step counter back, the way ``GradScaler`` uses it), the LeCAM anchors are
restored with ``torch.where``, the skip counters are device tensors, distinct tokens are counted
without ``unique``, and the metrics come back as ``StepMetrics``: tensors until the first read,
then ONE batched device -> host copy. A caller that reads the metrics only on log steps pays one
sync there. Eq. 7 (spae/losses.py) is masked means, with no data-dependent shapes, so no sync either.

Speed options (``OptimConfig``): ``compile`` (default: on for CUDA) compiles the encoder, the
decoder and the discriminator in place with ``torch.compile`` (one static graph per batch shape);
``tf32`` (default: on for CUDA) runs the fp32 matmuls of the step (eq. 7's softmax over the
codebook) on TF32 tensor cores; ``channels_last`` (default: off) stores the convolution weights and
the images channels-last.

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

import functools
import math
import random
from collections.abc import Iterator, MutableMapping
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
    check_semantic_layers,
    discriminator_loss,
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
    # torch.compile of the encoder, decoder and discriminator: "auto" = on CUDA, off on the CPU
    compile: Literal["auto", "on", "off"] = "auto"
    # No CUDA-graph modes ("reduce-overhead", "max-autotune"): the step calls the decoder once per
    # prefix, and a graph replay overwrites the previous prefix's output (docs/BENCHMARKS.md)
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    # TF32 tensor cores for fp32 matmuls (torch.set_float32_matmul_precision("high"), process-wide):
    # "auto" = on CUDA; "off" leaves the process setting as it is
    tf32: Literal["auto", "on", "off"] = "auto"
    # channels-last weights and images for the encoder, decoder and discriminator ("auto" = on CUDA
    # when compiled: eager GroupNorm is slower in channels-last, docs/BENCHMARKS.md)
    channels_last: Literal["auto", "on", "off"] = "off"

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
        for key, allowed in (
            ("compile", ("auto", "on", "off")),
            ("compile_mode", ("default", "max-autotune-no-cudagraphs")),
            ("tf32", ("auto", "on", "off")),
            ("channels_last", ("auto", "on", "off")),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"optim.{key}={getattr(self, key)!r}; allowed: {', '.join(allowed)}")

    def enabled(self, key: Literal["compile", "tf32", "channels_last"], device: torch.device | str) -> bool:
        """Whether the option ``key`` is on for ``device`` ("auto" = on CUDA only; for channels_last:
        on CUDA when compiled)."""
        value = getattr(self, key)
        auto = torch.device(device).type == "cuda"
        if key == "channels_last":
            auto = auto and self.enabled("compile", device)
        return value == "on" or (value == "auto" and auto)


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


@functools.cache
def _fused_adam_on_cpu() -> bool:
    """This torch has a CPU kernel for the fused Adam (2.4 and later)."""
    try:
        p = torch.nn.Parameter(torch.zeros(1))
        p.grad = torch.zeros(1)
        torch.optim.Adam([p], fused=True).step()
    except (RuntimeError, TypeError):
        return False
    return True


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _any_rank_(flag: Tensor) -> Tensor:
    """All-reduce a float flag with MAX in place (a no-op outside torch.distributed); no host sync."""
    if _distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def _nonfinite(*xs: Tensor) -> Tensor:
    """1.0 if any of ``xs`` holds a NaN/inf, else 0.0: a float32 device scalar (Adam's ``found_inf``)."""
    values = torch.cat([x.detach().float().reshape(-1) for x in xs])  # one check for all: few kernels
    return (~torch.isfinite(values)).any().float()


def _fused(opt: torch.optim.Optimizer) -> bool:
    return bool(opt.defaults.get("fused"))


def _guarded_step(opt: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """``opt.step()`` unless ``found_inf`` is 1. A fused Adam skips on the device (no sync): the kernel
    leaves weights and moments alone and the step counter is put back; other optimizers read the flag."""
    if _fused(opt):
        opt.found_inf = found_inf  # type: ignore[attr-defined]  # read by the fused kernel, as GradScaler sets it
        opt.step()
    elif not bool(found_inf):  # host sync: only for a non-fused optimizer
        opt.step()


def distinct_tokens(ids: list[Tensor], vocab: int) -> Tensor:
    """Distinct codebook rows per layer without ``unique`` (no host sync): ids per layer [b, ...] -> [L]."""
    offsets = [layer.reshape(-1) + l * vocab for l, layer in enumerate(ids)]  # layer l -> rows [l v, (l+1) v)
    seen = torch.zeros(len(ids) * vocab, dtype=torch.bool, device=ids[0].device)  # [L * v]
    seen.index_fill_(0, torch.cat(offsets), True)
    return seen.view(len(ids), vocab).sum(1)  # [L]


class StepMetrics(MutableMapping):
    """The metrics of one step, a ``dict[str, float]`` to its readers. Values stay device tensors until
    the first read; then ONE batched device -> host copy turns all of them into floats. Keys, ``in`` and
    ``len`` never touch the device; setting a key (``m["images_per_s"] = x``) works before or after."""

    def __init__(self, values: dict[str, Tensor | float]) -> None:
        self._raw = dict(values)
        self._host: dict[str, float] | None = None

    def _resolve(self) -> dict[str, float]:
        if self._host is None:
            host = {k: float(v) for k, v in self._raw.items() if not isinstance(v, Tensor)}
            by_device: dict[torch.device, list[str]] = {}
            for k, v in self._raw.items():
                if isinstance(v, Tensor):
                    by_device.setdefault(v.device, []).append(k)
            for keys in by_device.values():
                flat = torch.stack([self._raw[k].detach().reshape(()).double() for k in keys])  # [n]
                host.update(zip(keys, flat.cpu().tolist(), strict=True))  # the one sync
            self._host = {k: host[k] for k in self._raw}  # insertion order kept
        return self._host

    @property
    def resolved(self) -> bool:
        """True once the values have been copied to the host."""
        return self._host is not None

    def __getitem__(self, key: str) -> float:
        if key not in self._raw:
            raise KeyError(key)
        return self._resolve()[key]

    def __setitem__(self, key: str, value: Tensor | float) -> None:
        self._raw[key] = value
        if self._host is not None:
            if isinstance(value, Tensor):
                self._host = None  # read again (with the new tensor) on the next access
            else:
                self._host[key] = float(value)

    def __delitem__(self, key: str) -> None:
        del self._raw[key]
        if self._host is not None:
            del self._host[key]

    def __contains__(self, key: object) -> bool:
        return key in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"StepMetrics({self._resolve()!r})"


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
        check_semantic_layers(loss_cfg, self.core.pyramid.num_layers)
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
        fused = self.device.type == "cuda" or _fused_adam_on_cpu()  # one kernel for all parameters
        self.opt_g = torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad],
            lr=optim_cfg.lr,
            betas=optim_cfg.betas,
            weight_decay=optim_cfg.weight_decay,
            fused=fused,
        )
        self.opt_d = (
            torch.optim.Adam(
                discriminator.parameters(),
                lr=optim_cfg.disc_lr,
                betas=optim_cfg.betas,
                weight_decay=optim_cfg.weight_decay,
                fused=fused,
            )
            if discriminator is not None
            else None
        )
        self.lecam = LeCAMEMA(loss_cfg.lecam_ema_decay).to(self.device)
        self.step_count = 0  # steps attempted (the schedule position)
        self._skipped = torch.zeros((), dtype=torch.long, device=self.device)  # generator updates skipped
        self._skipped_disc = torch.zeros((), dtype=torch.long, device=self.device)
        if optim_cfg.enabled("tf32", self.device):
            torch.set_float32_matmul_precision("high")  # process-wide, as the train job sets it
        self.compiled = optim_cfg.enabled("compile", self.device)
        self.channels_last = optim_cfg.enabled("channels_last", self.device)
        modules = [self.core.encoder, self.core.decoder]
        modules += [_unwrap(discriminator)] if discriminator is not None else []
        if self.channels_last:
            for m in modules:
                m.to(memory_format=torch.channels_last)  # 4-d weights only; values unchanged
        if self.compiled:
            mode = None if optim_cfg.compile_mode == "default" else optim_cfg.compile_mode
            for m in modules:  # in place: parameter names and state dicts stay as they are
                m.compile(mode=mode, dynamic=False)  # one graph per batch shape (the GAN term and D's step)

    # ------------------------------------------------------------------ counters (device tensors)

    @property
    def skipped_steps(self) -> int:
        """Generator updates skipped by the NaN/inf guard (reading it syncs with the device)."""
        return int(self._skipped)

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped = torch.tensor(int(value), dtype=torch.long, device=self.device)

    @property
    def skipped_disc_steps(self) -> int:
        return int(self._skipped_disc)

    @skipped_disc_steps.setter
    def skipped_disc_steps(self, value: int) -> None:
        self._skipped_disc = torch.tensor(int(value), dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ the step

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _generator(self) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + self.rank * 7_919 + self.step_count) % (2**63))
        return g

    def step(self, images: Tensor, pool_ids: Tensor, pool_scores: Tensor) -> StepMetrics:
        """images [b, 3, H, W] in [0, 1], pool_ids [b, k] codebook rows (-1 = padding), pool_scores [b, k]
        normalised eq. 6 scores -> every loss term, w, lr, |z| and distinct tokens per layer.

        Never waits for the device: the metrics are read (one batched copy) when first accessed."""
        cfg, lcfg = self.cfg, self.loss_cfg
        step = self.step_count
        lr = learning_rate(step, cfg)
        for group in self.opt_g.param_groups:
            group["lr"] = lr
        if self.opt_d is not None:
            for group in self.opt_d.param_groups:
                group["lr"] = learning_rate(step, cfg, base=cfg.disc_lr)
        images = images.to(self.device, torch.float32, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        pool_ids = pool_ids.to(self.device, non_blocking=True)
        pool_scores = pool_scores.to(self.device, torch.float32, non_blocking=True)
        gan_active = self.gan_on and step >= cfg.gan_start_step
        if step == 0 and cfg.latent_init:
            self._match_latent(images)
        self.model.train()
        metrics: dict[str, Tensor | float] = {"lr": lr, "step": float(step)}

        # ---- generator: eq. 7, 8, 9
        with self._autocast():
            out = self.model(images)
            recons = list(out.reconstructions.values())  # each [b, C, H, W] in [-1, 1]
            fake = torch.cat(recons, 0)  # [P * b, C, H, W]
            terms = {
                "reconstruction": torch.stack([reconstruction_loss(out.target, r) for r in recons]).mean(),
                # every term the quantizer brings: commitment, and codebook for a learned table
                **{name: loss.float() for name, loss in out.quant.losses.items()},
            }
            if self.perceptual is not None:
                terms["perceptual"] = self.perceptual.mean_distance(out.target, recons)
            if gan_active:
                terms["gan"] = generator_gan_loss(_unwrap(self.disc)(fake))  # no DDP sync: see module notes
            l_app = appearance_loss(terms, lcfg)  # eq. 8
            d_sem = lcfg.semantic_layers if lcfg.alpha > 0 else 0
            if d_sem:
                targets = sample_semantic_targets(
                    pool_ids,
                    pool_scores,
                    lcfg.thresholds,
                    self.core.pyramid.token_counts,
                    self._generator(),
                    lcfg.semantic_targets,
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
        bad = _any_rank_(_nonfinite(total, grad_norm))  # [] 1.0 = skip on every rank
        _guarded_step(self.opt_g, bad)
        self._skipped = self._skipped + bad.long()  # out of place: earlier metrics keep their value
        metrics["skipped"] = bad

        # ---- discriminator: logistic loss + phi LeCAM
        if gan_active:
            metrics.update(self._disc_step(out.target.detach(), fake.detach(), images.shape[0]))

        with torch.no_grad():
            metrics.update({f"loss/{k}": v.detach() for k, v in terms.items()})
            metrics["loss/appearance"] = l_app.detach()
            metrics["loss/semantic"] = l_sem.detach()
            metrics["loss/total"] = total.detach()
            metrics["w"] = w.detach() if isinstance(w, Tensor) else float(w)
            metrics["grad_norm"] = grad_norm.detach()
            metrics["z_norm"] = out.z.detach().float().norm(dim=1).mean()  # mean |z| over positions
            tokens = distinct_tokens(out.quant.ids, self.core.quantizer.num_codes)  # [L], in the batch
            for l in range(len(out.quant.ids)):
                metrics[f"tokens/l{l + 1}"] = tokens[l]
        self.step_count += 1
        metrics["skipped_steps"] = self._skipped
        return StepMetrics(metrics)

    def _match_latent(self, images: Tensor) -> None:
        """Rank 0 fits the encoder's output layer to the codebook on its first batch; every rank copies it."""
        self.core.match_latent_to_codebook(images)
        if _distributed():
            conv = self.core.encoder.conv_out
            for p in (conv.weight, conv.bias):
                dist.broadcast(p.data, src=0)

    def _disc_step(self, real: Tensor, fake: Tensor, b: int) -> dict[str, Tensor]:
        assert self.disc is not None and self.opt_d is not None
        anchors = {k: v.clone() for k, v in self.lecam.state_dict().items()}
        with self._autocast():
            logits = self.disc(torch.cat([real, fake], 0))  # one pass: DDP syncs once
            real_logits, fake_logits = logits[:b], logits[b:]
            self.lecam.update(real_logits, fake_logits)  # the EMA anchors first
            d_loss = discriminator_loss(real_logits, fake_logits)
            lecam = lecam_loss(real_logits, fake_logits, self.lecam)
            loss = d_loss + self.loss_cfg.lecam_weight * lecam  # + phi L_LeCAM
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(list(self.disc.parameters()), clip)
        bad = _any_rank_(_nonfinite(loss, norm))
        _guarded_step(self.opt_d, bad)
        with torch.no_grad():
            for k, v in self.lecam.state_dict().items():  # the anchors never see a poisoned batch
                v.copy_(torch.where(bad > 0, anchors[k], v))
        self._skipped_disc = self._skipped_disc + bad.long()
        return {
            "loss/disc": d_loss.detach(),
            "loss/lecam": lecam.detach(),
            "disc/real": real_logits.detach().float().mean(),
            "disc/fake": fake_logits.detach().float().mean(),
            "skipped_disc_steps": self._skipped_disc,
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
