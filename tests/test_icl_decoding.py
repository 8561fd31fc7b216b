"""Progressive in-context decoding (eq. 11): segment plans, conditioning, prompts, budget, images."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from spae.codebook import FrozenCodebook
from spae.icl.decoding import (
    DecodingConfig,
    DecodingExample,
    DecodingTask,
    DecodingTemplate,
    Segment,
    conditioning,
    corrupt_words,
    decode_image,
    denoising_task,
    generation_task,
    plan_segments,
    prefix_text,
    progressive_decode,
    read_segment,
    segment_prompt,
)
from spae.icl.episodes import LabelledImages, text_words
from spae.icl.learners import Completion
from spae.model import SPAE, preset
from spae.tokenizer import SPAETokenizer

COUNTS = (1, 4, 16, 16)  # the tiny pyramid: layers 1x1, 2x2, 4x4, 4x4


def _words(tag: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(f"{tag}{l}_{i}" for i in range(n)) for l, n in enumerate(COUNTS, start=1))


def test_plan_presets_and_strides():
    plan = plan_segments(COUNTS, DecodingConfig())  # ar_then_nar: PAR for layers 1-3, PNAR for layer 4
    assert plan == [
        Segment(1, 0, 1, "ar"),
        Segment(2, 0, 4, "ar"),
        Segment(3, 0, 16, "ar"),
        Segment(4, 0, 16, "nar"),
    ]
    strided = plan_segments(COUNTS, DecodingConfig(ar_layers=2, ar_stride=2, nar_stride=5))
    assert [(s.layer, s.start, s.stop, s.mode) for s in strided[:3]] == [
        (1, 0, 1, "ar"),
        (2, 0, 2, "ar"),
        (2, 2, 4, "ar"),
    ]
    nar3 = [s for s in strided if s.layer == 3]
    assert [(s.start, s.stop) for s in nar3] == [(0, 5), (5, 10), (10, 15), (15, 16)] and {
        s.mode for s in nar3
    } == {"nar"}
    for l, n in enumerate(COUNTS, start=1):  # every word of every layer exactly once
        assert sum(s.size for s in strided if s.layer == l) == n
    assert {s.mode for s in plan_segments(COUNTS, DecodingConfig(preset="par"))} == {"ar"}
    assert {s.mode for s in plan_segments(COUNTS, DecodingConfig(preset="pnar", layers=2))} == {"nar"}
    assert len(plan_segments(COUNTS, DecodingConfig(preset="pnar", layers=2))) == 2
    with pytest.raises(ValueError, match="pyramid has 4 layers"):
        plan_segments(COUNTS, DecodingConfig(layers=5))


def test_conditioning_par_vs_pnar():
    plan = plan_segments(COUNTS, DecodingConfig(ar_layers=2, ar_stride=2, nar_stride=8))
    # plan: L1 | L2[0:2] L2[2:4] | L3[0:8] L3[8:16] | L4[0:8] L4[8:16]
    assert conditioning(plan, 2) == plan[:2]  # PAR: everything before, the first half of layer 2 included
    assert conditioning(plan, 4) == plan[:3]  # PNAR L3[8:16]: layers 1-2 only, not L3[0:8]
    assert conditioning(plan, 6) == plan[:5]  # PNAR L4[8:16]: layers 1-3
    words = _words("a")
    assert prefix_text(words, plan[:2]) == "[L1] a1_0 [L2] a2_0 a2_1"


def test_segment_prompt_by_hand():
    task = DecodingTask(
        "t",
        (DecodingExample("an image of 1", _words("a")), DecodingExample("an image of 2", _words("b"))),
        "an image of 1+2",
    )
    plan = plan_segments(COUNTS, DecodingConfig(layers=2, preset="par", ar_stride=2))
    decoded = (("q1_0",), ("q2_0", "q2_1", "", ""))
    prompt = segment_prompt(task, plan, 2, decoded, DecodingTemplate())
    assert prompt == (
        "Input: an image of 1 [L1] a1_0 [L2] a2_0 a2_1\nOutput: a2_2 a2_3\n"
        "Input: an image of 2 [L1] b1_0 [L2] b2_0 b2_1\nOutput: b2_2 b2_3\n"
        "Input: an image of 1+2 [L1] q1_0 [L2] q2_0 q2_1\nOutput:"
    )
    first = segment_prompt(task, plan, 0, decoded, DecodingTemplate())
    assert first.endswith("Input: an image of 1+2\nOutput:") and "Output: a1_0\n" in first


class Scripted:
    """Answers each segment prompt with the target's words for that segment (found by counting
    calls along the plan), optionally damaged; records prompts."""

    def __init__(self, target, plan, damage=None):
        self.target, self.plan, self.damage = target, plan, damage
        self.prompts: list[str] = []

    def complete(self, prompt, max_tokens, temperature=0.0, stop=()):
        seg = self.plan[len(self.prompts)]
        self.prompts.append(prompt)
        words = list(self.target[seg.layer - 1][seg.start : seg.stop])
        if self.damage:
            words = self.damage(seg, words)
        return Completion(" " + " ".join(words))

    def count_tokens(self, text):
        return None  # cannot count: the budget check uses a word count


def test_progressive_decode_structure_and_conditioning():
    task = DecodingTask("t", tuple(DecodingExample(f"c{k}", _words(f"x{k}")) for k in range(3)), "query")
    cfg = DecodingConfig(ar_layers=2, ar_stride=2, nar_stride=8)
    plan = plan_segments(COUNTS, cfg)
    target = _words("t")
    model = Scripted(target, plan)
    res = progressive_decode(model, task, COUNTS, cfg)
    assert res.complete and res.words == target and len(res.steps) == len(plan) == len(model.prompts)
    assert [s.segment for s in res.steps] == plan and all(s.padded == s.cut == 0 for s in res.steps)
    for t, prompt in enumerate(model.prompts):
        assert prompt.count("\nOutput: ") == 3  # the 3 context examples
        query = prompt.rsplit("Input: ", 1)[1]
        seen = set(text_words(query.split("query", 1)[1].removesuffix("\nOutput:")))
        want = {
            (s.layer, target[s.layer - 1][i]) for s in conditioning(plan, t) for i in range(s.start, s.stop)
        }
        assert seen == want  # the query shows exactly v_<t'
    assert res.text.startswith("[L1] t1_0 [L2] t2_0 t2_1 t2_2 t2_3 [L3] ")


def test_answers_are_cut_or_padded_and_recorded():
    assert read_segment(" a [L2] b c d", ["y", "z"]) == (("a", "b"), 0, 2)
    assert read_segment("a", ["y", "z"]) == (("a", "z"), 1, 0)
    assert read_segment("", ["y", "z"]) == (("y", "z"), 2, 0)
    task = DecodingTask("t", (DecodingExample("c", _words("x")), DecodingExample("d", _words("x"))), "q")
    cfg = DecodingConfig(layers=2, preset="par")
    plan = plan_segments(COUNTS, cfg)
    res = progressive_decode(Scripted(_words("t"), plan, damage=lambda s, w: w[:2]), task, COUNTS, cfg)
    assert res.steps[1].padded == 2 and res.words[1] == ("t2_0", "t2_1", "x2_2", "x2_3")  # in-context prior


def test_budget_overflow_is_reported_not_truncated():
    task = DecodingTask("t", tuple(DecodingExample(f"c{k}", _words(f"x{k}")) for k in range(4)), "q")
    cfg = DecodingConfig(preset="par", layers=3, context_window=80)
    plan = plan_segments(COUNTS, cfg)
    model = Scripted(_words("t"), plan)
    res = progressive_decode(model, task, COUNTS, cfg)
    assert not res.complete and res.overflow is not None and not res.overflow.fits
    assert not res.overflow.measured and res.overflow.context_window == 80
    assert len(res.steps) == len(model.prompts) == 2  # layers 1 and 2 fit, layer 3's prompt does not
    assert res.words == _words("t")[:2] and res.text.startswith("[L1] t1_0 [L2]")


def test_generation_task_mnist_setup():
    ids = [f"img{i}" for i in range(120)]
    labels = [i % 10 for i in range(120)]
    images = LabelledImages.from_rows(ids, labels, [_words(f"i{i}") for i in range(120)])
    task = generation_task(images, num_context=50, seed=1)
    assert len(task.context) == 50 and task.query == "an image of 1+7"
    conds = Counter(ex.condition for ex in task.context)
    assert conds == Counter({f"an image of {k}": 5 for k in range(10)})  # balanced over the digits
    assert len({ex.image_id for ex in task.context}) == 50
    assert generation_task(images, num_context=50, seed=1) == task
    named = generation_task(images, num_context=10, seed=1, numerals=False)
    assert {ex.condition for ex in named.context} == {
        f"an image of {n}"
        for n in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    }


def test_denoising_task_corruption_rates():
    vocab = [f"v{i}" for i in range(50)]
    words = _words("c")  # 37 words
    noisy = corrupt_words(words, 0.5, vocab, random.Random(0))
    changed = sum(a != b for la, lb in zip(words, noisy, strict=True) for a, b in zip(la, lb, strict=True))
    assert changed == round(0.5 * 37) and [len(l) for l in noisy] == list(COUNTS)
    task = denoising_task([_words(f"k{i}") for i in range(4)], _words("q"), vocab, seed=2)
    assert task.info["rates"] == pytest.approx([0.5, 0.4, 0.3, 0.2])
    for ex, rate in zip(task.context, task.info["rates"], strict=True):
        noisy_words = [w for _, w in text_words(ex.condition)]
        clean = [w for layer in ex.words for w in layer]
        assert sum(a != b for a, b in zip(noisy_words, clean, strict=True)) == round(rate * 37)
    assert task.query.startswith("[L1] q1_0 [L2] q2_0")


@pytest.fixture(scope="module")
def tokenizer() -> SPAETokenizer:
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(64, 384, generator=g), dim=1)
    words = ["zero", "one", "two", "three", "seven"] + [f"w{i}" for i in range(59)]
    torch.manual_seed(0)
    return SPAETokenizer(SPAE(preset("tiny"), FrozenCodebook.from_tensor(emb, words)))


def test_decoded_pyramids_become_images(tokenizer):
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pyr = tokenizer.encode(images)
    per_image = [tuple(tuple(pyr.words(l)[b]) for l in pyr.layers) for b in range(6)]
    counts = tokenizer.pyramid.token_counts
    corpus = LabelledImages.from_rows([f"i{b}" for b in range(6)], [b % 2 for b in range(6)], per_image)
    task = generation_task(corpus, query="an image of 1", num_context=4)
    cfg = DecodingConfig(ar_stride=2, nar_stride=8)  # PAR layers 1-3, PNAR layer 4
    plan = plan_segments(counts, cfg)

    def damage(seg, words):  # an LLM's answer: an unknown word, one word short in layer 3
        if seg.layer == 2 and seg.start == 0:
            return ["Seven!", *words[1:]]
        return words[:-1] if seg.layer == 3 else words

    res = progressive_decode(Scripted(per_image[5], plan, damage), task, counts, cfg)
    assert res.complete and [len(l) for l in res.words] == list(counts)
    out = decode_image(tokenizer, res.text)
    assert out.up_to_layer == 4 and tuple(out.image.shape) == (1, 3, 16, 16)
    assert float(out.image.min()) >= 0.0 and float(out.image.max()) <= 1.0
    assert out.reports[0].unknown_words == [("Seven!", "seven")]
    # an undamaged copy of image 5 decodes to exactly what the tokenizer decodes for image 5
    exact = progressive_decode(Scripted(per_image[5], plan), task, counts, cfg)
    ref = tokenizer.decode(tokenizer.from_text(pyr.to_text()[5])[0])
    assert torch.allclose(decode_image(tokenizer, exact.text).image, ref)
    # fewer layers than a covering prefix: from_text fills the rest and says so
    two = decode_image(tokenizer, "[L1] seven [L2] one two w3 w4")
    assert two.up_to_layer == 3 and two.reports[0].missing_layers == [3]
