"""The vocabulary job: eq. 5's text feature of every codebook token, as Parquet on local disk or S3.

::

    codebook (load_codebook) -> token rows, grouped into shards of ``shard_size`` rows
        -> PromptTokensStage (open_clip: the prompts tokenized by tasks on the CPUs)
        -> TextFeatureStage on an actor pool (GPU or CPU; each actor loads the scorer once)
           (both built from one TextFeatureConfig: text_feature_specs, pipeline.runtime.stages.map_stages)
        -> driver: + codebook columns -> ShardWriter (one ``part-<shard>.parquet`` each, exactly once)
        -> .spae/vocab_card.json (pipeline.outputs.contracts.VocabCard)

Output table (one row per codebook row, ``token_id`` order): ``token_id`` (codebook row),
``llm_id``, ``token``, ``word`` (display text), ``embedding`` (the codebook vector, list<float32>),
``text_feature`` (``f'_T(k)`` of eq. 5, list<float16>). ``vocab_card.json`` holds the codebook card,
the scorer identity, the templates, the row count and the shard list. ``load_vocab`` reads it back.

Shards are token-id ranges; their digest covers the codebook hash and the range, and the job
digest covers the scorer and the templates, so a re-run skips committed shards and refuses to
mix outputs of another codebook or scorer (``pipeline.outputs.shards``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from pipeline.inputs.sources import Shard, SourceConfig
from pipeline.outputs.contracts import VocabCard
from pipeline.outputs.shards import CommittedPart, ShardError, ShardWriter, part_name, read_output
from pipeline.runtime.progress import bar as progress_bar
from pipeline.runtime.ray_utils import RayConfig
from pipeline.runtime.stages import StageSpec, map_stages
from pipeline.runtime.storage import Location, as_location, resolve
from pipeline.runtime.tracking import MlflowConfig
from spae.codebook import CodebookConfig, FrozenCodebook, load_codebook
from spae.config import to_dict
from spae.scorers import (
    ScorerConfig,
    build_scorer,
    describe_scorer,
    prompt_token_ids,
    scorer_templates,
    text_tokenizer,
    token_text_features,
)

CARD = "vocab_card.json"
FORMAT = "spae-vocab-v1"
PROMPT_BATCH = 2048  # prompts per text-encoder call (tokens x templates), by default

VOCAB_SCHEMA = pa.schema(
    [
        ("token_id", pa.int64()),  # codebook row
        ("llm_id", pa.int64()),  # id in the LLM's vocabulary
        ("token", pa.string()),  # the LLM's token string ("##ing", "▁word")
        ("word", pa.string()),  # display text, unique
        ("embedding", pa.list_(pa.float32())),  # [c] codebook vector e(k)
        ("text_feature", pa.list_(pa.float16())),  # [d] f'_T(k), eq. 5
    ]
)


@dataclass(frozen=True)
class VocabJobConfig:
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    scorer: ScorerConfig = field(default_factory=lambda: ScorerConfig(kind="open_clip"))
    output: str = "outputs/vocab"  # local path, file:// or s3://bucket/prefix
    batch_size: int = 256  # tokens per actor call
    prompt_batch: int = PROMPT_BATCH  # prompts per text-encoder call (tokens x templates)
    actors: int = 1  # actor pool size
    num_gpus_per_actor: float = 0
    num_cpus_per_actor: float = 1
    shard_size: int = 8192  # tokens per output shard
    progress: bool = True
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError("output: empty; give a local path or s3://bucket/prefix")
        for name in ("batch_size", "prompt_batch", "actors", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_gpus_per_actor < 0 or self.num_cpus_per_actor < 0:
            raise ValueError("num_gpus_per_actor and num_cpus_per_actor must be >= 0")


# ----------------------------------------------------------------------------- the stage (Ray-free)


@dataclass(frozen=True)
class TextFeatureConfig:
    """What the vocab job's stages are built from (``text_feature_specs``)."""

    scorer: ScorerConfig
    templates: tuple[str, ...]  # eq. 5's prompt templates, "{}" where the word goes
    prompt_batch: int = PROMPT_BATCH  # prompts per text-encoder call


