"""Few-shot classification episodes and their prompts (the Frozen / LQAE protocol of the paper's Table 1).

An episode is one test case of the open-ended few-shot benchmark (section 4.2):

- ``ways`` N: classes drawn from the labelled corpus; their names are the answer space;
- ``shots`` K (inner shots): distinct support images per class;
- ``repeats`` R: extra copies of the support set; the context holds R + 1 blocks, each block every
  one of the N * K support images once, in its own shuffled order (R = 0: each image once);
- ``induction``: a preamble that states the answer space ("Answer with dax or blicket.");
- ``layers``: the image is the text of the first ``layers`` layers of its token pyramid
  (``[L1] w [L2] w w w w``: 1, 5, 21 words for the paper's pyramid);
- class names: the real label names, or nonsense words (Frozen's "dax", "blicket", ...)
  assigned to the episode's classes in a random order.

The query is one more image of one of the N classes, never one of the support images. Sampling
uses a ``random.Random`` seeded by ``(seed, ways, shots, index)``: the same seed gives the same
classes, support and query images for every value of repeats, induction and layers, so those
settings are compared on the same images (paired), and episode ``i`` does not depend on how many
episodes are drawn.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

NONSENSE_WORDS = ("dax", "blicket", "slation", "perpo", "shously", "wug", "tufa", "zorb", "fep", "toma")
MNIST_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TAG = re.compile(r"\[\s*L\s*(\d+)\s*\]", re.IGNORECASE)


@dataclass(frozen=True)
class LabelledImages:
    """The rows of a labelled corpus an episode draws from (unlabelled rows are dropped by the reader).

    ``words[i][l - 1]`` is image ``i``'s layer-``l`` words in serialization order; every image holds
    the same number of layers (at least the deepest prefix an episode asks for).
    """

    image_ids: tuple[str, ...]
    labels: tuple[int, ...]
    words: tuple[tuple[tuple[str, ...], ...], ...]

    def __post_init__(self) -> None:
        if not (len(self.image_ids) == len(self.labels) == len(self.words)):
            raise ValueError(
                f"{len(self.image_ids)} image ids, {len(self.labels)} labels and "
                f"{len(self.words)} word pyramids "
                "must have the same length"
            )

    @classmethod
    def from_rows(
        cls, image_ids: Sequence[str], labels: Sequence[int], words: Sequence[Sequence[Sequence[str]]]
    ) -> LabelledImages:
        return cls(
            tuple(str(i) for i in image_ids),
            tuple(int(l) for l in labels),
            tuple(tuple(tuple(str(w) for w in layer) for layer in img) for img in words),
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    @cached_property
    def num_layers(self) -> int:
        return min((len(w) for w in self.words), default=0)

    def by_label(self) -> dict[int, list[int]]:
        """label -> row indices, in corpus order (a fresh copy of a cached index)."""
        return {label: list(rows) for label, rows in self._index.items()}

    @cached_property
    def _index(self) -> dict[int, tuple[int, ...]]:
        out: dict[int, list[int]] = {}
        for i, label in enumerate(self.labels):
            out.setdefault(label, []).append(i)
        return {label: tuple(rows) for label, rows in out.items()}


def image_text(words_by_layer: Sequence[Sequence[str]], layers: int) -> str:
    """The text of the first ``layers`` layers: ``"[L1] w [L2] w w w w"`` (the corpus text format)."""
    if layers < 1 or layers > len(words_by_layer):
        raise ValueError(f"layers={layers} is out of range; this image has layers 1..{len(words_by_layer)}")
    return " ".join(f"[L{l}] " + " ".join(words_by_layer[l - 1]) for l in range(1, layers + 1))


def text_words(text: str) -> list[tuple[int, str]]:
    """``"[L1] a [L2] b c"`` -> ``[(1, "a"), (2, "b"), (2, "c")]``; words before any tag get layer 0."""
    out: list[tuple[int, str]] = []
    layer = 0
    for piece in text.split():
        m = _TAG.fullmatch(piece)
        if m:
            layer = int(m.group(1))
        else:
            out.append((layer, piece))
    return out


@dataclass(frozen=True)
class PromptTemplate:
    """How an episode is written. ``{image}`` is the image text, ``{label}`` a class name,
    ``{answers}`` the answer space ("a, b or c"). The query is ``query`` after the examples; the
    model's completion (up to ``stop``) is its answer."""

    induction: str = "Answer with {answers}.\n"
    example: str = "Input: {image}\nOutput: {label}\n"
    query: str = "Input: {image}\nOutput:"
    stop: tuple[str, ...] = ("\n",)

    def __post_init__(self) -> None:
        for name, keys in (("example", ("{image}", "{label}")), ("query", ("{image}",))):
            missing = [k for k in keys if k not in getattr(self, name)]
            if missing:
                raise ValueError(f"template.{name} must contain {', '.join(missing)}")
        if not self.example.startswith(self.query.split("{image}")[0]):
            raise ValueError(
                "template.example and template.query must start with the same text before {image}"
            )


