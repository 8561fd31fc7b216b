"""The Ray Data wiring of the pipeline, in one place.

Stage classes elsewhere are Ray-free callables (``__init__(config)`` loads the model from its one
frozen config, ``__call__(batch) -> batch`` on numpy dicts) and are unit-tested without a cluster. A
``StageSpec`` names one: the class, its config and its resources. ``map_stages`` runs a list of specs
on Ray Data (``map_stage`` for each: an actor pool, or tasks); ``StageChain`` runs the same list in
this process (each class built once, called batch by batch). ``run_sharded_job`` is the shape every
image job shares, and ``run_in_process`` the same job without Ray::

    pending input shards -> pieces of <= task_rows rows -> ray.data.from_items (one block a piece)
        -> read + decode (tasks, one piece per task; DecodeOptions) -> model stages (map_stages)
        -> iter_batches on the driver -> driver_stage -> ShardWriter (commits each shard once all
           its rows arrived; its Parquet is encoded on ``ENCODE_THREADS`` threads, the commits stay
           on the driver, in order)

Commit as you go, whatever the shard size: each Ray task maps to bounded work. A shard is split into
pieces of at most ``task_rows`` rows (``shard_piece``), one input row and block each; the read task
is kept apart from the model's actor stage (Ray Data would otherwise fuse them, and the fused
operator bundles ``batch_size`` *input rows*, i.e. that many whole shards, into one task whose output
reaches the driver only at its end: ``TokenizeStage): 0/1``). An actor call then gets one piece (a
bundle of >= ``batch_size`` rows), and its output block reaches the driver when that piece is done,
so a shard commits as soon as its last piece arrives. Pieces are submitted in shard order. Keep
cheap per-row work after the model on the driver (``driver_stage``), not in a task stage after the
actors: on a small cluster such tasks starve behind the reads and hold the outputs back (measured:
0 of 2 finished shards committed at a fault at 83%, 2 of 2 without that stage). An exception
raised inside Ray (a crashed actor, a bug outside the model call) aborts the whole dataset, and
what is still in flight is lost, finished shards included (measured: 7 of 8 finished shards
committed at a fault at 85% of 10,000 images); a model call that gives up therefore marks its rows
instead of raising (below), and the driver commits everything before them (8 of 8).

Rows carry ``KEEP`` columns end to end; rows with an ``error`` pass through the model stages
untouched (``ok_rows`` tells a stage which rows to compute) and land in ``.spae/errors.pq``. Error
rows are per-image data errors only (read, decode: ``pipeline.inputs.images``). A model stage that raises
(out of memory, a device or storage fault, a bug) is retried ``model_retries`` times on the same
batch (``call_with_retries``), then gives up: it marks the batch's rows ``FATAL_STAGE`` (``mark_fatal``;
raising would make Ray Data abort and drop the outputs in flight), the driver commits the shards
that completed before and stops with that reason (``JobFailure``); that shard is not committed, and
a re-run resumes.
``max_error_fraction`` fails a finished job (``TooManyErrors``, after its commits) whose error rows
exceed that fraction of its input; ``retry_errors`` recomputes the committed shards that have errors.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from pipeline.inputs.images import DecodeOptions, decode_table
from pipeline.inputs.sources import Shard, cut_shard, read_shard
from pipeline.outputs.contracts import meta_file
from pipeline.outputs.schemas import error_mask
from pipeline.outputs.shards import ShardWriter
from pipeline.runtime.progress import bar as progress_bar
from pipeline.runtime.storage import Location, StorageError

KEEP = ("shard_id", "image_id", "source", "label", "caption", "path", "error", "error_stage")
TASK_ROWS = 256  # rows per read task and per piece of a shard at most (run_sharded_job's task_rows)
MODEL_RETRIES = 2  # tries of a failing model call after the first, before the job fails
MAX_ERROR_FRACTION = 0.05  # error rows above this fraction of the input fail the job (1.0 = never)
RETRY_DELAY_S = 1.0
ENCODE_THREADS = 2  # threads encoding committed shards' Parquet beside the driver loop (ShardWriter)
# Ray Data calls in flight on one actor (``max_concurrent_calls_per_actor``): the stage still runs one
# batch at a time, while Ray turns the next block into a batch and the last output into a block
CALLS_PER_ACTOR = 2
# Ray Data starts the reads only once an actor pool's first actor is built (``wait_for_min_actors_s``):
# its model load and compilation then run on idle cores, not beside 15 decoding processes, and a pool
# that can never be placed fails after this long instead of waiting forever
ACTOR_START_S = 600

log = logging.getLogger(__name__)
T = TypeVar("T")


class StageFailure(RuntimeError):
    """A model stage kept failing on a batch (not a property of the images): the job stops."""


class JobFailure(RuntimeError):
    """A sharded job stopped; the message names the output, what was committed and the cause."""


class TooManyErrors(JobFailure):
    """More error rows than ``max_error_fraction`` allows (the rows are committed)."""


def check_reliability(model_retries: int, max_error_fraction: float) -> None:
    """ValueError naming the field, for the job configs' ``__post_init__``."""
    if model_retries < 0:
        raise ValueError(f"model_retries: must be >= 0, got {model_retries}")
    if not 0.0 <= max_error_fraction <= 1.0:
        raise ValueError(f"max_error_fraction: must lie in [0, 1] (1 = never fail), got {max_error_fraction}")


