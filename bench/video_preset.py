"""The Moving MNIST video preset, trained and evaluated in one process on one GPU (no Ray, no MLflow).

The figures of docs/RESULTS.md's video section, re-runnable by anyone with a GPU: the ``moving-mnist``
preset (16 frames of 32x32, one digit; a 3D SPAE) trained with the library's trainer
(``spae.training.SPAETrainer``, ``Discriminator3D``, the train job's schedule: warmup 100, cooldown 200,
batch 32, lr 1e-3) on the clips and label-probe pools of a demo's output folder, then evaluated on
held-out test clips as ``spae evaluate`` does (the training forward pass in eval mode, fp32): PSNR and
SSIM per covering prefix, per frame and averaged over all frames, and the share of clips whose layer-1
word is the clip's digit word or numeral. The JSON holds the metrics with the commit, the card
(``torch.cuda.get_device_name``), the seed and the schedule beside them, and is rewritten after every
evaluation (``--eval-every``), so a run stopped early still leaves its last figures.

The data folder is what ``spae demo dataset=moving-mnist stop_after=pools`` writes (its ``vocab/`` and
``pools-train/`` tables; the clips themselves are generated here from MNIST, as the demo's source
does). Only torch, numpy, pyarrow and the MNIST asset are needed where it runs:

    python bench/video_preset.py --data spae-output --steps 3000 --seed 0 --json video-seed0.json

``--clip-cache DIR`` keeps the generated clips as ``.npy`` files (several runs share one generation);
``--smoke`` trains the ``tiny3d`` preset on a few clips with a hand-made codebook on the CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

if __package__ in (None, ""):  # run as a script: the repository root on the path for ``bench.*``
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from bench.mnist_recipe import read_codebook
from spae.codebook import FrozenCodebook
from spae.config import load_config, to_dict
from spae.data import MNIST_CLASS_WORDS
from spae.losses import LossConfig, loss_preset
from spae.metrics import label_word_accuracy, psnr, ssim
from spae.model import SPAE, SPAEConfig, preset
from spae.networks3d import Discriminator3D
from spae.training import OptimConfig, SPAETrainer
from spae.video import MovingMnistConfig, clips_to_float, frames_as_images, moving_mnist

CLIP_ID = re.compile(
    r"^mmnist-(train|valid|test)-(\d+)-d\d+$"
)  # pipeline.inputs.sources' Moving MNIST image ids


# ----------------------------------------------------------------------------- data


def read_clip_pools(folder: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """A clip pools table (``spae pools frames=16``) -> clip index in the train split [n], pool ids
    [n, k] (-1 = padding) and scores [n, k] (NaN = padding), sorted by clip index."""
    parts = sorted(Path(folder).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{folder}: no part-*.parquet (run the pools job on the training clips)")
    t = pa.concat_tables([pq.read_table(p, columns=["image_id", "topk_ids", "topk_scores"]) for p in parts])
    index = []
    for image_id in t["image_id"].to_pylist():
        m = CLIP_ID.match(image_id)
        if m is None or m.group(1) != "train":
            raise ValueError(f"{folder}: {image_id!r} is not a Moving MNIST training clip id")
        index.append(int(m.group(2)))
    ids_rows, score_rows = t["topk_ids"].to_pylist(), t["topk_scores"].to_pylist()
    k = max(len(r) for r in ids_rows)
    ids = np.full((len(index), k), -1, np.int64)
    scores = np.full((len(index), k), np.nan, np.float32)
    for i, (r_ids, r_scores) in enumerate(zip(ids_rows, score_rows, strict=True)):
        ids[i, : len(r_ids)], scores[i, : len(r_scores)] = r_ids, r_scores
    order = np.argsort(index, kind="stable")
    return np.asarray(index)[order], torch.from_numpy(ids[order]), torch.from_numpy(scores[order])


def _clip_range(split: str, start: int, stop: int, frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    clips = moving_mnist(split, start, stop, MovingMnistConfig(frames=frames, size=size, digits=1))
    return clips.clips, clips.labels[:, 0]


def generate_clips(
    split: str, stop: int, frames: int, size: int, cache: str = "", workers: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Clips ``0..stop-1`` of the Moving MNIST ``split`` (uint8 [n, T, H, W], labels [n]) as the demo's
    ``moving-mnist://`` source makes them (one digit), in parallel ranges; ``cache``: a folder keeping
    them as ``.npy`` files."""
    name = f"{split}-{stop}-f{frames}-s{size}"
    paths = [Path(cache) / f"{name}-{part}.npy" for part in ("clips", "labels")] if cache else []
    if paths and all(p.is_file() for p in paths):
        return np.load(paths[0]), np.load(paths[1])
    workers = workers or min(16, os.cpu_count() or 1)
    step = max(1, -(-stop // workers))
    ranges = [(split, a, min(a + step, stop), frames, size) for a in range(0, stop, step)]
    if workers > 1 and len(ranges) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_clip_range, *zip(*ranges, strict=True)))
    else:
        parts = [_clip_range(*r) for r in ranges]
    clips, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if paths:
        Path(cache).mkdir(parents=True, exist_ok=True)
        for p, a in zip(paths, (clips, labels), strict=True):
            np.save(p.with_suffix(".tmp.npy"), a)
            p.with_suffix(".tmp.npy").replace(p)  # whole files only, when runs share the cache
    return clips, labels