@dataclass(frozen=True)
class Example:
    image_id: str
    label: int
    name: str  # the class name shown in the prompt
    text: str  # the image as words


@dataclass(frozen=True)
class Setting:
    """One column x row of Table 1: N ways, K shots, R repeats, induction, layer prefix."""

    ways: int = 5
    shots: int = 1
    repeats: int = 0
    induction: bool = True
    layers: int = 3

    def __post_init__(self) -> None:
        if self.ways < 2 or self.shots < 1 or self.repeats < 0 or self.layers < 1:
            raise ValueError(f"setting {self}: needs ways >= 2, shots >= 1, repeats >= 0 and layers >= 1")

    @property
    def key(self) -> str:
        return f"w{self.ways}_s{self.shots}_r{self.repeats}_i{int(self.induction)}_l{self.layers}"


@dataclass(frozen=True)
class Episode:
    """One test case; ``context`` is the full support sequence in prompt order ((R + 1) * N * K examples)."""

    index: int
    setting: Setting
    answer_space: tuple[str, ...]  # class names in the order the classes were drawn
    context: tuple[Example, ...]
    query: Example
    support_ids: tuple[str, ...] = field(default=())  # the N * K distinct support images

    @property
    def answer(self) -> str:
        return self.query.name


def answer_list(names: Sequence[str]) -> str:
    """``["a"]`` -> ``"a"``, ``["a", "b"]`` -> ``"a or b"``, ``["a", "b", "c"]`` -> ``"a, b or c"``."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def class_names(
    labels: Sequence[int], mode: str, label_names: Sequence[str] | dict[int, str], rng: random.Random
) -> list[str]:
    """Names for the episode's classes: real (``label_names[label]``, else ``str(label)``) or nonsense."""
    if mode == "real":
        if isinstance(label_names, dict):
            return [label_names.get(l, str(l)) for l in labels]
        return [label_names[l] if 0 <= l < len(label_names) else str(l) for l in labels]
    if mode == "nonsense":
        if len(labels) > len(NONSENSE_WORDS):
            raise ValueError(f"{len(labels)} ways but only {len(NONSENSE_WORDS)} nonsense words")
        words = list(NONSENSE_WORDS[: len(labels)])
        rng.shuffle(words)
        return words
    raise ValueError(f"class names mode {mode!r}; allowed: real, nonsense")