def call_with_retries(fn: Callable[[], T], what: str, retries: int, delay_s: float | None = None) -> T:
    """``fn()``; on any exception retry up to ``retries`` times (``delay_s`` doubling), then raise
    ``StageFailure`` naming ``what`` and the last error. For model calls, whose failures are faults of
    the machine or the code, never of an image (those are error rows before the model runs)."""
    delay_s = RETRY_DELAY_S if delay_s is None else delay_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - retried, then re-raised as StageFailure
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if attempt == retries:
                raise StageFailure(f"{what} failed {retries + 1} times; last error: {reason}") from e
            log.warning("%s failed (%s); retry %d of %d", what, reason, attempt + 1, retries)
            time.sleep(delay_s * 2**attempt)
    raise AssertionError("unreachable")


FATAL_STAGE = "stage-failure"  # error_stage of rows whose model call gave up: never committed


def fatal_reason(batch: Mapping[str, np.ndarray]) -> str | None:
    """The reason of the first row a stage gave up on (``mark_fatal``), None if there is none."""
    stages = batch.get("error_stage")
    if stages is None:
        return None
    hits = np.flatnonzero(np.asarray(stages, dtype=object) == FATAL_STAGE)
    return str(batch["error"][hits[0]]) if len(hits) else None


def mark_fatal(error: np.ndarray, stage: np.ndarray, rows: np.ndarray, e: StageFailure) -> None:
    """Mark ``rows`` as given up on (in place). A stage returns them in its normal schema instead of
    raising: Ray Data would abort the dataset and drop every output still in flight, finished shards
    included; the driver commits what came before and stops at the first such row."""
    error[rows] = str(e).splitlines()[0]
    stage[rows] = FATAL_STAGE


def batch_shards(batch: Mapping[str, np.ndarray]) -> str:
    """The shard ids of a batch's rows, for messages (``00003`` or ``00003, 00004``)."""
    ids = batch.get("shard_id")
    return ", ".join(sorted({str(s) for s in ids})) if ids is not None and len(ids) else "?"


def shard_piece(shard: Shard, start: int, stop: int) -> Shard:
    """Rows ``[start, stop)`` of ``shard`` as a shard of its own (same id and digest): ``read_shard``
    of it reads only those rows. Its source kind cuts the items (``pipeline.inputs.sources.cut_shard``)."""
    piece = cut_shard(shard, start, stop)
    if piece is None:
        raise ValueError(f"shard {shard.shard_id}: cannot cut a '{shard.kind}' shard into row ranges")
    return piece


def shard_pieces(shards: list[Shard], task_rows: int) -> list[Shard]:
    """Every shard cut into pieces of at most ``task_rows`` rows, in shard order (a shard its kind
    cannot cut stays whole: one task; e.g. a WebDataset shard rebuilt from JSON, without the byte
    offsets of its samples)."""
    pieces: list[Shard] = []
    for s in shards:
        cut = [cut_shard(s, a, min(a + task_rows, s.num_rows)) for a in range(0, s.num_rows, task_rows)]
        pieces += [s] if None in cut else cut
    return pieces


