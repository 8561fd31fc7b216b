"""The stage runner: ``StageSpec``, the same specs on Ray Data (``run_sharded_job``, ``map_stages``) and in
this process (``StageChain``, ``run_in_process``)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.inputs.images import DecodeOptions
from pipeline.inputs.sources import SourceConfig, list_shards
from pipeline.outputs.shards import read_manifest, read_output
from pipeline.runtime.stages import (
    StageChain,
    StageSpec,
    carry,
    map_stage,
    ok_rows,
    read_and_decode,
    run_in_process,
    run_sharded_job,
)

SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.int64()), ("mean", pa.float32())])
SOURCE = SourceConfig(uri="mnist://test?limit=20", shard_size=8)
DECODE = DecodeOptions(8)


@dataclass(frozen=True)
class MeanConfig:
    scale: float = 1.0


@dataclass(frozen=True)
class AffineConfig:
    mul: float
    add: float


class MeanStage:
    """``pixels`` -> ``mean`` (times ``scale``) of each ok row; counts how often it is built."""

    built = 0

    def __init__(self, config: MeanConfig):
        type(self).built += 1
        self.scale = config.scale

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = ok_rows(batch)
        mean = np.zeros(len(ok), np.float32)
        mean[ok] = batch["pixels"][ok].reshape(ok.sum(), -1).mean(axis=1) * self.scale
        return {**carry(batch), "mean": mean}


class AffineStage:
    def __init__(self, config: AffineConfig):
        self.config = config

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**batch, "mean": (batch["mean"] * self.config.mul + self.config.add).astype(np.float32)}


@dataclass
class LooseConfig:  # not frozen
    scale: float = 1.0


@dataclass(frozen=True)
class ListConfig:  # frozen, but unhashable
    values: list


def _specs(task_stage: bool = False) -> list[StageSpec]:
    """Three stages; a quarter CPU each, so that two actor pools and the read tasks fit the 2-CPU test
    cluster."""
    middle = {"actors": 0} if task_stage else {}
    return [
        StageSpec(MeanStage, MeanConfig(scale=2.0), batch_size=4, num_cpus=0.25),
        StageSpec(AffineStage, AffineConfig(mul=3.0, add=0.0), batch_size=4, num_cpus=0.25, **middle),
        StageSpec(AffineStage, AffineConfig(mul=1.0, add=5.0), batch_size=4, num_cpus=0.25),
    ]


def _expected() -> dict[str, float]:
    """image_id -> (2 * mean) * 3 + 5, decoded and computed here without any runner."""
    out = {}
    for shard in list_shards(SOURCE):
        batch = read_and_decode({"shard": np.array([shard.to_json()], dtype=object)}, DECODE)
        means = batch["pixels"].reshape(len(batch["image_id"]), -1).mean(axis=1)
        out.update({str(i): m * 2.0 * 3.0 + 5.0 for i, m in zip(batch["image_id"], means, strict=True)})
    return out


def test_spec_takes_one_frozen_config_and_checks_its_resources():
    with pytest.raises(TypeError, match="MeanStage: its config must be a frozen dataclass, got dict"):
        StageSpec(MeanStage, {"scale": 2.0})
    with pytest.raises(TypeError, match="got LooseConfig"):
        StageSpec(MeanStage, LooseConfig())
    with pytest.raises(ValueError, match=r"actors \(-1\) >= 0"):
        StageSpec(MeanStage, MeanConfig(), actors=-1)
    with pytest.raises(ValueError, match=r"batch_size \(0\) >= 1"):
        StageSpec(MeanStage, MeanConfig(), batch_size=0)
    with pytest.raises(TypeError, match="a task stage's config must be hashable"):
        StageSpec(MeanStage, ListConfig([1]), actors=0)
    StageSpec(MeanStage, ListConfig([1]))  # an actor stage's config need not be hashable
    spec = StageSpec(MeanStage, MeanConfig(scale=3.0))
    assert spec.build().scale == 3.0


def test_chain_builds_each_stage_once_and_calls_them_in_order():
    MeanStage.built = 0
    chain = StageChain(_specs())
    assert MeanStage.built == 1
    batch = {
        "image_id": np.array(["a", "b"], dtype=object),
        "error": np.array([None, "undecodable: x"], dtype=object),
        "pixels": np.full((2, 2, 2, 3), 10, np.uint8),
    }
    for _ in range(3):
        out = chain(batch)
    assert MeanStage.built == 1  # built once, called batch by batch
    np.testing.assert_allclose(out["mean"], [10 * 2 * 3 + 5, 5])  # (2m) * 3 + 5: the specs' order
    assert list(out["image_id"]) == ["a", "b"] and out["error"][1] == "undecodable: x"


def test_run_in_process_runs_the_specs_it_is_given_then_the_driver_stage(tmp_path):
    seen = []

    def driver(batch):
        seen.append(len(batch["image_id"]))
        return {**batch, "mean": batch["mean"] - 5.0}

    result = run_in_process(
        list_shards(SOURCE),
        str(tmp_path / "out"),
        SCHEMA,
        decode=DECODE,
        stages=_specs(),
        identity={"test": "runner"},
        driver_stage=driver,
    )
    assert (result.shards_total, result.shards_run, result.rows_run) == (3, 3, 20)
    assert seen == [8, 8, 4]  # one batch a shard
    table = read_output(str(tmp_path / "out"))
    got = dict(zip(table.column("image_id").to_pylist(), table.column("mean").to_pylist(), strict=True))
    want = {k: v - 5.0 for k, v in _expected().items()}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], rtol=1e-6)
    again = run_in_process(
        list_shards(SOURCE),
        str(tmp_path / "out"),
        SCHEMA,
        decode=DECODE,
        stages=_specs(),
        identity={"test": "runner"},
    )
    assert again.shards_run == 0  # committed shards are skipped


def test_the_same_specs_on_ray_give_the_in_process_output(ray_cluster, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    try:
        ray_result = run_sharded_job(
            list_shards(SOURCE),
            str(tmp_path / "ray"),
            SCHEMA,
            decode=DECODE,
            stages=_specs(task_stage=True),  # the middle stage as Ray tasks, the others on actor pools
            identity={"test": "runner"},
            progress=False,
            task_rows=4,
        )
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    run_in_process(
        list_shards(SOURCE),
        str(tmp_path / "local"),
        SCHEMA,
        decode=DECODE,
        stages=_specs(),
        identity={"test": "runner"},
    )
    assert ray_result.rows_run == 20 and read_manifest(str(tmp_path / "ray"))["rows_written"] == 20
    a = read_output(str(tmp_path / "ray")).sort_by("image_id")
    b = read_output(str(tmp_path / "local")).sort_by("image_id")
    assert a.equals(b)
    want = _expected()
    np.testing.assert_allclose(a.column("mean").to_numpy(), [want[k] for k in sorted(want)], rtol=1e-6)


@dataclass(frozen=True)
class SlowBuildConfig:
    folder: str
    delay_s: float = 1.5


class SlowBuildStage:
    """Takes ``delay_s`` to build (a model load), then stamps the time it was built."""

    def __init__(self, config: SlowBuildConfig):
        time.sleep(config.delay_s)
        (Path(config.folder) / f"built-{os.getpid()}").write_text(repr(time.time()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return batch


def _stamp_read(batch: dict[str, np.ndarray], folder: str) -> dict[str, np.ndarray]:
    (Path(folder) / f"read-{int(batch['x'][0])}").write_text(repr(time.time()))
    return batch


def _read_then_slow_actor(folder: Path, wait: bool) -> tuple[list[float], float]:
    import ray

    ds = ray.data.from_items([{"x": i} for i in range(4)], override_num_blocks=4)
    ds = ds.map_batches(
        _stamp_read,
        fn_kwargs={"folder": str(folder)},
        batch_size=1,
        ray_remote_args_fn=lambda: {"num_cpus": 1},  # kept apart from the actor stage, as in the jobs
    )
    out = map_stage(ds, StageSpec(SlowBuildStage, SlowBuildConfig(str(folder)), batch_size=2))
    if not wait:
        out.context.wait_for_min_actors_s = -1  # Ray Data's default: actors start beside the reads
    assert sorted(r["x"] for r in out.take_all()) == [0, 1, 2, 3]
    reads = [float(p.read_text()) for p in folder.glob("read-*")]
    (built,) = [float(p.read_text()) for p in folder.glob("built-*")]
    return reads, built


def test_reads_start_once_the_first_actor_is_built(ray_cluster, tmp_path):
    """A model's load and compilation run before the reads take the cores (ACTOR_START_S): every read
    starts after the actor is built; with Ray Data's default they start during its build."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        (tmp_path / "wait").mkdir()
        reads, built = _read_then_slow_actor(tmp_path / "wait", wait=True)
        assert len(reads) == 4 and min(reads) >= built
        (tmp_path / "default").mkdir()
        reads, built = _read_then_slow_actor(tmp_path / "default", wait=False)
        assert min(reads) < built
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
