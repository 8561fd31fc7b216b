"""The training job: SPAE on Ray Train (``TorchTrainer``, Train V2), checkpoints, resume, MLflow.

::

    images source shards ──(read + decode + join the pools part of the same shard, Ray Data tasks)──┐
                                                                                                    v
    ray.train.get_dataset_shard("train") per worker -> SPAETrainer.step (DDP via prepare_model)
        rank 0: MLflow (params, every loss term, w, eval metrics, the picture, checkpoints),
                checkpoints (safetensors + JSON) to the run storage (local or S3) every N steps,
                the final tokenizer (save_pretrained) to storage and as an MLflow model

Join: images and pools are joined per input shard (the pools job writes one part per input shard
of the same listing; ``pipeline.outputs.contracts.PoolsManifest`` refuses another listing). Ray Data's
``Dataset.join`` needs the ``polars`` package (not a dependency) and a hash shuffle whose actors
compete with the training workers for CPUs; the shard-aligned join needs neither.

Clips: a video model (``model.num_frames > 0``, presets ``tiny3d``, ``moving-mnist``, ``kinetics``)
reads clips of ``num_frames`` frames (``DecodeOptions.for_model``) for training and evaluation,
with the same pools, codebook and trainer; its discriminator is ``spae.networks3d.Discriminator3D``,
the perceptual loss and the evaluation's PSNR/SSIM are taken per frame.

Codebook: the rows the pools refer to, read from the vocab table (``load_vocab(...).codebook()``
checks the card's hash); a pools table computed against another vocab table is refused.

Resume: a job started again with the same ``name`` and ``storage`` continues from the latest
checkpoint (``ray.train.get_checkpoint()``) at the same step, and continues the MLflow run of the
same name. A worker failure (``FailureConfig(max_failures)``) restarts the worker group from the
latest checkpoint the same way. Re-running a finished job trains nothing and logs no second tokenizer
model (one per run and fingerprint). The data stream restarts from the beginning of an epoch; the
semantic targets of step s are seeded by (seed, rank, s) and do not depend on it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline.inputs.images import DecodeOptions
from pipeline.inputs.sources import Shard, SourceConfig, list_shards
from pipeline.outputs.contracts import PoolsManifest, VocabCard, check_pools_cover
from pipeline.runtime.progress import BoardPoster, follow, start_board
from pipeline.runtime.ray_utils import RayConfig
from pipeline.runtime.storage import ray_storage, resolve
from pipeline.runtime.tracking import (
    MlflowConfig,
    find_run_id,
    log_params_flat,
    resolve_tracking_uri,
    start_run,
)
from pipeline.steps.evaluator import (
    EvalData,
    check_source_kind,
    class_token_rows,
    class_words,
    evaluate_tokenizer,
    join_on_image_id,
    list_matrix,
    load_eval_data,
    picture,
    read_pools_part,
    shard_pixels,
)
from pipeline.steps.vocab import load_vocab
from spae.augment import AugmentConfig, augment, augment_preset, step_generator
from spae.checkpoint import load_train_state, save_train_state
from spae.config import from_dict, to_dict
from spae.losses import LossConfig, PerceptualLoss, check_semantic_layers, loss_preset
from spae.model import SPAE, SPAEConfig, preset
from spae.networks import Discriminator
from spae.networks3d import Discriminator3D
from spae.tokenizer import CONFIG_JSON, SPAETokenizer
from spae.training import OptimConfig, SPAETrainer

TRAIN_STATE = "train_state"  # checkpoint sub-folder (spae.checkpoint)
HISTORY = "history.json"  # (step, total loss) per logged step, carried across restarts
TOKENIZER = "tokenizer"  # final save_pretrained folder under <storage>/<name>/ and the MLflow model name
FAIL_MARKER = "_fail_at_step_done"
PROGRESS_FIELDS = {"loss/total": "loss", "images_per_s": "img/s"}  # metric -> its name beside the bar
FINGERPRINT_TAG = "spae.tokenizer_fingerprint"  # the tokenizer model last logged in the run


@dataclass(frozen=True)
class TrainDataConfig:
    images: SourceConfig = field(default_factory=lambda: SourceConfig(uri="mnist://train"))
    pools: str = "outputs/pools-train"  # pools table of ``images`` (spae pools)
    vocab: str = "outputs/vocab"  # the vocab table the pools refer to (spae vocab): the codebook
    eval: SourceConfig = field(default_factory=lambda: SourceConfig(uri="mnist://test"))
    eval_pools: str = ""  # pools of ``eval`` (semantic relevance during training); "" = skip
    fit: Literal["auto", "crop", "pad"] = "auto"
    shuffle_buffer: int = 1024  # rows of the local shuffle buffer per worker (0 = no shuffle)

    def __post_init__(self) -> None:
        if not self.pools or not self.vocab:
            raise ValueError("data.pools and data.vocab must name the pools and vocab tables")
        if self.shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")


@dataclass(frozen=True)
class TrainJobConfig:
    preset: str = "mnist"  # defaults of ``model`` (spae.model.preset); resolved by the job entry
    model: SPAEConfig = field(default_factory=SPAEConfig)
    loss: LossConfig = field(default_factory=lambda: loss_preset("mnist"))  # the preset's (preset_base)
    # shifts of each training batch (spae.augment), seeded by (seed, rank, step); the preset's (preset_base)
    augment: AugmentConfig = field(default_factory=lambda: augment_preset("mnist"))
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=100, cooldown_steps=200))
    steps: int = 2000
    batch_size: int = 32  # per worker
    eval_every: int = 500  # steps; 0 = only at the end
    eval_images: int = 256
    eval_batch_size: int = 64
    picture_images: int = 8
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2
    log_every: int = 10  # steps between metric reports
    progress: bool = True  # a bar on the driver's console: step, loss, images/s, ETA
    log_checkpoints: bool = True  # also log every checkpoint as MLflow artifacts
    seed: int = 0
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int = 0  # CPU threads of each worker's torch; 0 = cpus_per_worker (Ray's OMP default)
    storage: str = "outputs/runs"  # run storage: local path or s3://bucket/prefix
    name: str = "spae-mnist"  # run name: Ray Train run folder and MLflow run
    max_failures: int = 1
    fail_at_step: int = -1  # test hook: the last worker raises once when it reaches this step
    register_model: str = ""  # MLflow registered model name for the final tokenizer ("" = not registered)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "eval_images",
            "eval_batch_size",
            "checkpoint_every",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "keep_checkpoints", "picture_images", "max_failures"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise ValueError("num_workers must be >= 1 and cpus_per_worker > 0")
        if not self.name or "/" in self.name:
            raise ValueError(f"name {self.name!r} must be a non-empty run name without '/'")
        check_semantic_layers(self.loss, len(self.model.pyramid.layer_sizes))
        if self.augment.enabled and self.model.num_frames:
            raise ValueError(
                f"augment.p={self.augment.p}: clips (model.num_frames > 0) are not augmented; set 0"
            )
        if not self.optim.total_steps:  # the schedule's cooldown ends with the job
            object.__setattr__(self, "optim", replace(self.optim, total_steps=self.steps))
        if self.optim.cooldown_steps > self.optim.total_steps:
            raise ValueError(
                f"optim.cooldown_steps={self.optim.cooldown_steps} exceeds the {self.steps} steps"
            )


def preset_base(name: str) -> dict[str, Any]:
    """The config layer a preset contributes: ``{"preset": name, "model": <preset model config>, "loss":
    <preset loss config>, "augment": <preset augmentation>}``."""
    return {
        "preset": name,
        "model": to_dict(preset(name)),
        "loss": to_dict(loss_preset(name)),
        "augment": to_dict(augment_preset(name)),
    }


# ----------------------------------------------------------------------------- data


def read_joined_shards(
    batch: dict[str, np.ndarray], pools: str, decode: DecodeOptions
) -> dict[str, np.ndarray]:
    """``{"shard": [json]}`` -> decoded images joined with their pools (rows without a pool are dropped).

    Columns: ``label`` (-1 = none), ``pixels`` uint8 [n, H, W, 3] or [n, T, H, W, 3] (clips,
    ``decode.frames > 0``), ``pool_ids`` int64 [n, k] (-1 = padding), ``pool_scores`` float32 [n, k]
    (NaN = padding).
    """
    loc = resolve(pools)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("label", "pixels", "pool_ids", "pool_scores")}
    for text in batch["shard"]:
        shard = Shard.from_json(str(text))
        part = shard_pixels(shard, decode)
        table = read_pools_part(loc, shard.shard_id, ["image_id", "topk_ids", "topk_scores"])
        rows = join_on_image_id(part["image_id"], table)
        keep = rows >= 0
        rows = rows[keep]
        out["label"].append(part["label"][keep])
        out["pixels"].append(part["pixels"][keep])
        out["pool_ids"].append(list_matrix(table.column("topk_ids").take(rows), -1, np.int64))
        out["pool_scores"].append(list_matrix(table.column("topk_scores").take(rows), np.nan, np.float32))
    width = max(m.shape[1] for m in out["pool_ids"])
    out["pool_ids"] = [
        np.pad(m, ((0, 0), (0, width - m.shape[1])), constant_values=-1) for m in out["pool_ids"]
    ]
    out["pool_scores"] = [
        np.pad(m, ((0, 0), (0, width - m.shape[1])), constant_values=np.nan) for m in out["pool_scores"]
    ]
    return {k: np.concatenate(v) for k, v in out.items()}


def check_data(cfg: TrainJobConfig) -> tuple[list[Shard], VocabCard]:
    """Fail fast on the driver: pools cover the image shards and refer to the vocab table's rows."""
    shards = list_shards(cfg.data.images)
    for key, listed in (("data.images.uri", shards), ("data.eval.uri", list_shards(cfg.data.eval))):
        if listed:  # clips for a video model, images for an image model
            check_source_kind(listed[0], train_decode(cfg), key)
    manifest = check_pools_cover(shards, cfg.data.pools)
    card = VocabCard.read(cfg.data.vocab)
    manifest.check_vocab(card, cfg.data.pools)
    if cfg.data.eval_pools:
        PoolsManifest.read(cfg.data.eval_pools).check_vocab(card, cfg.data.eval_pools)
    if card.codebook_dim != cfg.model.network.latent_dim:
        raise ValueError(
            f"model.network.latent_dim={cfg.model.network.latent_dim} but the vocab table's codebook has "
            f"dimension {card.codebook_dim}"
        )
    return shards, card