def ok_rows(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """bool ``[n]``: rows without an error, the ones a model stage computes."""
    return ~error_mask(batch["error"])


def carry(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The bookkeeping columns a stage hands on unchanged."""
    return {k: batch[k] for k in KEEP if k in batch}


def read_and_decode(batch: dict[str, np.ndarray], decode: DecodeOptions) -> dict[str, np.ndarray]:
    """``{"shard": [json]}`` -> one row per image: ``KEEP`` columns + ``pixels`` uint8 ``[n, H, W, 3]``
    (clips ``[n, T, H, W, 3]``)."""
    tables = []
    for text in batch["shard"]:
        shard = Shard.from_json(str(text))
        table = read_shard(shard)
        tables.append(
            table.append_column("shard_id", pa.array([shard.shard_id] * table.num_rows, pa.string()))
        )
    decoded = decode_table(pa.concat_tables(tables), decode)
    return {**carry(decoded), "pixels": decoded["pixels"]}


# ----------------------------------------------------------------------------- stage specs and runners


@dataclass(frozen=True)
class StageSpec:
    """One model stage, typed: ``stage`` is the Ray-free class (``stage(config)`` loads the model once,
    ``__call__(batch) -> batch``), ``config`` its one frozen config (Ray pickles it to the workers).

    Resources: ``actors`` > 0 runs it on an actor pool of up to that many actors, each with ``num_gpus``
    GPUs and ``num_cpus`` CPUs; ``actors = 0`` runs it as Ray tasks (cheap CPU work beside the actors,
    e.g. tokenizing prompts; each worker process builds the stage once). ``batch_size`` rows per call.
    """

    stage: type
    config: Any
    actors: int = 1
    batch_size: int = 256
    num_gpus: float = 0
    num_cpus: float = 1
    calls_per_actor: int = CALLS_PER_ACTOR

    def __post_init__(self) -> None:
        name = getattr(self.stage, "__name__", repr(self.stage))
        params = getattr(type(self.config), "__dataclass_params__", None)
        if params is None or not params.frozen:
            raise TypeError(
                f"{name}: its config must be a frozen dataclass, got {type(self.config).__name__}"
            )
        if (
            self.actors < 0
            or self.batch_size < 1
            or self.num_gpus < 0
            or self.num_cpus < 0
            or self.calls_per_actor < 1
        ):
            raise ValueError(
                f"{name}: actors ({self.actors}) >= 0, batch_size ({self.batch_size}) >= 1, num_gpus "
                f"({self.num_gpus}) >= 0, num_cpus ({self.num_cpus}) >= 0 and calls_per_actor "
                f"({self.calls_per_actor}) >= 1 are required"
            )
        if self.actors == 0:
            try:
                hash(self.config)  # a task worker keeps one stage per class and config
            except TypeError as e:
                raise TypeError(f"{name}: a task stage's config must be hashable ({e})") from e

    def build(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """The stage itself (loads its model)."""
        return self.stage(self.config)


def map_stage(ds: Any, spec: StageSpec) -> Any:
    """One spec on a Ray dataset. An actor pool of up to ``spec.actors`` (each builds the stage once)
    may shrink to one actor: a cluster that loses a node, or never had room for every actor beside the
    read tasks, goes on with fewer instead of waiting for resources it lacks. The dataset runs nothing
    until the pool's first actor is built (``ACTOR_START_S``)."""
    import ray

    if spec.actors == 0:
        return ds.map_batches(
            _task_stage,
            fn_kwargs={"spec": spec},
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus,
            batch_size=spec.batch_size,
            batch_format="numpy",
        )
    out = ds.map_batches(
        spec.stage,
        compute=ray.data.ActorPoolStrategy(
            min_size=1,
            max_size=spec.actors,
            max_concurrent_calls_per_actor=spec.calls_per_actor,
            enable_true_multi_threading=False,  # one batch at a time in the stage (one GPU's model)
        ),
        fn_constructor_args=(spec.config,),
        num_gpus=spec.num_gpus,
        num_cpus=spec.num_cpus,
        batch_size=spec.batch_size,
        batch_format="numpy",
    )
    out.context.wait_for_min_actors_s = ACTOR_START_S  # this dataset's own copy of the context
    return out


def map_stages(ds: Any, specs: Sequence[StageSpec]) -> Any:
    """The specs on a Ray dataset, in order (``map_stage`` for each)."""
    for spec in specs:
        ds = map_stage(ds, spec)
    return ds


_TASK_STAGES: dict[tuple[str, str, Any], Any] = {}  # the stages a task worker process has built


def _task_stage(batch: dict[str, np.ndarray], spec: StageSpec) -> dict[str, np.ndarray]:
    """A task stage's call: the worker process builds the stage on its first batch and keeps it (keyed
    by the class's name and the config: each task unpickles its own copy of the spec)."""
    key = (spec.stage.__module__, spec.stage.__qualname__, spec.config)
    if key not in _TASK_STAGES:
        _TASK_STAGES[key] = spec.build()
    return _TASK_STAGES[key](batch)


class StageChain:
    """The specs' stages in this process, no Ray: each class built once, then every batch given to
    ``__call__`` goes through them in order (the caller picks the batches; resources are unused)."""

    def __init__(self, specs: Sequence[StageSpec]):
        self.stages = [spec.build() for spec in specs]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for stage in self.stages:
            batch = stage(batch)
        return batch


@dataclass(frozen=True)
class ShardedJobResult:
    manifest: dict[str, Any]
    shards_total: int
    shards_run: int  # shards computed by this run (the rest were already committed)
    rows_run: int  # rows (written + errors) committed by this run
    seconds: float
    first_batch_s: float | None = None  # seconds until the first batch reached the driver (None: no batch)

    @property
    def images_per_s(self) -> float:
        return self.rows_run / self.seconds if self.seconds > 0 else 0.0


def run_sharded_job(
    shards: list[Shard],
    output: Location | str,
    schema: pa.Schema,
    *,
    decode: DecodeOptions,
    stages: Sequence[StageSpec],
    identity: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    read_cpus: float = 1,
    progress: bool = True,
    on_commit: Callable[[str], None] | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
    sidecars: Callable[[str, pa.Table], Mapping[str, bytes]] | None = None,
    task_rows: int = TASK_ROWS,
    max_error_fraction: float = MAX_ERROR_FRACTION,
    retry_errors: bool = False,
    driver_stage: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> ShardedJobResult:
    """Compute the pending shards of ``output`` and commit each exactly once; see the module docstring.

    Rows are decoded by ``decode``, then go through ``stages`` (``map_stages``), whose output must hold
    ``KEEP`` and the ``schema`` columns. ``on_commit(shard_id)`` is called
    right after each commit (progress hooks, tests that interrupt a run). ``task_rows``: rows per read
    task at most (give at least the model's batch size). Raises ``JobFailure`` when a stage fails (the
    shards committed before stay), ``TooManyErrors`` when the finished output has more error rows than
    ``max_error_fraction`` of its input; ``retry_errors`` recomputes committed shards with error rows.
    ``driver_stage(batch) -> batch`` runs on the driver on each batch before the writer (cheap CPU
    work, e.g. the corpus's words: no Ray stage between the actors and the commits, see below).
    """
    import ray

    if task_rows < 1:
        raise ValueError(f"task_rows: must be >= 1, got {task_rows}")
    writer = ShardWriter(
        output,
        shards,
        schema,
        identity=identity,
        config=config,
        sidecars=sidecars,
        on_commit=on_commit,
        threads=ENCODE_THREADS,
    )
    todo = writer.pending(retry_errors=retry_errors)
    start = time.perf_counter()
    rows, first_batch_s = 0, None
    if todo:
        pieces = shard_pieces(todo, task_rows)
        ds = ray.data.from_items([{"shard": p.to_json()} for p in pieces], override_num_blocks=len(pieces))
        with warnings.catch_warnings():  # ray_remote_args_fn is deprecated from Ray 2.61 (works in 2.60)
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(
                read_and_decode,
                batch_size=1,  # one piece per task
                batch_format="numpy",
                num_cpus=read_cpus,
                fn_kwargs={"decode": decode},
                # a remote-args function keeps Ray Data from fusing the reads into the actor stage,
                # whose bundles would then hold batch_size pieces (see the module docstring)
                ray_remote_args_fn=lambda: {"num_cpus": read_cpus},
            )
        ds = map_stages(ds, stages)
        bar = progress_bar(sum(s.num_rows for s in todo), "images", "img", progress)
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        failure: BaseException | None = None
        try:
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except Exception as e:  # a stage failed (Ray wraps it): one line naming the cause
                    failure = stopped(writer, len(todo), _cause(e))
                    break
                reason = fatal_reason(batch)
                if reason is not None:  # a stage gave up: what came before is committed, stop here
                    failure = stopped(writer, len(todo), reason)
                    break
                n = len(batch["shard_id"])
                if first_batch_s is None:  # start-up: the cluster's actors loaded, the pipeline full
                    first_batch_s = time.perf_counter() - start
                writer.add(driver_stage(batch) if driver_stage is not None else batch)
                rows += n
                bar.update(n)
        except StorageError as e:  # the output's storage failed past its retries: one line, re-run
            failure = stopped(writer, len(todo), str(e))
        except BaseException as e:  # the writer failed otherwise (a test hook, a bug): same clean-up
            failure = e
        finally:
            bar.close()
        if failure is not None:
            with contextlib.suppress(Exception):  # the shards computed before the fault still commit
                writer.flush()
            # drop every reference to the stopped dataset before raising, so its actors exit now: a
            # traceback holding them keeps their CPUs/GPUs, and a re-run in this process would wait
            # forever for a CPU (seen on the 2-CPU test cluster)
            del batches, ds
            gc.collect()
            raise failure
    seconds = time.perf_counter() - start
    manifest = writer.finish(extra=manifest_extra)
    check_error_fraction(writer.out.uri, manifest, max_error_fraction)  # after the commits: they are real
    return ShardedJobResult(manifest, len(shards), len(todo), rows, seconds, first_batch_s)


def run_in_process(
    shards: list[Shard],
    output: Location | str,
    schema: pa.Schema,
    *,
    decode: DecodeOptions,
    stages: Sequence[StageSpec],
    identity: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    on_commit: Callable[[str], None] | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
    sidecars: Callable[[str, pa.Table], Mapping[str, bytes]] | None = None,
    max_error_fraction: float = MAX_ERROR_FRACTION,
    retry_errors: bool = False,
    driver_stage: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    read_cpus: float = 1,
    progress: bool = True,
    task_rows: int = TASK_ROWS,
) -> ShardedJobResult:
    """``run_sharded_job`` without Ray, for small inputs and debugging: the same decoding, the same
    stages (``StageChain``: each built once, here), the same driver stage and exactly-once commits.
    Shards are computed one at a time, each as one batch; the arguments that only shape the Ray run
    (``read_cpus``, ``progress``, ``task_rows``) are accepted and unused."""
    del read_cpus, progress, task_rows
    writer = ShardWriter(
        output, shards, schema, identity=identity, config=config, sidecars=sidecars, on_commit=on_commit
    )
    todo = writer.pending(retry_errors=retry_errors)
    chain = StageChain(stages) if todo else None
    start, rows = time.perf_counter(), 0
    for shard in todo:
        batch = chain(read_and_decode({"shard": np.array([shard.to_json()], dtype=object)}, decode))
        reason = fatal_reason(batch)
        if reason is not None:
            raise stopped(writer, len(todo), reason)
        writer.add(driver_stage(batch) if driver_stage is not None else batch)
        rows += shard.num_rows
    seconds = time.perf_counter() - start
    manifest = writer.finish(extra=manifest_extra)
    check_error_fraction(writer.out.uri, manifest, max_error_fraction)
    return ShardedJobResult(manifest, len(shards), len(todo), rows, seconds)


def stopped(writer: ShardWriter, pending: int, cause: str) -> JobFailure:
    """The one-line ``JobFailure`` of a job that stops with some shards committed (the shards computed
    before the stop and still being encoded are committed first)."""
    with contextlib.suppress(Exception):  # a shard that cannot commit now stays pending for the re-run
        writer.flush()
    return JobFailure(
        f"{writer.out.uri}: job stopped after committing {len(writer.committed)} of {pending} pending "
        f"shards: {cause}. Committed shards are kept; run the job again to compute the rest."
    )


def check_error_fraction(uri: str, manifest: Mapping[str, Any], max_error_fraction: float) -> None:
    """``TooManyErrors`` naming the counts when a finished output has too many error rows."""
    errors, rows_in = manifest["errors"], manifest["rows_in"]
    if rows_in and errors / rows_in > max_error_fraction:
        raise TooManyErrors(
            f"{uri}: {errors} of {rows_in} images ({errors / rows_in:.1%}) are error rows, more than "
            f"max_error_fraction={max_error_fraction:g}; the reasons are in "
            f"{meta_file(uri, 'errors').uri}. "
            "Fix the input and re-run with retry_errors=true, or raise max_error_fraction."
        )


def _cause(e: BaseException) -> str:
    """The innermost message of a Ray-wrapped error: a ``StageFailure``'s text (as an object in the
    chain, or as the ``...StageFailure: <text>`` line Ray keeps of a remote one), else the root
    cause's type and its last line that names an error."""
    seen, stack, chain = set(), [e], []
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        chain.append(cur)
        if isinstance(cur, StageFailure) and not isinstance(cur, ray_task_error_types()):
            return str(cur).splitlines()[0]
        for nxt in (getattr(cur, "cause", None), cur.__cause__, cur.__context__):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    marker = f"{StageFailure.__module__}.{StageFailure.__name__}: "
    for cur in chain:
        for line in str(cur).splitlines():
            if marker in line:
                return line.split(marker, 1)[1].strip()
    root = chain[-1]
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    errs = [line for line in lines if "error" in line.lower()]
    text = errs[-1] if errs else (lines[-1] if lines else "")
    return f"{type(root).__name__}: {text[:300]}"


def ray_task_error_types() -> tuple[type, ...]:
    """Ray's wrapper of remote errors (whose ``str`` is the remote traceback, not the message)."""
    try:
        from ray.exceptions import RayTaskError

        return (RayTaskError,)
    except ImportError:  # pragma: no cover - ray is a dependency
        return ()
