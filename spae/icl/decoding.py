"""Progressive in-context decoding (section 3.2, eq. 11): a frozen LLM writes a token pyramid segment
by segment, and the tokenizer turns the words back into an image.

The target sequence ``v`` (the words of a pyramid, layer 1 first) is cut into segments ``v_1 .. v_T``:
whole layers, or strides of ``s`` words within a layer. Segment ``t`` is one in-context task
(eq. 11)::

    v_t ~ P_LLM( . | [u, v_<t'] ; {([u^i, v^i_<t'], v^i_t)}_i )

- PAR (``mode="ar"``), ``t' = t``: condition on every segment decoded so far;
- PNAR (``mode="nar"``): condition on the previous layers only (``t'`` = the first segment of the
  segment's layer), so the segments of one layer are sampled independently of each other.

The paper's recipe (``preset="ar_then_nar"``): PAR for the first layers under the task's condition,
then PNAR for the last layer as a task-agnostic refinement. Context examples show their ground-truth
prefix; the query shows what was decoded. A segment's answer is cut or padded to its exact size
(padding: the context examples' most frequent word at that position) and every fix is recorded;
the final text goes through the tokenizer's tolerant ``from_text`` and is decoded to an image.

Task builders: conditional generation from a text query (the paper's MNIST "an image of 1+7" with
50 context images) and conditional denoising (context pairs of corrupted -> clean pyramids, with
corruption rates from 50% down to 20%).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from spae.icl.episodes import MNIST_NAMES, LabelledImages, image_text, text_words
from spae.icl.learners import BudgetCheck, LanguageModel, check_budget

Words = tuple[tuple[str, ...], ...]  # words per layer, layer 1 first


@dataclass(frozen=True)
class Segment:
    """Words ``[start, stop)`` of pyramid layer ``layer`` (1-indexed), decoded in ``mode``."""

    layer: int
    start: int
    stop: int
    mode: Literal["ar", "nar"]

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class DecodingConfig:
    """``layers``: how many layers to write (0 = all of the pyramid); ``preset``: ``par`` (every
    segment PAR), ``pnar`` (every segment PNAR) or ``ar_then_nar`` (PAR for the first ``ar_layers``
    layers, default all but the last, PNAR after); strides in words (0 = a whole layer per segment)."""

    preset: Literal["par", "pnar", "ar_then_nar"] = "ar_then_nar"
    layers: int = 0
    ar_layers: int = 0  # ar_then_nar only; 0 = layers - 1
    ar_stride: int = 0
    nar_stride: int = 0
    temperature: float = 0.0
    max_tokens_per_word: int = 4  # an LLM may spend several of its tokens on one word
    context_window: int = 0  # 0 = unchecked

    def __post_init__(self) -> None:
        if (
            min(self.layers, self.ar_layers, self.ar_stride, self.nar_stride) < 0
            or self.max_tokens_per_word < 1
        ):
            raise ValueError("decoding: layers, ar_layers and strides must be >= 0, max_tokens_per_word >= 1")


def plan_segments(token_counts: Sequence[int], cfg: DecodingConfig) -> list[Segment]:
    """The segments of eq. 11, in decoding order, for a pyramid with ``token_counts`` words per layer."""
    layers = cfg.layers or len(token_counts)
    if layers > len(token_counts):
        raise ValueError(f"decoding.layers={layers} but the pyramid has {len(token_counts)} layers")
    if cfg.preset == "par":
        ar_layers = layers
    elif cfg.preset == "pnar":
        ar_layers = 0
    else:
        ar_layers = cfg.ar_layers or max(layers - 1, 1)
    segments = []
    for l in range(1, layers + 1):
        mode: Literal["ar", "nar"] = "ar" if l <= ar_layers else "nar"
        n = token_counts[l - 1]
        stride = (cfg.ar_stride if mode == "ar" else cfg.nar_stride) or n
        segments += [Segment(l, s, min(s + stride, n), mode) for s in range(0, n, stride)]
    return segments


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class DecodingExample:
    """One context pair ``(u^i, v^i)``: a text condition and the pyramid words it maps to."""

    condition: str
    words: Words
    image_id: str = ""


@dataclass(frozen=True)
class DecodingTask:
    name: str
    context: tuple[DecodingExample, ...]
    query: str  # the query condition u-hat
    info: dict[str, Any] = field(default_factory=dict)


def generation_task(
    images: LabelledImages,
    query: str = "an image of 1+7",
    num_context: int = 50,
    seed: int = 0,
    label_names: Sequence[str] = MNIST_NAMES,
    condition: str = "an image of {name}",
    numerals: bool = True,
) -> DecodingTask:
    """Conditional generation from a text query (section 4.3, Fig. 6): ``num_context`` images balanced
    over the labels (round robin over sorted labels, images drawn with ``seed``), each with the
    preamble "an image of k" (``numerals``: k is the label number, else its name), then the query."""
    rng = random.Random(f"spae-icl-gen/{seed}")
    pools = {l: rng.sample(rows, len(rows)) for l, rows in sorted(images.by_label().items())}
    if sum(len(r) for r in pools.values()) < num_context:
        raise ValueError(f"{num_context} context images asked for; the corpus has {len(images)}")
    picked: list[int] = []
    while len(picked) < num_context:
        for rows in pools.values():
            if rows and len(picked) < num_context:
                picked.append(rows.pop())
    rng.shuffle(picked)
    context = []
    for r in picked:
        label = images.labels[r]
        name = str(label) if numerals or label >= len(label_names) else label_names[label]
        context.append(DecodingExample(condition.format(name=name), images.words[r], images.image_ids[r]))
    return DecodingTask("generation", tuple(context), query, {"num_context": num_context, "seed": seed})


def corrupt_words(words: Words, rate: float, vocabulary: Sequence[str], rng: random.Random) -> Words:
    """Replace ``round(rate * n)`` of the pyramid's ``n`` words (uniform positions over all layers)
    with other words drawn uniformly from ``vocabulary``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"corruption rate {rate} must be in [0, 1]")
    if len(vocabulary) < 2:
        raise ValueError("corruption needs a vocabulary of at least 2 words")
    flat = [(l, i) for l, layer in enumerate(words) for i in range(len(layer))]
    out = [list(layer) for layer in words]
    for l, i in rng.sample(flat, round(rate * len(flat))):
        w = out[l][i]
        while w == out[l][i]:
            w = vocabulary[rng.randrange(len(vocabulary))]
        out[l][i] = w
    return tuple(tuple(layer) for layer in out)