def train_decode(cfg: TrainJobConfig) -> DecodeOptions:
    """How training and evaluation images are decoded: the model's inputs, the data's fit policy."""
    return DecodeOptions.for_model(cfg.model, fit=cfg.data.fit)


def build_dataset(cfg: TrainJobConfig, shards: list[Shard]) -> Any:
    import ray

    ds = ray.data.from_items([{"shard": s.to_json()} for s in shards], override_num_blocks=len(shards))
    return ds.map_batches(
        read_joined_shards,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"pools": cfg.data.pools, "decode": train_decode(cfg)},
    )


# ----------------------------------------------------------------------------- the worker loop


def _to_images(pixels: torch.Tensor) -> torch.Tensor:
    # uint8 [b, H, W, 3] -> [b, 3, H, W] in [0, 1]; clips [b, T, H, W, 3] -> [b, 3, T, H, W]
    return pixels.movedim(-1, 1).float().div(255.0)


def train_images(
    pixels: torch.Tensor, cfg: TrainJobConfig, rank: int, step: int, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """A worker's batch as the step takes it: ``_to_images``, then ``cfg.augment``'s shifts drawn from
    ``(cfg.seed, rank, step)`` (the same after a resume; ``labels`` [b], -1 = none, for ``typeset``). The
    pools stay the source image's: with the label-probe scorer they are the class's (docs/ARCHITECTURE.md)."""
    images = _to_images(pixels)
    if not cfg.augment.enabled:
        return images
    return augment(images, cfg.augment, step_generator(cfg.seed, rank, step), labels)


def build_discriminator(model: SPAEConfig) -> torch.nn.Module:
    """The PatchGAN of eq. 8: 2D over images, ``Discriminator3D`` over clips (``num_frames > 0``)."""
    if model.num_frames:
        return Discriminator3D(model.network, model.image_channels, model.image_size, model.num_frames)
    return Discriminator(model.network, model.image_channels, model.image_size)


def _should_fail(cfg: TrainJobConfig, step: int, rank: int, world: int) -> bool:
    if cfg.fail_at_step < 0 or step != cfg.fail_at_step or rank != world - 1:
        return False
    marker = resolve(cfg.storage).join(cfg.name, FAIL_MARKER)
    if marker.exists():
        return False
    marker.write_text(f"failed once at step {step}\n")
    return True


class _Rank0:
    """What only rank 0 does: MLflow, evaluation, the picture, checkpoints on disk."""

    def __init__(self, cfg: TrainJobConfig, core: Any, run: Any):
        self.cfg, self.core, self.run = cfg, core, run
        self.eval_data: EvalData | None = None
        self.text_features = None
        self.class_rows = None

    def load_eval(self, vocab: Any) -> None:
        cfg = self.cfg
        self.eval_data = load_eval_data(
            cfg.data.eval, train_decode(cfg), cfg.data.eval_pools, cfg.eval_images
        )
        self.text_features = vocab.text_features if cfg.data.eval_pools else None
        words = class_words(self.eval_data)
        rows = class_token_rows(words, self.core.codebook.words) if words else None
        self.class_rows = rows if rows and any(rows) else None

    def evaluate(self, step: int) -> dict[str, float]:
        assert self.eval_data is not None
        tok = SPAETokenizer(self.core)
        metrics = evaluate_tokenizer(
            tok, self.eval_data, self.text_features, self.class_rows, self.cfg.eval_batch_size
        )
        metrics = {f"eval/{k}": v for k, v in metrics.items()}
        if self.run is not None:
            import mlflow

            mlflow.log_metrics(metrics, step=step)
            if self.cfg.picture_images:
                with tempfile.TemporaryDirectory() as tmp:
                    png = picture(
                        tok, self.eval_data, Path(tmp) / f"step-{step:07d}.png", self.cfg.picture_images
                    )
                    mlflow.log_artifact(str(png), artifact_path="pictures")
        return metrics

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            import mlflow

            mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)}, step=step)

    def log_checkpoint(self, directory: Path, step: int) -> None:
        if self.run is not None and self.cfg.log_checkpoints:
            import mlflow

            mlflow.log_artifacts(str(directory), artifact_path=f"checkpoints/step-{step:07d}")

    def finish(self, tokenizer_dir: Path) -> str:
        """Copy the tokenizer to <storage>/<name>/tokenizer, log it as an MLflow model; returns the URI.

        A re-run of a finished job (or one that resumes at its last step) has the same weights: the model
        is logged (and registered) once per run and fingerprint, never twice (the run's
        ``spae.tokenizer_fingerprint`` tag says which one was logged last)."""
        dest = resolve(self.cfg.storage).join(self.cfg.name, TOKENIZER)
        for f in sorted(tokenizer_dir.iterdir()):
            dest.join(f.name).write_bytes(f.read_bytes())
        if self.run is not None:
            import mlflow

            fingerprint = json.loads((tokenizer_dir / CONFIG_JSON).read_text())["fingerprint"]
            logged = mlflow.get_run(self.run.info.run_id).data.tags.get(FINGERPRINT_TAG)
            if logged != fingerprint:
                log_tokenizer_model(tokenizer_dir, self.cfg.register_model)
                mlflow.set_tag(FINGERPRINT_TAG, fingerprint)
        return dest.uri


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (every rank)."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainJobConfig, loop_config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    quiet_report_logs()
    post = BoardPoster(loop_config.get("board") if rank == 0 else None)
    device = ray.train.torch.get_device()
    if cfg.torch_threads:  # e.g. one worker on a 2-core laptop: Ray Data decodes between steps
        torch.set_num_threads(cfg.torch_threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts of the step (docs/BENCHMARKS.md)
    vocab = load_vocab(cfg.data.vocab)
    codebook = vocab.codebook()  # checks the card's hash: the exact rows the pools refer to
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    core = SPAE(cfg.model, codebook)
    lcfg = cfg.loss
    disc = build_discriminator(cfg.model) if lcfg.gan_weight else None
    perceptual = PerceptualLoss(lcfg.perceptual_weights).to(device) if lcfg.perceptual_enabled else None
    # DDP when world > 1. No buffer broadcast per step: the only buffer is the frozen codebook, which
    # is identical on every rank (and large: 65k x 768 in the paper's setting). Gradients are views
    # into DDP's all-reduce buckets: no copy into the buckets per step (docs/BENCHMARKS.md, scaling).
    ddp = {"broadcast_buffers": False, "gradient_as_bucket_view": True}
    model = ray.train.torch.prepare_model(core, parallel_strategy_kwargs=ddp)
    disc = ray.train.torch.prepare_model(disc, parallel_strategy_kwargs=ddp) if disc is not None else None
    trainer = SPAETrainer(
        model, disc, lcfg, cfg.optim, device, perceptual=perceptual, seed=cfg.seed, rank=rank
    )
    history: list[list[float]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state, _ = load_train_state(Path(d) / TRAIN_STATE)
            trainer.load_state_dict(state)
            history = json.loads((Path(d) / HISTORY).read_text())
    resumed_at = trainer.step_count
    mlflow_cfg = MlflowConfig(**loop_config["mlflow"])
    with start_run(mlflow_cfg if rank == 0 else replace(mlflow_cfg, enabled=False), cfg.name, ".") as run:
        chief = _Rank0(cfg, trainer.core, run) if rank == 0 else None
        if chief is not None:
            if run is not None:
                if resumed_at == 0:
                    log_params_flat(to_dict(cfg))
                import mlflow

                mlflow.set_tags({"spae.world_size": str(world), "spae.resumed_at_step": str(resumed_at)})
            chief.load_eval(vocab)
        shard = ray.train.get_dataset_shard("train")
        metrics: dict[str, float] = {}
        started = time.perf_counter()
        while trainer.step_count < cfg.steps:
            batches = shard.iter_torch_batches(
                batch_size=cfg.batch_size,
                drop_last=True,
                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                local_shuffle_seed=cfg.seed + 1000 * rank + trainer.step_count,
            )
            seen = 0
            for batch in batches:
                seen += 1
                if _should_fail(cfg, trainer.step_count, rank, world):
                    raise RuntimeError(
                        f"fail_at_step={cfg.fail_at_step}: injected worker failure (rank {rank})"
                    )
                images = train_images(batch["pixels"], cfg, rank, trainer.step_count, batch["label"])
                metrics = trainer.step(images, batch["pool_ids"], batch["pool_scores"])
                step = trainer.step_count  # steps done
                metrics["images_per_s"] = (
                    cfg.batch_size * world * (step - resumed_at) / (time.perf_counter() - started)
                )
                last = step >= cfg.steps
                post(step, {k: metrics[k] for k in PROGRESS_FIELDS if k in metrics}, last)
                report = step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or last
                if report:
                    history.append([float(step), metrics["loss/total"]])
                if chief is not None and report:
                    chief.log(metrics, step)
                    if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                        metrics.update(chief.evaluate(step))
                if report:
                    _report(cfg, trainer, history, metrics, step, last, chief)
                if last:
                    break
            if not seen:
                raise ValueError(
                    f"worker {rank}: its data shard holds fewer than batch_size={cfg.batch_size} rows; "
                    "use more images, fewer workers or a smaller batch"
                )
        if chief is not None:
            with tempfile.TemporaryDirectory() as tmp:
                tok_dir = SPAETokenizer(trainer.core).save_pretrained(Path(tmp) / TOKENIZER)
                uri = chief.finish(tok_dir)
                if run is not None:
                    import mlflow

                    mlflow.set_tag("spae.tokenizer", uri)


def quiet_report_logs() -> None:
    """Ray Train (2.60) logs every ``ray.train.report`` as a ``TrainingReport(...)`` dict at INFO, on a logger
    named by its file path; the metrics go to MLflow and the driver's bar instead, warnings still show."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its logging is left as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _report(cfg, trainer, history, metrics, step, last, chief) -> None:
    """Every rank reports; rank 0 attaches a checkpoint every ``checkpoint_every`` steps and at the end."""
    import ray.train

    reported = {k: float(v) for k, v in metrics.items()}
    reported["step"] = float(step)
    if chief is not None and (step % cfg.checkpoint_every == 0 or last):
        with tempfile.TemporaryDirectory() as tmp:
            save_train_state(Path(tmp) / TRAIN_STATE, trainer.state_dict(), to_dict(cfg))
            (Path(tmp) / HISTORY).write_text(json.dumps(history))
            chief.log_checkpoint(Path(tmp), step)
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(reported)


# ----------------------------------------------------------------------------- MLflow model


def _pyfunc_class() -> type:
    import mlflow.pyfunc

    class SPAETokenizerModel(mlflow.pyfunc.PythonModel):
        """pyfunc view of the tokenizer: images ``[n, 3, H, W]`` (clips ``[n, 3, T, H, W]``) in [0, 1]
        (array) -> pyramid text per image.

        The weights are the ``save_pretrained`` folder under the model's ``artifacts/tokenizer``;
        ``pipeline.outputs.contracts.load_tokenizer("runs:/<id>/tokenizer")`` or ``("models:/<name>/<v>")``
        loads
        them directly (safetensors, no pickle).
        """

        def load_context(self, context):  # no type hints: MLflow infers a schema from them
            self.tokenizer = SPAETokenizer.from_pretrained(context.artifacts[TOKENIZER])

        def predict(self, context, model_input, params=None):
            images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            return self.tokenizer.to_text(self.tokenizer.encode(images))

    return SPAETokenizerModel


def log_tokenizer_model(tokenizer_dir: Path, registered_name: str = "") -> Any:
    """Log a save_pretrained folder as the MLflow model ``tokenizer`` of the active run."""
    import mlflow

    return mlflow.pyfunc.log_model(
        name=TOKENIZER,
        python_model=_pyfunc_class()(),
        artifacts={TOKENIZER: str(tokenizer_dir)},
        pip_requirements=["spae", "torch", "safetensors"],
        registered_model_name=registered_name or None,
    )


# ----------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class TrainJobResult:
    name: str
    run_id: str  # MLflow run ("" when MLflow is disabled)
    steps: int
    metrics: dict[str, float]  # the last reported metrics
    checkpoint: str  # the latest checkpoint's path in the run storage
    tokenizer: str  # <storage>/<name>/tokenizer
    seconds: float


def run_train_job(cfg: TrainJobConfig, log: Any = print) -> TrainJobResult:
    """Build the dataset and the TorchTrainer and fit; Ray must be initialised (``init_ray``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    start = time.perf_counter()
    shards, card = check_data(cfg)
    storage = resolve(cfg.storage)
    storage_path, storage_fs = ray_storage(storage)
    default_dir = storage.path if not storage.is_s3 else "outputs"
    mlflow_cfg = (
        replace(cfg.mlflow, tracking_uri=resolve_tracking_uri(cfg.mlflow, default_dir))
        if cfg.mlflow.enabled
        else cfg.mlflow
    )
    log(f"train: {cfg.name}: {cfg.loss.describe()}")
    log(
        f"train: {len(shards)} image shards, codebook {card.codebook_hash[:12]} ({card.rows} rows), "
        f"{cfg.num_workers} workers x batch {cfg.batch_size}, {cfg.steps} steps -> {storage.uri}/{cfg.name}"
    )
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    board = start_board() if cfg.progress else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": to_dict(cfg), "mlflow": to_dict(mlflow_cfg), "board": board},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints or None),
        ),
        datasets={"train": build_dataset(cfg, shards)},
    )
    with follow(board, cfg.steps, "train", "step", PROGRESS_FIELDS):
        result = trainer.fit()
    run_id = ""
    if mlflow_cfg.enabled:
        import mlflow

        mlflow.set_tracking_uri(mlflow_cfg.tracking_uri)
        experiment = mlflow.get_experiment_by_name(mlflow_cfg.experiment)
        if experiment is not None:
            run_id = find_run_id(mlflow.MlflowClient(), experiment.experiment_id, cfg.name) or ""
    metrics = dict(result.metrics or {})
    return TrainJobResult(
        name=cfg.name,
        run_id=run_id,
        steps=int(metrics.get("step", 0)),
        metrics=metrics,
        checkpoint=result.checkpoint.path if result.checkpoint is not None else "",
        tokenizer=storage.join(cfg.name, TOKENIZER).uri,
        seconds=time.perf_counter() - start,
    )
