"""The Ray Data wiring of the pipeline, in one place.

Stage classes elsewhere are Ray-free callables (``__init__`` loads the model, ``__call__(batch) ->
batch`` on numpy dicts) and are unit-tested without a cluster; ``map_stage`` puts one on an actor
pool. ``run_sharded_job`` is the shape every image job shares::

    pending input shards -> ray.data.from_items -> read + decode (tasks, one shard per call)
        -> model stages (actor pools) -> iter_batches on the driver -> ShardWriter (exactly once)

Rows carry ``KEEP`` columns end to end; rows with an ``error`` pass through the model stages
untouched (``ok_rows`` tells a stage which rows to compute) and land in ``_errors.parquet``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.images import decode_table
from pipeline.progress import bar as progress_bar
from pipeline.schemas import error_mask
from pipeline.shards import ShardWriter
from pipeline.sources import Shard, read_shard
from pipeline.storage import Location

KEEP = ("shard_id", "image_id", "source", "label", "path", "error", "error_stage")


def ok_rows(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """bool ``[n]``: rows without an error, the ones a model stage computes."""
    return ~error_mask(batch["error"])


def carry(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The bookkeeping columns a stage hands on unchanged."""
    return {k: batch[k] for k in KEEP if k in batch}


def read_and_decode(
    batch: dict[str, np.ndarray], image_size: int, max_pixels: int = 50_000_000, fit: str = "auto"
) -> dict[str, np.ndarray]:
    """``{"shard": [json]}`` -> one row per image: ``KEEP`` columns + ``pixels`` uint8 ``[n, H, W, 3]``."""
    tables = []
    for text in batch["shard"]:
        shard = Shard.from_json(str(text))
        table = read_shard(shard)
        tables.append(
            table.append_column("shard_id", pa.array([shard.shard_id] * table.num_rows, pa.string()))
        )
    decoded = decode_table(pa.concat_tables(tables), image_size, max_pixels=max_pixels, fit=fit)
    return {**carry(decoded), "pixels": decoded["pixels"]}


def map_stage(
    ds: Any,
    stage_cls: type,
    *,
    constructor_kwargs: Mapping[str, Any] | None = None,
    actors: int = 1,
    batch_size: int = 256,
    num_gpus: float = 0,
    num_cpus: float = 1,
) -> Any:
    """Run a Ray-free stage class on an actor pool of ``actors`` (each loads the model once)."""
    import ray

    return ds.map_batches(
        stage_cls,
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs=dict(constructor_kwargs or {}),
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        batch_size=batch_size,
        batch_format="numpy",
    )


@dataclass(frozen=True)
class ShardedJobResult:
    manifest: dict[str, Any]
    shards_total: int
    shards_run: int  # shards computed by this run (the rest were already committed)
    rows_run: int  # rows (written + errors) committed by this run
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.rows_run / self.seconds if self.seconds > 0 else 0.0


def run_sharded_job(
    shards: list[Shard],
    output: Location | str,
    schema: pa.Schema,
    *,
    image_size: int,
    model_stages: Callable[[Any], Any],
    identity: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    max_pixels: int = 50_000_000,
    fit: str = "auto",
    read_cpus: float = 1,
    progress: bool = True,
    on_commit: Callable[[str], None] | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
    sidecars: Callable[[str, pa.Table], Mapping[str, bytes]] | None = None,
) -> ShardedJobResult:
    """Compute the pending shards of ``output`` and commit each exactly once; see the module docstring.

    ``model_stages(ds) -> ds`` adds the job's stages (usually ``map_stage`` calls) after decoding;
    their output must hold ``KEEP`` and the ``schema`` columns. ``on_commit(shard_id)`` is called
    right after each commit (progress hooks, tests that interrupt a run).
    """
    import ray

    writer = ShardWriter(
        output, shards, schema, identity=identity, config=config, sidecars=sidecars, on_commit=on_commit
    )
    todo = writer.pending()
    start = time.perf_counter()
    rows = 0
    if todo:
        ds = ray.data.from_items([{"shard": s.to_json()} for s in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            read_and_decode,
            batch_size=1,
            batch_format="numpy",
            num_cpus=read_cpus,
            fn_kwargs={"image_size": image_size, "max_pixels": max_pixels, "fit": fit},
        )
        ds = model_stages(ds)
        bar = progress_bar(sum(s.num_rows for s in todo), "images", "img", progress)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                n = len(batch["shard_id"])
                writer.add(batch)
                rows += n
                bar.update(n)
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    manifest = writer.finish(extra=manifest_extra)
    return ShardedJobResult(manifest, len(shards), len(todo), rows, seconds)
