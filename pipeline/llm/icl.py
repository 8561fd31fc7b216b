"""The few-shot classification grid over a corpus (the paper's Table 1), with any ``LanguageModel``.

Reads a labelled corpus (``part-*.parquet`` of the tokenize job: ``image_id``, ``label``,
``words_l<l>``), samples episodes per setting (ways x shots x repeats x induction x layers), checks
each prompt against the context window (episodes that do not fit are counted as ``overflow`` and
never sent, never truncated), sends the rest through ``pipeline.llm.llm.complete_many`` and scores the
answers. Writes under ``output``: ``results.parquet`` (one row per setting), ``episodes.parquet``
(one row per episode: prompt, completion, answer, status), ``table.txt`` (Table 1's layout).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.llm.llm import Failure, LLMConfig, RequestBudget, complete_many, context_window, make_client
from pipeline.outputs.corpus import corpus_layers, part_files, read_corpus, words_column
from pipeline.runtime.ray_utils import RayConfig, init_ray
from pipeline.runtime.storage import Location, as_location, resolve
from pipeline.runtime.tracking import MlflowConfig
from spae.icl.episodes import (
    LabelledImages,
    PromptTemplate,
    Setting,
    build_prompt,
    parse_answer,
    sample_episodes,
)
from spae.icl.learners import check_budget

# Table 1's seven columns per ways: (induction, inner shots, repeats)
TABLE1_COLUMNS = (
    (False, 1, 0),
    (True, 1, 0),
    (True, 3, 0),
    (True, 5, 0),
    (True, 1, 1),
    (True, 1, 3),
    (True, 1, 5),
)


@dataclass(frozen=True)
class GridConfig:
    """``preset=table1``: for every ways x layers, Table 1's seven (induction, shots, repeats)
    columns; ``preset=product``: the full product of the lists below."""

    preset: Literal["table1", "product"] = "table1"
    ways: tuple[int, ...] = (2, 5)
    layers: tuple[int, ...] = (2, 3)
    shots: tuple[int, ...] = (1, 3, 5)
    repeats: tuple[int, ...] = (0, 1, 3, 5)
    induction: tuple[bool, ...] = (False, True)

    def settings(self) -> list[Setting]:
        out = []
        for ways in self.ways:
            for layers in self.layers:
                if self.preset == "table1":
                    cols = TABLE1_COLUMNS
                else:
                    cols = tuple((i, s, r) for i in self.induction for s in self.shots for r in self.repeats)
                out += [Setting(ways, s, r, i, layers) for i, s, r in cols]
        return out


@dataclass(frozen=True)
class ICLJobConfig:
    corpus: str = ""  # a corpus folder (local path or s3://) written by `spae tokenize`
    output: str = "outputs/icl"
    method: str = "SPAE"  # the row name in the printed table (e.g. the tokenizer compared)
    llm: LLMConfig = field(default_factory=LLMConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    episodes: int = 100  # per setting
    seed: int = 0
    class_names: Literal["real", "nonsense"] = "real"
    label_names: tuple[str, ...] = ()  # label i -> name; default the label number
    template: PromptTemplate = field(default_factory=PromptTemplate)
    max_tokens: int = 8  # answer length
    temperature: float = 0.0
    store_prompts: bool = True  # the prompt of every episode in episodes.parquet
    examples: int = 2  # example prompts and answers per setting logged to MLflow
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.corpus:
            raise ValueError("corpus is required: the folder (or s3:// prefix) of a tokenized corpus")
        if self.episodes < 1 or self.max_tokens < 1:
            raise ValueError("episodes and max_tokens must be >= 1")


def load_labelled(uri: str | Location, layers: int) -> LabelledImages:
    """The labelled rows of a corpus with the words of layers ``1..layers`` (unlabelled rows dropped)."""
    loc = as_location(uri)
    parts = part_files(loc)
    if not parts:
        raise FileNotFoundError(f"{loc.uri}: no corpus shards (part-*.parquet) found")
    with parts[0].fs.open_input_file(parts[0].path) as f:
        have = corpus_layers(pq.read_schema(f))
    missing = [l for l in range(1, layers + 1) if l not in have]
    if missing:
        raise ValueError(
            f"{loc.uri}: the corpus lacks layers {missing} (it has {list(have)}); re-run tokenize"
        )
    table = read_corpus(loc, ["image_id", "label", *[words_column(l) for l in range(1, layers + 1)]])
    table = table.filter(pc.is_valid(table.column("label")))
    if table.num_rows == 0:
        raise ValueError(f"{loc.uri}: no labelled rows; few-shot classification needs labels")
    cols = [table.column(words_column(l)).to_pylist() for l in range(1, layers + 1)]
    words = list(zip(*cols, strict=True))
    return LabelledImages.from_rows(
        table.column("image_id").to_pylist(), table.column("label").to_pylist(), words
    )


@dataclass(frozen=True)
class GridResult:
    results: pa.Table
    episodes: pa.Table
    table: str
    output: str


def run_grid(cfg: ICLJobConfig, images: LabelledImages | None = None) -> GridResult:
    settings = cfg.grid.settings()
    if images is None:
        images = load_labelled(cfg.corpus, max(s.layers for s in settings))
    client = make_client(replace(cfg.llm, max_requests=0), cfg.template)
    budget = RequestBudget(cfg.llm.max_requests)  # one budget for the whole grid
    window = context_window(cfg.llm, client)
    if cfg.llm.concurrency > 1 and cfg.llm.backend != "reference":
        init_ray(cfg.ray)
    rows: list[dict[str, Any]] = []
    episode_rows: list[dict[str, Any]] = []
    # sample and measure every setting first, then send all fitting prompts in one batch
    t0 = time.monotonic()
    plans = []
    for setting in settings:
        eps = sample_episodes(images, setting, cfg.episodes, cfg.seed, cfg.class_names, cfg.label_names)
        prompts = [build_prompt(e, cfg.template) for e in eps]
        checks = [check_budget(client, p, cfg.max_tokens, window) for p in prompts]
        plans.append((setting, eps, prompts, checks))
    send = [(k, i) for k, (_, _, _, checks) in enumerate(plans) for i, c in enumerate(checks) if c.fits]
    answers = complete_many(
        cfg.llm,
        [plans[k][2][i] for k, i in send],
        cfg.max_tokens,
        cfg.temperature,
        cfg.template.stop,
        cfg.template,
        client=client,
        budget=budget,
    )
    by_index = dict(zip(send, answers, strict=True))
    seconds = time.monotonic() - t0
    for k, (setting, eps, prompts, checks) in enumerate(plans):
        counts = {"correct": 0, "scored": 0, "invalid": 0, "overflow": 0, "failed": 0}
        for i, (ep, prompt, check) in enumerate(zip(eps, prompts, checks, strict=True)):
            out = by_index.get((k, i))
            completion, predicted, status, reason = "", None, "ok", ""
            if not check.fits:
                status, reason = "overflow", check.describe()
            elif isinstance(out, Failure):
                status, reason = ("budget" if out.kind == "budget" else "failed"), out.reason
            else:
                completion = out.text
                predicted = parse_answer(completion, ep.answer_space)
                status = "ok" if predicted is not None else "invalid"
            if status in ("ok", "invalid"):
                counts["scored"] += 1
                counts["correct"] += int(predicted == ep.answer)
                counts["invalid"] += int(status == "invalid")
            elif status == "overflow":
                counts["overflow"] += 1
            else:
                counts["failed"] += 1
            episode_rows.append(
                {
                    "setting": setting.key,
                    "episode": ep.index,
                    "query_id": ep.query.image_id,
                    "answer": ep.answer,
                    "predicted": predicted,
                    "correct": predicted == ep.answer,
                    "status": status,
                    "reason": reason,
                    "prompt_tokens": check.prompt_tokens,
                    "tokens_measured": check.measured,
                    "completion": completion,
                    "prompt": prompt if cfg.store_prompts or ep.index < cfg.examples else "",
                }
            )
        tokens = sum(len(w) for w in images.words[0][: setting.layers])
        scored = counts["scored"]
        rows.append(
            {
                "method": cfg.method,
                "setting": setting.key,
                "ways": setting.ways,
                "shots": setting.shots,
                "repeats": setting.repeats,
                "induction": setting.induction,
                "layers": setting.layers,
                "tokens_per_image": tokens,
                "episodes": len(eps),
                "scored": scored,
                "correct": counts["correct"],
                "accuracy": counts["correct"] / scored if scored else float("nan"),
                "invalid": counts["invalid"],
                "overflow": counts["overflow"],
                "failed": counts["failed"],
                "mean_prompt_tokens": sum(c.prompt_tokens for c in checks) / len(checks),
                "seconds": seconds * len(eps) / max(1, sum(len(p[1]) for p in plans)),  # share of the batch
            }
        )
    results = pa.Table.from_pylist(rows)
    episodes = pa.Table.from_pylist(episode_rows)
    table = format_table(rows)
    return GridResult(results, episodes, table, cfg.output)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Table 1's layout: one block per ways, one line per (method, layers), a column per
    (induction, shots, repeats) and the average; accuracies in percent. ``*``: some episodes
    overflowed the context window or failed (see the results table)."""
    cols = sorted({(r["induction"], r["shots"], r["repeats"]) for r in rows}, key=_column_order)
    label_w = 28
    head = [
        f"{'Task Induction':<{label_w}}" + "".join(f"{int(c[0]):>7}" for c in cols) + f"{'Avg':>8}",
        f"{'Inner Shots':<{label_w}}" + "".join(f"{c[1]:>7}" for c in cols),
        f"{'Repeats':<{label_w}}" + "".join(f"{c[2]:>7}" for c in cols),
    ]
    lines = ["Method  # Layers: # Tokens"]
    for ways in sorted({r["ways"] for r in rows}):
        lines += [f"{ways}-Way Classification"]
        keys = sorted(
            {(r["method"], r["layers"], r["tokens_per_image"]) for r in rows if r["ways"] == ways},
            key=lambda k: (k[0], k[1]),
        )
        for method, layers, tokens in keys:
            cells, vals = [], []
            for c in cols:
                match = [
                    r
                    for r in rows
                    if r["ways"] == ways
                    and r["method"] == method
                    and r["layers"] == layers
                    and (r["induction"], r["shots"], r["repeats"]) == c
                ]
                if not match or match[0]["scored"] == 0:
                    cells.append(f"{'-':>7}")
                    continue
                r = match[0]
                acc = 100 * r["accuracy"]
                vals.append(acc)
                flag = "*" if r["overflow"] or r["failed"] else " "
                cells.append(f"{acc:>6.1f}{flag}")
            avg = f"{sum(vals) / len(vals):>8.2f}" if vals else f"{'-':>8}"
            lines.append(f"{f'{method} {layers}: {tokens}':<{label_w}}" + "".join(cells) + avg)
    return "\n".join(head + lines) + "\n"