class TextFeatureStage:
    """``{"word": [n]} -> + "text_feature" float16 [n, d]``: eq. 5 with the scorer's text tower.

    With a ``prompt_tokens`` column (``[n, t, context]`` int, from ``PromptTokensStage``) the prompts
    are not tokenized here: the features are the same, and the actor only runs the text tower.
    """

    def __init__(self, config: TextFeatureConfig):
        self.scorer = build_scorer(config.scorer)
        self.templates = list(config.templates)
        self.prompt_batch = config.prompt_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(batch)
        tokens = out.pop(PROMPT_TOKENS, None)
        words = [str(w) for w in batch["word"]]
        feats = token_text_features(
            self.scorer,
            words,
            self.templates,
            batch_size=self.prompt_batch,
            prompt_tokens=None if tokens is None else torch.from_numpy(np.require(tokens, requirements="W")),
        )  # [n, d]
        return {**out, "text_feature": feats.to(torch.float16).cpu().numpy()}


PROMPT_TOKENS = "prompt_tokens"


class PromptTokensStage:
    """CPU stage before ``TextFeatureStage``: + ``prompt_tokens`` int32 ``[n, t, context]``, every word
    in every template through the scorer's text tokenizer (Ray runs it as tasks on the other CPUs,
    overlapped with the GPU actor). Only for scorers with a separate text tokenizer (open_clip)."""

    def __init__(self, config: TextFeatureConfig):
        self.tokenizer = text_tokenizer(config.scorer)
        if self.tokenizer is None:
            raise ValueError(f"scorer.kind={config.scorer.kind!r} has no separate text tokenizer")
        self.templates = list(config.templates)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        words = [str(w) for w in batch["word"]]
        ids = prompt_token_ids(self.tokenizer, words, self.templates)  # [n, t, context]
        return {**batch, PROMPT_TOKENS: ids.to(torch.int32).numpy()}


def text_feature_specs(
    cfg: VocabJobConfig, templates: Sequence[str], stage_cls: type = TextFeatureStage
) -> list[StageSpec]:
    """The job's model stages on word rows: for an open_clip scorer, ``PromptTokensStage`` as tasks (the
    prompts tokenized on the other CPUs, overlapped), then ``stage_cls`` on an actor pool."""
    config = TextFeatureConfig(cfg.scorer, tuple(templates), cfg.prompt_batch)
    specs = []
    if cfg.scorer.kind == "open_clip":  # it has a text_tokenizer: keep the BPE off the actor
        specs.append(StageSpec(PromptTokensStage, config, actors=0, batch_size=cfg.batch_size))
    specs.append(
        StageSpec(
            stage_cls,
            config,
            actors=cfg.actors,
            batch_size=cfg.batch_size,
            num_gpus=cfg.num_gpus_per_actor,
            num_cpus=cfg.num_cpus_per_actor,
        )
    )
    return specs


# ----------------------------------------------------------------------------- shards


def token_shards(codebook: FrozenCodebook, shard_size: int) -> list[Shard]:
    """Token-id ranges ``[start, stop)`` of ``shard_size`` rows; digests cover the codebook hash."""
    shards = []
    v = len(codebook)
    for i, start in enumerate(range(0, v, shard_size)):
        stop = min(start + shard_size, v)
        digest = hashlib.sha256(f"{codebook.hash}:{start}:{stop}".encode()).hexdigest()[:16]
        shards.append(
            Shard(
                shard_id=f"{i:05d}",
                kind="vocab",
                root=f"codebook:{codebook.hash[:16]}",
                items=((start, stop),),
                num_rows=stop - start,
                digest=digest,
                config=SourceConfig(uri=f"codebook:{codebook.card.get('source', '')}", shard_size=shard_size),
            )
        )
    return shards


