"""Settled throughput of a Ray Data pipeline, measured at the driver (the stage benchmarks' Ray figures).

``settled_throughput`` drains a dataset and stamps every batch's arrival. The first ``warmup`` batches
are not counted: actor start, model load, compilation, the pipeline filling up. The clock runs from the
arrival of the last of them to the arrival of the last batch, and counts the rows of the batches in
between; with many timed batches the bias of one batch already under way when the clock starts
(timing from the first batch out instead) shrinks to ``1 / batches``.
The median gap between arrivals is reported beside it (a steady-state rate that ignores stalls).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def settled_throughput(ds: Any, count: Callable[[dict], int], warmup: int = 2) -> dict[str, float]:
    """Drain ``ds``; rows/s over the batches after the first ``warmup`` (see the module docstring)."""
    if warmup < 1:
        raise ValueError(f"warmup: {warmup} must be >= 1 (the clock starts at a batch's arrival)")
    start = time.perf_counter()
    stamps: list[float] = []
    rows: list[int] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        stamps.append(time.perf_counter())
        rows.append(count(batch))
    if len(stamps) < warmup + 1:
        raise ValueError(
            f"{len(stamps)} batches: need at least {warmup + 1} to time one after {warmup} warm-up batches; "
            "give the benchmark more rows"
        )
    timed_rows = sum(rows[warmup:])
    seconds = stamps[-1] - stamps[warmup - 1]
    gaps = [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:], strict=False)]  # [timed batches]
    per_batch = statistics.median(rows[warmup:])
    return {
        "rows": timed_rows,
        "batches": len(stamps) - warmup,  # timed batches
        "warmup_batches": warmup,
        "seconds": seconds,
        "rows_per_s": timed_rows / seconds if seconds > 0 else 0.0,
        "median_gap_rows_per_s": per_batch / statistics.median(gaps) if statistics.median(gaps) > 0 else 0.0,
        "first_batch_s": stamps[0] - start,  # start-up: actors, model load, first batch
        "total_s": stamps[-1] - start,
    }