def _column_order(c: tuple[bool, int, int]) -> tuple[int, int, int]:
    return (int(c[0]), c[2], c[1])  # Table 1: no induction first, then shots 1/3/5, then repeats


def write_outputs(result: GridResult) -> dict[str, str]:
    """results.parquet, episodes.parquet, table.txt under the output folder; returns their URIs."""
    out = resolve(result.output)
    out.mkdir()
    uris = {}
    for name, table in (("results.parquet", result.results), ("episodes.parquet", result.episodes)):
        loc = out.join(name)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        loc.write_bytes(sink.getvalue().to_pybytes())
        uris[name] = loc.uri
    loc = out.join("table.txt")
    loc.write_text(result.table)
    uris["table.txt"] = loc.uri
    return uris


def examples(result: GridResult, per_setting: int) -> list[dict[str, Any]]:
    """The first ``per_setting`` episodes of every setting: prompt, completion, answer, status."""
    keep = []
    seen: dict[str, int] = {}
    for row in result.episodes.to_pylist():
        if seen.get(row["setting"], 0) < per_setting:
            seen[row["setting"]] = seen.get(row["setting"], 0) + 1
            keep.append(
                {
                    k: row[k]
                    for k in ("setting", "episode", "prompt", "completion", "answer", "predicted", "status")
                }
            )
    return keep


def log_to_mlflow(result: GridResult, per_setting: int) -> None:
    import mlflow

    metrics = {}
    for r in result.results.to_pylist():
        if r["scored"]:
            metrics[f"accuracy.{r['setting']}"] = r["accuracy"]
        metrics[f"overflow.{r['setting']}"] = r["overflow"]
    mlflow.log_metrics(metrics)
    mlflow.log_text(result.table, "icl/table.txt")
    mlflow.log_text(json.dumps(examples(result, per_setting), indent=2), "icl/examples.json")
    mlflow.log_table(result.results.to_pandas(), "icl/results.json")