def _shard_rows(codebook: FrozenCodebook, shards: Sequence[Shard]) -> list[dict[str, Any]]:
    """The rows the actors see: ids and words only (the driver adds the embeddings)."""
    rows = []
    for shard in shards:
        ((start, stop),) = shard.items
        for k in range(start, stop):
            rows.append(
                {"token_id": k, "word": codebook.words[k], "shard_id": shard.shard_id,
                 "image_id": f"{k:09d}", "path": "", "error": ""}
            )  # fmt: skip
    return rows


def _add_codebook_columns(batch: dict[str, np.ndarray], codebook: FrozenCodebook) -> dict[str, np.ndarray]:
    ids = np.array(batch["token_id"], dtype=np.int64)  # [n], a writable copy
    return {
        **batch,
        "token_id": ids,
        "llm_id": np.asarray([codebook.llm_ids[i] for i in ids], dtype=np.int64),
        "token": np.asarray([codebook.tokens[i] for i in ids], dtype=object),
        "word": np.asarray([codebook.words[i] for i in ids], dtype=object),
        "embedding": codebook.embeddings[torch.from_numpy(ids)].numpy(),  # [n, c]
        "text_feature": np.stack(list(batch["text_feature"])) if batch["text_feature"].dtype == object
        else batch["text_feature"],  # [n, d]
    }  # fmt: skip


class TokenShardWriter(ShardWriter):
    """``ShardWriter`` for token rows: uniqueness is checked on ``token_id`` ranges, not ``image_id``."""

    def _check_unique(self, parts: list[CommittedPart]) -> None:
        for p in parts:
            ((start, stop),) = self.shards[p.shard_id].items
            path = self.out.join(part_name(p.shard_id)).path
            ids = (
                pq.read_table(path, columns=["token_id"], filesystem=self.out.fs)
                .column("token_id")
                .to_numpy()
            )
            if not np.array_equal(np.sort(ids), np.arange(start, stop)):
                raise ShardError(
                    f"{self.out.uri}/{part_name(p.shard_id)}: token ids are not exactly {start}..{stop - 1}"
                )


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class VocabJobResult:
    output: str  # URI
    card: dict[str, Any]
    rows: int
    shards_total: int
    shards_run: int  # shards computed by this run; 0 for a re-run of a finished job
    tokens_run: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_run / self.seconds if self.seconds > 0 else 0.0


def job_identity(cfg: VocabJobConfig, codebook: FrozenCodebook, templates: Sequence[str]) -> dict[str, Any]:
    """What determines the table's content (the job digest of every part)."""
    return {
        "format": FORMAT,
        "codebook_hash": codebook.hash,
        "scorer": describe_scorer(cfg.scorer),
        "templates_sha256": hashlib.sha256("\n".join(templates).encode()).hexdigest()[:16],
    }


def run_vocab_job(
    cfg: VocabJobConfig,
    codebook: FrozenCodebook | None = None,
    on_commit: Callable[[str], None] | None = None,
) -> VocabJobResult:
    """Compute the missing shards of ``cfg.output`` and write the card. Ray must be initialised.

    ``codebook``: an already loaded one (else ``load_codebook(cfg.codebook)``), e.g. a filtered subset.
    ``on_commit(shard_id)`` runs after each shard commit (progress hooks; tests that interrupt a run).
    """
    import ray

    start = time.perf_counter()
    codebook = load_codebook(cfg.codebook) if codebook is None else codebook
    templates = scorer_templates(cfg.scorer)  # a label probe's own templates must match
    out = resolve(cfg.output)
    shards = token_shards(codebook, cfg.shard_size)
    identity = job_identity(cfg, codebook, templates)
    writer = TokenShardWriter(out, shards, VOCAB_SCHEMA, identity=identity, config=to_dict(cfg))
    todo = writer.pending()
    tokens_run = 0
    if todo:
        rows = _shard_rows(codebook, todo)
        ds = ray.data.from_items(rows, override_num_blocks=max(len(todo), min(cfg.actors * 2, len(rows))))
        ds = map_stages(ds, text_feature_specs(cfg, templates))
        bar = progress_bar(len(rows), "vocab", "tok", cfg.progress)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for shard_id in writer.add(_add_codebook_columns(batch, codebook)):
                    if on_commit is not None:
                        on_commit(shard_id)
                n = len(batch["token_id"])
                tokens_run += n
                bar.update(n)
        finally:
            bar.close()
    manifest = writer.finish()
    seconds = time.perf_counter() - start
    dim = _feature_dim(out, shards[0])
    card = {
        "format": FORMAT,
        "codebook": codebook.card,
        "scorer": identity["scorer"],
        "scorer_config": to_dict(cfg.scorer),
        "templates": templates,
        "renormalize_text": cfg.scorer.renormalize_text,
        "rows": len(codebook),
        "dim": dim,
        "text_feature_dtype": "float16",
        "job_digest": manifest["job_digest"],
        "shards": [s["file"] for s in manifest["shards"]],
    }
    card_loc = out.join(writer.layout.vocab_card)
    if not card_loc.exists() or json.loads(card_loc.read_text()) != json.loads(json.dumps(card)):
        card_loc.write_text(json.dumps(card, indent=2))
    return VocabJobResult(out.uri, card, len(codebook), len(shards), len(todo), tokens_run, seconds)