def sample_episode(
    images: LabelledImages,
    setting: Setting,
    index: int,
    seed: int = 0,
    names: str = "real",
    label_names: Sequence[str] | dict[int, str] = (),
) -> Episode:
    """Episode ``index`` of ``setting`` (see the module docstring for the protocol)."""
    if setting.layers > images.num_layers:
        raise ValueError(f"setting asks for {setting.layers} layers; the corpus holds {images.num_layers}")
    pools = {l: rows for l, rows in images._index.items() if len(rows) >= setting.shots + 1}
    if len(pools) < setting.ways:
        raise ValueError(
            f"{setting.ways}-way {setting.shots}-shot episodes need {setting.ways} classes with at least "
            f"{setting.shots + 1} images each; the corpus has {len(pools)}"
        )
    rng = random.Random(f"spae-icl/{seed}/{setting.ways}/{setting.shots}/{index}")
    labels = rng.sample(sorted(pools), setting.ways)  # the episode's classes, in drawn order
    query_label = rng.choice(labels)
    support: list[int] = []
    query_row = -1
    for label in labels:
        take = setting.shots + (1 if label == query_label else 0)
        rows = rng.sample(pools[label], take)
        support += rows[: setting.shots]
        if label == query_label:
            query_row = rows[-1]
    name_list = class_names(labels, names, label_names, random.Random(rng.random()))
    name_of = dict(zip(labels, name_list, strict=True))

    def example(row: int) -> Example:
        label = images.labels[row]
        return Example(
            images.image_ids[row], label, name_of[label], image_text(images.words[row], setting.layers)
        )

    # the order within each repeat block depends on the block only, so repeats never change block 0
    context: list[Example] = []
    for block in range(setting.repeats + 1):
        order = list(support)
        random.Random(f"spae-icl/{seed}/{setting.ways}/{setting.shots}/{index}/block{block}").shuffle(order)
        context += [example(r) for r in order]
    return Episode(
        index=index,
        setting=setting,
        answer_space=tuple(name_list),
        context=tuple(context),
        query=example(query_row),
        support_ids=tuple(images.image_ids[r] for r in support),
    )


def sample_episodes(
    images: LabelledImages,
    setting: Setting,
    num_episodes: int,
    seed: int = 0,
    names: str = "real",
    label_names: Sequence[str] | dict[int, str] = (),
) -> list[Episode]:
    return [sample_episode(images, setting, i, seed, names, label_names) for i in range(num_episodes)]


def build_prompt(episode: Episode, template: PromptTemplate = PromptTemplate()) -> str:
    """The prompt text: [induction preamble] + context examples + the query."""
    parts = []
    if episode.setting.induction:
        parts.append(template.induction.format(answers=answer_list(episode.answer_space)))
    parts += [template.example.format(image=ex.text, label=ex.name) for ex in episode.context]
    parts.append(template.query.format(image=episode.query.text))
    return "".join(parts)


def parse_answer(completion: str, answer_space: Sequence[str]) -> str | None:
    """The class name the completion gives: the answer-space name whose first whole-word occurrence
    (case-insensitive) comes first; ``None`` when it names none."""
    best: tuple[int, int, str] | None = None  # (position, -length, name)
    for name in answer_space:
        m = re.search(rf"(?<!\w){re.escape(name.lower())}(?!\w)", completion.lower())
        if m and (best is None or (m.start(), -len(name)) < best[:2]):
            best = (m.start(), -len(name), name)
    return best[2] if best else None


def parse_prompt(
    prompt: str, template: PromptTemplate = PromptTemplate()
) -> tuple[list[tuple[str, str]], str]:
    """Invert ``build_prompt``: -> ([(image text, class name)] of the context, query image text).

    Used by learners that read the same prompt an LLM reads. Raises ``ValueError`` if the prompt
    does not follow ``template``.
    """
    pattern = _template_regex(template.example)
    query_pattern = _template_regex(template.query) + r"\Z"
    body = prompt
    # drop an induction preamble: everything before the first example
    first = re.search(pattern, body)
    qm = re.search(query_pattern, body)
    if qm is None:
        raise ValueError("prompt does not end with the template's query")
    start = first.start() if first and first.start() < qm.start() else qm.start()
    pairs = []
    pos = start
    example_re = re.compile(pattern)
    while pos < qm.start():
        m = example_re.match(body, pos)
        if m is None or m.end() > qm.start():
            raise ValueError(f"prompt does not follow the example template at character {pos}")
        pairs.append((m.group("image"), m.group("label")))
        pos = m.end()
    return pairs, qm.group("image")


def _template_regex(fmt: str) -> str:
    out = []
    for literal, name in re.findall(r"(.*?)(?:\{(\w+)\}|$)", fmt, flags=re.S):
        out.append(re.escape(literal))
        if name == "image":
            out.append(r"(?P<image>[^\n]*?)")
        elif name == "label":
            out.append(r"(?P<label>[^\n]*?)")
    return "".join(out)
