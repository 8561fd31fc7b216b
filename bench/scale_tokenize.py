"""Tokenize at scale: WebDataset JPEG tars -> ``spae tokenize`` -> a corpus, against its ceilings.

Steps (each a subcommand, so a run can be split over several calls of at most 10 minutes on one machine;
every step appends its figures to ``<root>/results.jsonl``):

- ``gen``: ``--images`` varied 256 x 256 JPEGs (smooth colour fields, shapes, grain; ~15-30 KB) in
  WebDataset tars of ``--per-tar`` samples (``<key>.jpg`` + ``<key>.cls``, as img2dataset writes them),
  written by ``--workers`` processes; ``sub10k`` / ``sub100k`` folders link the first tars.
- ``tokenizer``: the ``paper`` preset (``network.latent_dim=768``) over a random frozen 65,536 x 768
  codebook, random weights (same FLOPs), saved with ``save_pretrained``.
- ``ceilings``: the bare ``SPAETokenizer.encode`` loop on images already on the device (the encode options
  the job uses), and the CPU decode ceiling: ``--workers`` processes reading tars and decoding to the
  model's size with the job's own functions (``read_tar_range``, ``decode_image``), no Ray.
- ``driver``: the driver's share of the job alone (``WordsStage`` + ``ShardWriter`` committing
  ``paper``-shaped rows), with the Parquet encoded on the driver thread and on the writer's threads.
- ``job``: ``spae tokenize`` in a child process over ``--source`` (all tars, or a sub folder), sampled every
  second: committed rows, driver RSS, the largest worker RSS, GPU utilisation; ``--kill-at F`` SIGKILLs
  the driver once a fraction F of the rows is committed (a re-run of the same command resumes).

Rates: the job's end-to-end images/s (wall clock of the process, start-up and listing included) and its
settled rate (rows committed between 10% and 90% of the run, over that time), each over the bare encode.

    python -m bench.scale_tokenize gen --root /tmp/scale --images 1000000
    python -m bench.scale_tokenize tokenizer --root /tmp/scale
    python -m bench.scale_tokenize ceilings --root /tmp/scale
    python -m bench.scale_tokenize job --root /tmp/scale --source sub100k --output c100k
    python -m bench.scale_tokenize job --root /tmp/scale --source wds --output c1m --kill-at 0.5
    python -m bench.scale_tokenize --smoke        # every step, tiny, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.common import device_line, pick_device, random_codebook, sync
from pipeline.inputs.images import DecodeOptions, decode_image
from pipeline.inputs.webdataset import read_tar_range, scan_tar
from spae.encode_options import EncodeOptions
from spae.model import SPAE, preset
from spae.networks import NetworkConfig
from spae.tokenizer import SPAETokenizer

SUBSETS = {"sub10k": 10_000, "sub100k": 100_000}


def record(root: Path, step: str, figures: dict) -> None:
    line = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **figures}
    with open(root / "results.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line), flush=True)


# ----------------------------------------------------------------------------- gen


_GRAIN = np.random.default_rng(0).normal(0, 2.5, (16, 256, 256, 1)).round().astype(np.int16)  # sensor-like


def jpeg(index: int, size: int = 256) -> bytes:
    """One varied 256 x 256 JPEG, seeded by its index: a smooth colour field, 3-11 shapes, grain."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(index)
    low = rng.random((int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3)) * 255
    img = Image.fromarray(low.astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        xs, ys = np.sort(rng.integers(0, size, 2)), np.sort(rng.integers(0, size, 2))
        box = (int(xs[0]), int(ys[0]), int(xs[1]) + 4, int(ys[1]) + 4)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=int(rng.integers(1, 8)))
    grain = _GRAIN[int(rng.integers(len(_GRAIN)))] * int(rng.integers(1, 5))  # int16 [size, size, 1]
    pixels = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_tar(path: str, start: int, count: int) -> int:
    """Samples ``[start, start + count)`` as one tar; returns its JPEG bytes."""
    total = 0
    with tarfile.open(path + ".part", "w") as tar:
        for i in range(start, start + count):
            key = f"{i:09d}"
            for ext, data in (("jpg", jpeg(i)), ("cls", str(i % 1000).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                total += len(data) if ext == "jpg" else 0
    os.replace(path + ".part", path)
    return total


def gen(args) -> None:
    wds = args.root / "wds"
    wds.mkdir(parents=True, exist_ok=True)
    tars = [
        (str(wds / f"{t:05d}.tar"), s, min(args.per_tar, args.images - s))
        for t, s in enumerate(range(0, args.images, args.per_tar))
    ]
    todo = [t for t in tars if not Path(t[0]).exists()]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        sizes = list(pool.map(write_tar, *zip(*todo, strict=True))) if todo else []
    seconds = time.perf_counter() - t0
    for name, n in SUBSETS.items():
        sub = args.root / name
        sub.mkdir(exist_ok=True)
        for path, start, _ in tars:
            link = sub / Path(path).name
            if start < min(n, args.images) and not link.exists():
                link.symlink_to(path)
    made = sum(c for _, _, c in todo)
    record(
        args.root,
        "gen",
        {
            "images": args.images,
            "tars": len(tars),
            "made_now": made,
            "seconds": round(seconds, 1),
            "images_per_s": round(made / seconds) if seconds and made else None,
            "mean_jpeg_kb": round(sum(sizes) / made / 1024, 1) if made else None,
            "workers": args.workers,
        },
    )


# ----------------------------------------------------------------------------- tokenizer


def tokenizer(args) -> None:
    torch.manual_seed(0)
    if args.smoke:
        cfg = preset("tiny")
        codebook = random_codebook(512, cfg.network.latent_dim)
    else:
        cfg = replace(preset("paper"), network=NetworkConfig.preset("paper", latent_dim=768))
        codebook = random_codebook(65_536, 768)
    model = SPAE(cfg, codebook)
    g = torch.Generator().manual_seed(1)
    model.match_latent_to_codebook(torch.rand(8, 3, cfg.image_size, cfg.image_size, generator=g))
    folder = SPAETokenizer(model).save_pretrained(args.root / "tok")
    record(
        args.root,
        "tokenizer",
        {"folder": str(folder), "image_size": cfg.image_size, "codebook": list(codebook.embeddings.shape)},
    )


# ----------------------------------------------------------------------------- vocab (for pools)


def vocab(args) -> None:
    """A 65,536-token codebook (random 768-d rows) as Parquet, then ``spae vocab`` with the scorer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    v = 512 if args.smoke else 65_536
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((v, 768), dtype=np.float32)
    table = pa.table({"token": [f"w{i}" for i in range(v)], "embedding": list(emb)})
    pq.write_table(table, args.root / "codebook.parquet")
    overrides = [
        "codebook.source=parquet",
        f"codebook.path={args.root / 'codebook.parquet'}",
        "codebook.blocklist=",
        *scorer_overrides(args),
        "scorer.templates=simple",
        f"output={args.root / 'vocab'}",
        "progress=false",
        "mlflow.enabled=false",
        f"ray.num_cpus={args.workers}",
    ]
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "jobs.cli", "vocab", *overrides, *gpu_overrides(args)]
    with open(args.root / "vocab.log", "a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    record(args.root, "vocab", {"tokens": v, "rc": rc, "seconds": round(time.perf_counter() - t0, 1)})


def scorer_overrides(args) -> list[str]:
    arch, precision = ("ViT-B-32", "fp32") if args.smoke else ("ViT-L-14", "fp16")
    return [
        "scorer.kind=open_clip",
        f"scorer.arch={arch}",
        "scorer.pretrained=",
        f"scorer.precision={precision}",
    ]


def gpu_overrides(args) -> list[str]:
    return [] if args.smoke else ["num_gpus_per_actor=1", "ray.num_gpus=1"]


# ----------------------------------------------------------------------------- ceilings


def decode_tar(path: str, size: int) -> int:
    with open(path, "rb") as f:
        samples = scan_tar(f, os.path.getsize(path))
    with open(path, "rb") as f:
        rows = read_tar_range(f, len(samples))
    options = DecodeOptions(size=size)  # the job's defaults
    for row in rows:
        decode_image(row.image, options)
    return len(rows)


def ceilings(args) -> None:
    device = pick_device(args.smoke)
    tok = SPAETokenizer.from_pretrained(args.root / "tok").to(device).eval()
    size = tok.model.cfg.image_size
    encode_kw = {} if args.smoke else {"dtype": "bfloat16", "compile": True}
    tok.encode_options = EncodeOptions(**encode_kw)  # what the job's stage sets from its config
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(args.batch, 3, size, size, device=device, generator=g)
    with torch.no_grad():
        t0 = time.perf_counter()
        tok.encode(images)  # the first call: the compilation
        sync(device)
        first_call_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            tok.encode(images)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.reps):
            tok.encode(images)
        sync(device)
    encode_rate = args.batch * args.reps / (time.perf_counter() - t0)
    tars = sorted(str(p) for p in (args.root / "wds").glob("*.tar"))[: max(args.decode_tars, args.workers)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        decoded = sum(pool.map(decode_tar, tars, [size] * len(tars)))
    decode_rate = decoded / (time.perf_counter() - t0)
    record(
        args.root,
        "ceilings",
        {
            "device": device_line(device),
            "encode": dict(encode_kw),
            "batch": args.batch,
            "bare_encode_images_per_s": round(encode_rate, 1),
            "first_call_s": round(first_call_s, 1),
            "decode_processes": min(args.workers, len(tars)),
            "decode_images": decoded,
            "cpu_decode_images_per_s": round(decode_rate, 1),
        },
    )


# ----------------------------------------------------------------------------- driver


def driver(args) -> None:
    """The driver's share of the job alone: ``WordsStage`` + ``ShardWriter`` (Parquet + JSONL commits to
    local disk) on ``paper``-shaped token batches (597 ids a row over 65,536 words), with the Parquet
    encoded on the driver thread and on ``ENCODE_THREADS`` threads; rows/s of each."""
    import tempfile

    from pipeline.inputs.sources import Shard, SourceConfig
    from pipeline.outputs.corpus import corpus_schema
    from pipeline.outputs.shards import ShardWriter
    from pipeline.runtime.stages import ENCODE_THREADS
    from pipeline.steps.tokenize import WordsStage, jsonl_sidecar, tokens_column

    counts = (1, 4, 16, 64, 256, 256)  # the paper pyramid's tokens per layer
    v, shard_rows, shards_n, piece = 65_536, args.shard_size, 4 if args.smoke else 24, 256
    layers = tuple(range(1, len(counts) + 1))
    words = WordsStage([f"w{i}" for i in range(v)], layers)
    rng = np.random.default_rng(0)
    source = SourceConfig(uri=str(args.root))
    shards = [
        Shard(f"{j:05d}", "webdataset", str(args.root), (), shard_rows, f"d{j}", source)
        for j in range(shards_n)
    ]

    def batch(j: int, lo: int, hi: int) -> dict:
        m = hi - lo
        b = {
            "shard_id": np.array([f"{j:05d}"] * m, dtype=object),
            "image_id": np.array([f"{j:05d}-{i:06d}" for i in range(lo, hi)], dtype=object),
            "path": np.array(["p"] * m, dtype=object),
            "source": np.array(["wds"] * m, dtype=object),
            "label": np.zeros(m, np.int64),
            "error": np.array([""] * m, dtype=object),
            "error_stage": np.array([""] * m, dtype=object),
        }
        for l, c in zip(layers, counts, strict=True):
            b[tokens_column(l)] = rng.integers(0, v, (m, c)).astype(np.int32)
        return b

    batches = [
        batch(j, lo, min(lo + piece, shard_rows))
        for j in range(shards_n)
        for lo in range(0, shard_rows, piece)
    ]
    figures = {}
    for threads in (0, ENCODE_THREADS, 0, ENCODE_THREADS):  # twice each, alternating: the second counts
        with tempfile.TemporaryDirectory(dir=args.root) as out:
            writer = ShardWriter(
                out, shards, corpus_schema(layers), identity={}, sidecars=jsonl_sidecar, threads=threads
            )
            t0 = time.perf_counter()
            for b in batches:
                writer.add(words(b))
            writer.flush()
            figures[f"rows_per_s_threads_{threads}"] = round(
                shards_n * shard_rows / (time.perf_counter() - t0)
            )
    record(args.root, "driver", {"rows": shards_n * shard_rows, **figures})


# ----------------------------------------------------------------------------- job


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    kids, out, stack = _children(), [], [pid]
    while stack:
        for child in kids.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _gpu_util() -> float | None:
    try:
        text = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        return float(text.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def committed_rows(corpus: Path, shard_size: int) -> int:
    """Rows committed so far: committed Parquet parts (metadata, temporary folders skipped) x shard size."""
    if not corpus.exists():
        return 0
    parts = [
        p
        for p in corpus.rglob("*.parquet")
        if not any(s.startswith((".", "_")) for s in p.relative_to(corpus).parts)
    ]
    return len(parts) * shard_size


def job(args) -> None:
    if args.budget < 0:
        raise SystemExit(f"job: no time left for {args.output} (--budget {args.budget:.0f} s)")
    source, corpus = args.root / args.source, args.root / args.output
    total = sum(1 for _ in source.glob("*.tar")) * args.per_tar if not args.images else args.images
    smoke = args.smoke
    overrides = [
        f"source.uri={source}",
        f"source.shard_size={args.shard_size}",
        f"output={corpus}",
        f"batch_size={args.batch}",
        "actors=1",
        "progress=false",
        "mlflow.enabled=false",
        f"ray.num_cpus={args.workers}",
        *gpu_overrides(args),
    ]
    if args.job == "pools":
        overrides += [f"vocab={args.root / 'vocab'}", *scorer_overrides(args)]
    else:
        overrides += [f"tokenizer={args.root / 'tok'}"]
        overrides += [] if smoke else ["encode.dtype=bfloat16", "encode.compile=true"]
    cmd = [sys.executable, "-m", "jobs.cli", args.job, *overrides, *args.extra]
    print("$ " + " ".join(cmd), flush=True)
    before = committed_rows(corpus, args.shard_size)
    log = open(args.root / f"{args.output}.log", "a")  # noqa: SIM115 - the child writes to it until it ends
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    samples, killed, peak_worker, seen = [], False, 0.0, set()
    while proc.poll() is None:
        time.sleep(1.0)
        rows = committed_rows(corpus, args.shard_size)
        cluster = _descendants(proc.pid)
        seen.update(cluster)
        workers = [_rss_mb(p) for p in cluster if _cmdline(p).startswith("ray::")]  # Ray workers
        peak_worker = max([peak_worker, *workers])
        samples.append(
            {
                "t": round(time.perf_counter() - t0, 1),
                "rows": rows,
                "driver_mb": round(_rss_mb(proc.pid)),
                "max_worker_mb": round(max(workers, default=0.0)),
                "gpu_util": _gpu_util() if not smoke else None,
            }
        )
        budget_over = args.budget and time.perf_counter() - t0 > args.budget
        if (args.kill_at and rows >= args.kill_at * total) or budget_over:
            os.kill(proc.pid, signal.SIGKILL)  # the driver only; its local cluster shares its fate
            killed = True
            proc.wait()
            break
    seconds = time.perf_counter() - t0
    log.close()
    after = committed_rows(corpus, args.shard_size)
    deadline = time.time() + 10
    while killed and time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in seen):
        time.sleep(0.5)  # the cluster's processes follow the driver: wait until they are gone
    for pid in seen:  # any that outlived the wait
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    lines = (args.root / f"{args.output}.log").read_text().splitlines()
    startup = [line for line in lines if line.startswith("start-up:")]
    gpu_hours = round(seconds / 3600 * 1e6 / (after - before), 3) if after > before else None
    done = [s for s in samples if s["rows"] > before]
    settled = _settled(samples, before, total)
    util = [s["gpu_util"] for s in samples if s["gpu_util"] is not None and before < s["rows"] < total]
    record(
        args.root,
        "job",
        {
            "source": args.source,
            "output": args.output,
            "images": total,
            "rc": proc.returncode,
            "killed": killed,
            "rows_before": before,
            "rows_after": after,
            "seconds": round(seconds, 1),
            "end_to_end_images_per_s": round((after - before) / seconds, 1) if seconds else None,
            "settled_images_per_s": settled,
            # one GPU's hours per million images at this run's end-to-end rate
            "gpu_hours_per_million": gpu_hours,  # one GPU's, at this run's end-to-end rate
            "first_commit_s": done[0]["t"] if done else None,
            "startup": startup[-1] if startup and not killed else None,  # the job's own start-up line
            "gpu_util_mean": round(float(np.mean(util)), 1) if util else None,
            "driver_peak_mb": max((s["driver_mb"] for s in samples), default=0),
            "worker_peak_mb": round(peak_worker),  # the largest Ray worker process
            "driver_mb_at": _memory_at(samples, (10_000, 100_000, 500_000, 1_000_000)),
        },
    )
    (args.root / f"{args.output}.samples.json").write_text(json.dumps(samples))


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _settled(samples: list[dict], before: int, total: int) -> float | None:
    """Rows per second between the first sample past 10% of the rows still to do and the last before 90%."""
    todo = total - before
    lo = [s for s in samples if s["rows"] - before >= 0.1 * todo]
    hi = [s for s in samples if s["rows"] - before <= 0.9 * todo]
    if not lo or not hi or hi[-1]["t"] <= lo[0]["t"]:
        return None
    return round((hi[-1]["rows"] - lo[0]["rows"]) / (hi[-1]["t"] - lo[0]["t"]), 1)


def _memory_at(samples: list[dict], marks: tuple[int, ...]) -> dict[str, int]:
    """The driver's peak RSS (MB) until the committed rows first reach each mark."""
    out = {}
    for mark in marks:
        upto = [s["driver_mb"] for s in samples if s["rows"] < mark]
        reached = [s for s in samples if s["rows"] >= mark]
        if reached:
            out[str(mark)] = max([*upto, reached[0]["driver_mb"]])
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", nargs="?", choices=("gen", "tokenizer", "ceilings", "driver", "vocab", "job"))
    p.add_argument("--job", choices=("tokenize", "pools"), default="tokenize")
    p.add_argument("--root", type=Path, default=Path("/tmp/scale"))
    p.add_argument("--images", type=int, default=0, help="gen: how many; job: 0 = tars x per-tar")
    p.add_argument("--per-tar", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--decode-tars", type=int, default=16)
    p.add_argument("--source", default="wds")
    p.add_argument("--output", default="corpus")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--kill-at", type=float, default=0.0)
    p.add_argument("--budget", type=float, default=0.0, help="job: kill the driver after S seconds")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("extra", nargs="*", default=[], help="job: more key=value overrides")
    args = p.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    if args.smoke and args.step is None:  # every step, tiny, on the CPU
        base = ["--root", str(args.root), "--smoke", "--per-tar", "40", "--workers", "2"]
        main(["gen", *base, "--images", "200"])
        main(["tokenizer", *base])
        main(["ceilings", *base, "--batch", "8", "--reps", "2", "--warmup", "1", "--decode-tars", "2"])
        main(["driver", *base, "--shard-size", "64"])
        main(
            [
                "job",
                *base,
                "--source",
                "wds",
                "--output",
                "c",
                "--shard-size",
                "20",
                "--batch",
                "16",
                "--kill-at",
                "0.5",
            ]
        )
        main(["job", *base, "--source", "wds", "--output", "c", "--shard-size", "20", "--batch", "16"])
        main(["vocab", *base])
        main(
            [
                "job",
                *base,
                "--job",
                "pools",
                "--source",
                "sub10k",
                "--output",
                "p",
                "--shard-size",
                "20",
                "--batch",
                "16",
                "--images",
                "200",
            ]
        )
        return 0
    steps = {
        "gen": gen,
        "tokenizer": tokenizer,
        "ceilings": ceilings,
        "driver": driver,
        "vocab": vocab,
        "job": job,
    }
    steps[args.step](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