def denoising_task(
    context: Sequence[Words],
    query: Words,
    vocabulary: Sequence[str],
    rates: tuple[float, float] = (0.5, 0.2),
    query_rate: float = 0.0,
    seed: int = 0,
) -> DecodingTask:
    """Conditional denoising (Fig. 2): context pairs (corrupted pyramid -> clean pyramid) with
    corruption rates spaced linearly from ``rates[0]`` to ``rates[1]``; the query is ``query``'s text
    (corrupted at ``query_rate`` first when > 0)."""
    if not context:
        raise ValueError("denoising needs at least one context pair")
    rng = random.Random(f"spae-icl-denoise/{seed}")
    k = len(context)
    hi, lo = rates
    steps = [hi + (lo - hi) * i / (k - 1) if k > 1 else hi for i in range(k)]
    pairs = []
    for words, rate in zip(context, steps, strict=True):
        noisy = corrupt_words(words, rate, vocabulary, rng)
        pairs.append(DecodingExample(image_text(noisy, len(noisy)), words))
    q = corrupt_words(query, query_rate, vocabulary, rng) if query_rate > 0 else query
    return DecodingTask("denoising", tuple(pairs), image_text(q, len(q)), {"rates": steps, "seed": seed})


# ----------------------------------------------------------------------------- prompts and decoding


@dataclass(frozen=True)
class DecodingTemplate:
    """``{condition}`` is ``u``, ``{prefix}`` the conditioning segments ``v_<t'`` as pyramid text
    (with a leading space, empty when there are none), ``{segment}`` the words of ``v_t``."""

    example: str = "Input: {condition}{prefix}\nOutput: {segment}\n"
    query: str = "Input: {condition}{prefix}\nOutput:"
    stop: tuple[str, ...] = ("\n",)


def prefix_text(words: Words, segments: Sequence[Segment]) -> str:
    """The pyramid text of ``segments`` of ``words`` (layer tags, words in serialization order)."""
    by_layer: dict[int, list[str]] = {}
    for s in sorted(segments, key=lambda s: (s.layer, s.start)):
        by_layer.setdefault(s.layer, []).extend(words[s.layer - 1][s.start : s.stop])
    return " ".join(f"[L{l}] " + " ".join(ws) for l, ws in sorted(by_layer.items()))


def conditioning(plan: Sequence[Segment], t: int) -> list[Segment]:
    """The segments ``v_<t'`` that segment ``t`` conditions on (PAR: all before it; PNAR: the layers
    before its own)."""
    seg = plan[t]
    if seg.mode == "ar":
        return list(plan[:t])
    return [s for s in plan[:t] if s.layer < seg.layer]


def segment_prompt(
    task: DecodingTask, plan: Sequence[Segment], t: int, decoded: Words, template: DecodingTemplate
) -> str:
    """Eq. 11's prompt for segment ``t``: every context pair, then the query with what was decoded."""
    cond = conditioning(plan, t)
    seg = plan[t]

    def pre(words: Words) -> str:
        text = prefix_text(words, cond)
        return " " + text if text else ""

    parts = [
        template.example.format(
            condition=ex.condition,
            prefix=pre(ex.words),
            segment=" ".join(ex.words[seg.layer - 1][seg.start : seg.stop]),
        )
        for ex in task.context
    ]
    parts.append(template.query.format(condition=task.query, prefix=pre(decoded)))
    return "".join(parts)


@dataclass(frozen=True)
class StepResult:
    segment: Segment
    prompt_tokens: int
    completion: str
    words: tuple[str, ...]  # exactly segment.size words
    padded: int  # words missing from the answer, filled in
    cut: int  # extra words dropped