def _feature_dim(out: Location, shard: Shard) -> int:
    table = pq.read_table(
        out.join(part_name(shard.shard_id)).path, columns=["text_feature"], filesystem=out.fs
    )
    return len(table.column("text_feature")[0].as_py())


# ----------------------------------------------------------------------------- reading it back


@dataclass
class VocabTable:
    """A vocab output read back, rows in ``token_id`` order (``token_id == row``)."""

    text_features: Tensor  # [v, d] float32, f'_T(k) of eq. 5
    embeddings: Tensor  # [v, c] float32, the codebook vectors e(k)
    words: list[str]
    tokens: list[str]
    llm_ids: list[int]
    card: VocabCard

    def __len__(self) -> int:
        return len(self.words)

    def codebook(self) -> FrozenCodebook:
        card = {k: v for k, v in self.card.codebook.items() if k not in ("size", "dim", "hash")}
        cb = FrozenCodebook(self.embeddings, self.tokens, self.words, self.llm_ids, card)
        if cb.hash != self.card.codebook_hash:
            raise ValueError(
                f"vocab table: codebook hash {cb.hash[:12]} != card {self.card.codebook_hash[:12]}"
            )
        return cb


def _read_table(uri: str | Location, columns: list[str] | None = None) -> tuple[pa.Table, VocabCard]:
    """The card, and the parts' ``columns`` (all if None) in ``token_id`` order, checked against the card."""
    out = as_location(uri)
    card = VocabCard.read(out)
    table = read_output(out, columns=columns).sort_by("token_id")
    ids = table.column("token_id").to_numpy()
    if len(ids) != card.rows or not np.array_equal(ids, np.arange(card.rows)):
        raise ValueError(
            f"{out.uri}: {len(ids)} rows with token ids not 0..{card.rows - 1} (card says {card.rows})"
        )
    return table, card


def load_text_features(uri: str | Location) -> tuple[Tensor, VocabCard]:
    """Only the text features ``[v, d]`` (eq. 5) and the card: what the pools stage and evaluation need,
    without reading the codebook's embeddings and words."""
    table, card = _read_table(uri, columns=["token_id", "text_feature"])
    return torch.from_numpy(_list_matrix(table.column("text_feature"), np.float32)), card


def load_vocab(uri: str | Location) -> VocabTable:
    """Read the vocab card and every part under ``uri``; checks the rows against the card."""
    table, card = _read_table(uri)
    return VocabTable(
        text_features=torch.from_numpy(_list_matrix(table.column("text_feature"), np.float32)),
        embeddings=torch.from_numpy(_list_matrix(table.column("embedding"), np.float32)),
        words=table.column("word").to_pylist(),
        tokens=table.column("token").to_pylist(),
        llm_ids=table.column("llm_id").to_pylist(),
        card=card,
    )


def _list_matrix(column: pa.ChunkedArray, dtype: type) -> np.ndarray:
    """A list<float> column of equal-length rows -> ``[n, d]``."""
    arr = column.combine_chunks()
    n = len(arr)
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)