def class_rows(codebook: FrozenCodebook) -> list[set[int]]:
    """Per digit, the codebook rows of its word or numeral (``zero`` / ``0``, ...)."""
    words = [w.lower() for w in codebook.words]
    return [
        {r for r, w in enumerate(words) if w in (name, str(i))} for i, name in enumerate(MNIST_CLASS_WORDS)
    ]


# ----------------------------------------------------------------------------- train and evaluate


@torch.no_grad()
def evaluate(model: SPAE, clips: np.ndarray, labels: np.ndarray, rows: list[set[int]], batch: int) -> dict:
    """PSNR / SSIM per covering prefix over all frames, layer-1 word accuracy, distinct tokens per layer,
    as ``spae evaluate`` computes them (the training forward pass in eval mode, fp32)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    top: list[torch.Tensor] = []
    seen: dict[int, set[int]] = {}  # layer -> distinct codebook rows
    for start in range(0, len(clips), batch):
        x = clips_to_float(clips[start : start + batch]).to(device)  # [b, 3, T, H, W]
        b, t = x.shape[0], x.shape[2]
        out = model(x)
        for l, rec in out.reconstructions.items():
            rec = ((rec.float() + 1.0) / 2.0).clamp(0.0, 1.0)
            for name, metric in (("psnr", psnr), ("ssim", ssim)):
                per_clip = metric(frames_as_images(rec), frames_as_images(x)).view(b, t).mean(1)  # [b]
                sums[f"{name}/p{l}"] = sums.get(f"{name}/p{l}", 0.0) + float(per_clip.double().sum())
        top.append(out.quant.ids[0].flatten(1)[:, 0].cpu())
        for l, ids in enumerate(out.quant.ids, start=1):
            seen.setdefault(l, set()).update(ids.unique().cpu().tolist())
    model.train(was_training)
    top_ids = torch.cat(top)
    metrics = {k: v / len(clips) for k, v in sums.items()}
    metrics["label_word_accuracy/l1"] = label_word_accuracy(top_ids, torch.from_numpy(labels), rows)
    metrics.update({f"distinct/l{l}": len(rows_l) for l, rows_l in seen.items()})
    metrics["clips"], metrics["frames_per_clip"] = len(clips), int(clips.shape[1])
    return {"metrics": metrics, "layer1_ids": top_ids.tolist()}


def code_commit(explicit: str) -> str:
    """The commit of the ``spae`` package in use: ``--commit``, else ``git rev-parse`` where it lives."""
    if explicit:
        return explicit
    import spae

    try:
        out = subprocess.run(
            ["git", "-C", str(Path(spae.__file__).parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (pass --commit)"
    return out.stdout.strip()


def card(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def train_and_evaluate(
    args: argparse.Namespace, cfg: SPAEConfig, codebook: FrozenCodebook, data, test
) -> dict:
    device = torch.device(args.device)
    clips, ids, scores = data
    lcfg = load_config(LossConfig, overrides=args.loss, base=to_dict(loss_preset("moving-mnist")))
    torch.manual_seed(args.seed)  # as the train job: model, then discriminator, from the seed
    model = SPAE(cfg, codebook).to(device)
    disc = (
        Discriminator3D(cfg.network, cfg.image_channels, cfg.image_size, cfg.num_frames).to(device)
        if lcfg.gan_weight
        else None
    )
    optim = load_config(
        OptimConfig,
        overrides=args.optim,
        base={
            "lr": args.lr,
            "warmup_steps": min(100, args.steps),
            "cooldown_steps": min(200, args.steps),
            "total_steps": args.steps,
        },
    )
    trainer = SPAETrainer(model, disc, lcfg, optim, device, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    record: dict[str, Any] = {
        "bench": "video_preset",
        "commit": code_commit(args.commit),
        "card": card(device),
        "seed": args.seed,
        "torch": torch.__version__,
        "schedule": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": optim.warmup_steps,
            "cooldown_steps": optim.cooldown_steps,
            "train_clips": len(clips),
            "eval_clips": len(test[0]),
            "optim_overrides": args.optim,
            "model_overrides": args.model,
            "loss_overrides": args.loss,
        },
        "completed": False,
        "evaluations": [],
    }
    rows = class_rows(codebook)
    order = torch.randperm(len(clips), generator=g)  # epochs of shuffled clips, as the job's data feed
    pos, losses, started = 0, [], time.perf_counter()
    while trainer.step_count < args.steps:
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(clips), generator=g), 0
        batch = order[pos : pos + args.batch_size]
        pos += args.batch_size
        metrics = trainer.step(clips_to_float(clips[batch.numpy()]), ids[batch], scores[batch])
        step = trainer.step_count
        if step % args.log_every == 0 or step == args.steps:
            losses.append([step, metrics["loss/total"], metrics["loss/reconstruction"]])
            print(
                f"seed {args.seed} step {step}: total {losses[-1][1]:.4f} rec {losses[-1][2]:.4f} "
                f"({(time.perf_counter() - started) / step:.3f} s/step)",
                flush=True,
            )
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            seconds = time.perf_counter() - started
            result = evaluate(trainer.core, *test, rows, args.eval_batch_size)
            record["evaluations"].append({"step": step, "train_seconds": seconds, **result["metrics"]})
            record.update(result["metrics"])
            record.update(
                step=step,
                completed=step == args.steps,
                train_seconds=seconds,
                s_per_step=seconds / step,
                losses=losses,
                skipped_steps=trainer.skipped_steps,
                layer1_words_first10=[codebook.words[i] for i in result["layer1_ids"][:10]],
                labels_first10=test[1][:10].tolist(),
            )
            write(args.json, record)
            summary = " / ".join(f"{record[k]:.2f}" for k in sorted(record) if k.startswith("psnr/"))
            print(
                f"RESULT video_preset seed {args.seed} step {step}: PSNR {summary} dB, "
                f"layer-1 word {record['label_word_accuracy/l1']:.1%}",
                flush=True,
            )
    return record


def write(path: str, record: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(path)


# ----------------------------------------------------------------------------- smoke (CPU, seconds)


def smoke_inputs(train: int, test: int) -> tuple[SPAEConfig, FrozenCodebook, tuple, tuple]:
    """``tiny3d`` with a 64-row random codebook whose first 20 rows are the digit words and numerals,
    each clip's pool its digit's two rows (score 1): no vocab or pools tables needed."""
    from bench.common import random_codebook

    base = random_codebook(64, 384, seed=0)
    words = [w for i, name in enumerate(MNIST_CLASS_WORDS) for w in (name, str(i))]
    words += base.words[len(words) :]
    codebook = FrozenCodebook(base.embeddings, words, words, list(range(64)), {"source": "smoke"})
    cfg = load_config(SPAEConfig, overrides=["codebook.top_n=64"], base=to_dict(preset("tiny3d")))
    clips, labels = generate_clips("train", train, cfg.num_frames, cfg.image_size, workers=1)
    pool_ids = torch.from_numpy(np.stack([2 * labels, 2 * labels + 1], 1))  # [n, 2]
    pool_scores = torch.ones(len(labels), 2)
    return cfg, codebook, (clips, pool_ids, pool_scores), generate_clips("test", test, 4, 16, workers=1)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="a Moving MNIST demo output folder (vocab/, pools-train/)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-clips", type=int, default=0, help="the first N clips of the pools table; 0 = all")
    p.add_argument("--eval-clips", type=int, default=1000, help="held-out clips 0..N-1 of the test split")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: at the end)")
    p.add_argument("--eval-batch-size", type=int, default=50)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--model", action="append", default=[], help="SPAEConfig override key=value")
    p.add_argument("--loss", action="append", default=[], help="LossConfig override key=value")
    p.add_argument("--optim", action="append", default=[], help="OptimConfig override key=value")
    p.add_argument("--clip-cache", default="", help="keep the generated clips here (.npy)")
    p.add_argument("--commit", default="", help="the code's commit (default: git rev-parse where spae is)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="", help="write the record here (after every evaluation)")
    p.add_argument("--prepare", action="store_true", help="only generate the clips into --clip-cache")
    p.add_argument("--smoke", action="store_true", help="tiny3d, a few clips and steps on the CPU")
    args = p.parse_args(argv)

    if args.smoke:
        args.device, args.steps, args.batch_size, args.log_every = "cpu", 3, 2, 1
        args.eval_every, args.eval_batch_size = 0, 4
        cfg, codebook, data, test = smoke_inputs(train=6, test=4)
    else:
        if not args.data:
            p.error("--data: a Moving MNIST demo output folder (vocab/, pools-train/) is required")
        cfg = load_config(SPAEConfig, overrides=args.model, base=to_dict(preset("moving-mnist")))
        codebook = read_codebook(f"{args.data}/vocab")
        index, ids, scores = read_clip_pools(f"{args.data}/pools-train")
        if args.train_clips:
            index, ids, scores = (
                index[: args.train_clips],
                ids[: args.train_clips],
                scores[: args.train_clips],
            )
        t0 = time.perf_counter()
        frames, size = cfg.num_frames, cfg.image_size
        all_clips, _ = generate_clips("train", int(index.max()) + 1, frames, size, args.clip_cache)
        test = generate_clips("test", args.eval_clips, frames, size, args.clip_cache)
        data = (all_clips[index], ids, scores)
        print(f"clips: {len(index)} training, {args.eval_clips} held-out ({time.perf_counter() - t0:.0f} s)")
        if args.prepare:
            return 0
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts of the step, as the train job
    record = train_and_evaluate(args, cfg, codebook, data, test)
    print(json.dumps({k: v for k, v in record.items() if k not in ("losses", "evaluations")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