@dataclass(frozen=True)
class DecodingResult:
    """``words``: the decoded layers (complete layers only when ``overflow`` is None);
    ``text``: their pyramid text; ``overflow``: the budget check of the prompt that did not fit."""

    task: str
    steps: tuple[StepResult, ...]
    words: Words
    text: str
    overflow: BudgetCheck | None = None

    @property
    def complete(self) -> bool:
        return self.overflow is None


def read_segment(completion: str, fallback: Sequence[str]) -> tuple[tuple[str, ...], int, int]:
    """The first ``len(fallback)`` words of an answer (layer tags dropped) -> (words, padded, cut);
    a missing word at position ``i`` becomes ``fallback[i]``."""
    size = len(fallback)
    got = [w for _, w in text_words(completion)]
    words = got[:size] + list(fallback[len(got) :])
    return tuple(words), max(0, size - len(got)), max(0, len(got) - size)


def position_prior(task: DecodingTask, seg: Segment) -> list[str]:
    """Per position of ``seg``, the context examples' most frequent word there (ties: first seen)."""
    return [
        Counter(ex.words[seg.layer - 1][i] for ex in task.context).most_common(1)[0][0]
        for i in range(seg.start, seg.stop)
    ]


def progressive_decode(
    model: LanguageModel,
    task: DecodingTask,
    token_counts: Sequence[int],
    cfg: DecodingConfig = DecodingConfig(),
    template: DecodingTemplate = DecodingTemplate(),
) -> DecodingResult:
    """Run eq. 11 over the plan of ``cfg``; stops (and reports) at the first prompt that does not fit
    ``cfg.context_window`` -- prompts are never truncated."""
    plan = plan_segments(token_counts, cfg)
    for ex in task.context:
        short = [
            l
            for l in {s.layer for s in plan}
            if len(ex.words) < l or len(ex.words[l - 1]) != token_counts[l - 1]
        ]
        if short:
            raise ValueError(
                f"context example {ex.image_id or ex.condition!r} lacks complete layers {sorted(short)}"
            )
    num_layers = max(s.layer for s in plan)
    decoded = [[""] * token_counts[l] for l in range(num_layers)]
    steps: list[StepResult] = []
    for t, seg in enumerate(plan):
        prompt = segment_prompt(task, plan, t, tuple(tuple(x) for x in decoded), template)
        max_tokens = seg.size * cfg.max_tokens_per_word + 2
        check = check_budget(model, prompt, max_tokens, cfg.context_window)
        if not check.fits:
            done = _complete_layers(decoded, steps, token_counts)
            return DecodingResult(
                task.name, tuple(steps), done, image_text(done, len(done)) if done else "", check
            )
        out = model.complete(prompt, max_tokens, cfg.temperature, template.stop)
        words, padded, cut = read_segment(out.text, position_prior(task, seg))
        decoded[seg.layer - 1][seg.start : seg.stop] = list(words)
        steps.append(StepResult(seg, check.prompt_tokens, out.text, words, padded, cut))
    final = tuple(tuple(layer) for layer in decoded)
    return DecodingResult(task.name, tuple(steps), final, image_text(final, len(final)))


def _complete_layers(
    decoded: list[list[str]], steps: Sequence[StepResult], token_counts: Sequence[int]
) -> Words:
    filled = Counter()
    for s in steps:
        filled[s.segment.layer] += s.segment.size
    out = []
    for l, layer in enumerate(decoded, start=1):
        if filled[l] != token_counts[l - 1]:
            break
        out.append(tuple(layer))
    return tuple(out)


# ----------------------------------------------------------------------------- back to pixels


class PyramidCodec(Protocol):
    """What decoding needs from ``spae.tokenizer.SPAETokenizer``."""

    pyramid: Any  # PyramidSpec: token_counts, covering_layers

    def from_text(
        self, text: str | Sequence[str], layers: Sequence[int] | None = None
    ) -> tuple[Any, list[Any]]: ...

    def decode(self, pyramid: Any, up_to_layer: int | None = None) -> Any: ...


@dataclass(frozen=True)
class DecodedImage:
    """``image`` [1, C, H, W] in [0, 1] from the first ``up_to_layer`` layers; ``reports`` from
    ``from_text``."""

    image: Any
    up_to_layer: int
    reports: tuple[Any, ...]
    pyramid: Any


def decode_image(codec: PyramidCodec, text: str) -> DecodedImage:
    """Tolerant parse of an LLM's pyramid text, then decode from the shallowest covering prefix that
    holds every layer the text has (layers the text lacks are filled by ``from_text`` and reported)."""
    found = [l for l, _ in text_words(text) if l > 0]
    deepest = max(found, default=1)
    covering = [c for c in codec.pyramid.covering_layers if c >= deepest] or [
        max(codec.pyramid.covering_layers)
    ]
    up_to = covering[0]
    pyramid, reports = codec.from_text(text, layers=range(1, up_to + 1))
    return DecodedImage(codec.decode(pyramid, up_to_layer=up_to), up_to, tuple(reports), pyramid)
