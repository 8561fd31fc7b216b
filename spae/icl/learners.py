"""The in-context learner interface, the context budget, and a reference learner that needs no LLM.

Anything that completes prompts is a ``LanguageModel``: a frozen LLM behind HTTP or in-process
(``pipeline.llm.llm``), or ``ReferenceLearner`` here. A learner never sees labels other than through
the prompt text, so the same episodes and prompts score every learner.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from spae.icl.episodes import PromptTemplate, parse_prompt, text_words


@dataclass(frozen=True)
class Completion:
    """What a model wrote: the text, its tokens (as strings, when known) and their log-probabilities
    (natural log, one per token, when the backend gives them)."""

    text: str
    tokens: tuple[str, ...] = ()
    logprobs: tuple[float, ...] | None = None


@runtime_checkable
class LanguageModel(Protocol):
    """A frozen model that continues a prompt."""

    def complete(
        self, prompt: str, max_tokens: int, temperature: float = 0.0, stop: Sequence[str] = ()
    ) -> Completion: ...

    def count_tokens(self, text: str) -> int | None:
        """The prompt length in the model's own tokens; ``None`` when the model cannot count."""
        ...


# ----------------------------------------------------------------------------- context budget


@dataclass(frozen=True)
class BudgetCheck:
    """Does a prompt fit? ``prompt_tokens`` is in the model's tokens when ``measured``; otherwise a
    lower bound (whitespace-separated pieces, each at least one token of any tokenizer)."""

    fits: bool
    prompt_tokens: int
    max_new_tokens: int
    context_window: int  # 0 = unknown: everything fits
    measured: bool

    @property
    def overflow(self) -> int:
        """Tokens over the window (0 when it fits)."""
        if not self.context_window:
            return 0
        return max(0, self.prompt_tokens + self.max_new_tokens - self.context_window)

    def describe(self) -> str:
        unit = "tokens" if self.measured else "words (a lower bound on tokens)"
        return (
            f"prompt of {self.prompt_tokens} {unit} + {self.max_new_tokens} new tokens "
            f"{'fits' if self.fits else 'does not fit'} a context window of {self.context_window}"
        )


def check_budget(model: LanguageModel, prompt: str, max_new_tokens: int, context_window: int) -> BudgetCheck:
    """Measure ``prompt`` in the model's tokens (where it can count) against ``context_window``.

    Callers report a prompt that does not fit and skip it; nothing is ever truncated here.
    """
    counted = model.count_tokens(prompt)
    measured = counted is not None
    n = int(counted) if measured else len(prompt.split())
    fits = not context_window or n + max_new_tokens <= context_window
    return BudgetCheck(fits, n, max_new_tokens, context_window, measured)


# ----------------------------------------------------------------------------- reference learner


def token_bag(image_text: str, by_layer: bool = True) -> Counter[str]:
    """Bag of an image's words; ``by_layer`` keys each word by its layer (``"2:seven"``)."""
    return Counter(f"{l}:{w}" if by_layer else w for l, w in text_words(image_text))


def tfidf_vectors(bags: Sequence[Counter[str]]) -> list[dict[str, float]]:
    """TF-IDF with smoothed idf ``log((1 + n) / (1 + df)) + 1`` over ``bags``; L2-normalised."""
    n = len(bags)
    df: Counter[str] = Counter()
    for bag in bags:
        df.update(bag.keys())
    out = []
    for bag in bags:
        vec = {t: c * (math.log((1 + n) / (1 + df[t])) + 1.0) for t, c in bag.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        out.append({t: v / norm for t, v in vec.items()} if norm else {})
    return out


def cosine(a: dict[str, float], b: dict[str, float]) -> float:
    """Dot product of two L2-normalised sparse vectors."""
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(t, 0.0) for t, v in a.items())


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    scores: dict[str, float]  # best cosine per class name


def nearest_neighbour(context: Sequence[tuple[str, str]], query: str, by_layer: bool = True) -> Prediction:
    """1-NN over TF-IDF token bags: the class of the context image most similar to the query.

    ``context``: (image text, class name) pairs; idf is computed over the distinct context images
    and the query. Ties go to the class seen first in the context.
    """
    if not context:
        raise ValueError("nearest_neighbour needs at least one context example")
    texts = list(dict.fromkeys(t for t, _ in context))  # repeats do not change idf
    vecs = tfidf_vectors([token_bag(t, by_layer) for t in [*texts, query]])
    sim = {t: cosine(v, vecs[-1]) for t, v in zip(texts, vecs[:-1], strict=True)}
    scores: dict[str, float] = {}
    for text, name in context:
        scores[name] = max(scores.get(name, -1.0), sim[text])
    best = max(scores, key=lambda k: scores[k])  # dicts keep first-seen order: ties go to the first
    return Prediction(best, scores[best], scores)


class ReferenceLearner:
    """A ``LanguageModel`` that reads a few-shot prompt and answers by TF-IDF nearest neighbour.

    It parses the prompt with the same ``PromptTemplate`` that wrote it, so it is scored on exactly
    what an LLM would read. ``count_tokens`` counts whitespace-separated pieces.
    """

    def __init__(self, template: PromptTemplate = PromptTemplate(), by_layer: bool = True):
        self.template = template
        self.by_layer = by_layer

    def complete(
        self, prompt: str, max_tokens: int = 8, temperature: float = 0.0, stop: Sequence[str] = ()
    ) -> Completion:
        context, query = parse_prompt(prompt, self.template)
        pred = nearest_neighbour(context, query, self.by_layer)
        return Completion(" " + pred.label, (pred.label,), None)

    def count_tokens(self, text: str) -> int | None:
        return len(text.split())
