"""Shared helpers of the benchmarks: timing, the device line, the random paper-scale codebook.

Every benchmark prints its baseline measured in the same run and the ratio, and with ``--json PATH``
writes its figures for ``docs/BENCHMARKS.md``. ``--smoke`` runs tiny sizes on the CPU in seconds.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def device_line(device: torch.device) -> str:
    """What ran the numbers: GPU name and torch/CUDA versions, or the CPU."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (
            f"{p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    return f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_codebook(v: int, c: int, seed: int = 0) -> Any:
    """A FrozenCodebook of ``v`` random unit-norm rows (same FLOPs as a real LLM table)."""
    from spae.codebook import FrozenCodebook

    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(v, c, generator=g), dim=1)  # [v, c]
    words = [f"w{i}" for i in range(v)]
    return FrozenCodebook(emb, words, words, list(range(v)), {"source": f"random {v}x{c}"})


def smooth_images(b: int, size: int, seed: int, device: torch.device) -> torch.Tensor:
    """[b, 3, size, size] in [0, 1]: upsampled low-resolution noise (learnable, unlike white noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, max(1, size // 8), max(1, size // 8), generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").to(device)


def peak_tflops(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul rate (TFLOP/s) of an n x n x n product: the ceiling MFU is quoted against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * n**3 / t / 1e12


def write_json(path: str | None, record: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2, default=str))


def pick_device(smoke: bool) -> torch.device:
    if smoke or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def uint8_rows(pixels: np.ndarray, start: int) -> dict[str, np.ndarray]:
    """Decoded stage rows (``KEEP`` columns + ``pixels``) for uint8 images ``[n, H, W, 3]``."""
    n = len(pixels)
    return {
        "image_id": np.array([f"img{start + i}" for i in range(n)], dtype=object),
        "shard_id": np.array(["s0"] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
        "error_stage": np.array([None] * n, dtype=object),
        "pixels": pixels,
    }


def uint8_block(batch: dict[str, np.ndarray], size: int, per_block: int) -> dict[str, np.ndarray]:
    """Ray Data source: one block of ``per_block`` random uint8 images (seeded by the block) per input row."""
    start = int(batch["i"][0]) * per_block
    rng = np.random.default_rng(start)
    return uint8_rows(rng.integers(0, 256, size=(per_block, size, size, 3), dtype=np.uint8), start)


def open_clip_scorer(arch: str, precision: str, device: torch.device) -> dict[str, Any]:
    """The scorer config of a random-weight open_clip model (same FLOPs as the real one)."""
    return dict(kind="open_clip", arch=arch, pretrained="", precision=precision, device=str(device))


def ray_init(device: torch.device) -> None:
    import os

    import ray

    ray.init(
        num_cpus=os.cpu_count(),
        num_gpus=1 if device.type == "cuda" else 0,
        include_dashboard=False,
        log_to_driver=False,
    )


TINY_CLIP = "bench-tiny-clip"


def register_tiny_clip() -> str:
    """Register a 2-layer, width-64 open_clip architecture (32px images) for ``--smoke`` runs on the CPU."""
    from open_clip import factory

    factory._MODEL_CONFIGS.setdefault(
        TINY_CLIP,
        {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        },
    )
    return TINY_CLIP
