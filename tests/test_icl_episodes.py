"""Few-shot episodes (Frozen/LQAE protocol), prompts against golden strings, the reference learner."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from spae.icl.episodes import (
    NONSENSE_WORDS,
    LabelledImages,
    PromptTemplate,
    Setting,
    answer_list,
    build_prompt,
    image_text,
    parse_answer,
    parse_prompt,
    sample_episode,
    sample_episodes,
)
from spae.icl.learners import (
    ReferenceLearner,
    check_budget,
    cosine,
    nearest_neighbour,
    tfidf_vectors,
    token_bag,
)

GOLDEN = Path(__file__).parent / "golden"
NAMES = ("zero", "one", "two")


def tiny_corpus(per_class: int = 3, classes: int = 3) -> LabelledImages:
    """Image ``c-k``: layer 1 = the class name, layer 2 = 2 class words + 2 shared words."""
    ids, labels, words = [], [], []
    for c in range(classes):
        for k in range(per_class):
            ids.append(f"img-{c}-{k}")
            labels.append(c)
            words.append(((NAMES[c] if c < 3 else f"c{c}",), (f"a{c}", f"b{c}{k}", "dark", f"n{k}")))
    return LabelledImages.from_rows(ids, labels, words)


def test_image_text_uses_the_corpus_format():
    words = (("seven",), ("a", "b", "c", "d"), tuple("efghijklmnopqrst"))
    assert image_text(words, 1) == "[L1] seven"
    assert image_text(words, 2) == "[L1] seven [L2] a b c d"
    assert len(image_text(words, 3).split()) == 3 + 21  # 3 tags + 21 tokens (the paper's best prefix)
    with pytest.raises(ValueError, match="layers 1..3"):
        image_text(words, 4)


@pytest.mark.parametrize("ways,shots,repeats", [(2, 1, 0), (3, 2, 1), (2, 1, 3)])
def test_episode_counts_and_repeat_structure(ways, shots, repeats):
    images = tiny_corpus()
    ep = sample_episode(images, Setting(ways, shots, repeats, True, 2), index=4, seed=7)
    n = ways * shots
    assert len(ep.context) == (repeats + 1) * n and len(ep.support_ids) == n == len(set(ep.support_ids))
    assert len(ep.answer_space) == ways == len(set(ep.answer_space))
    per_class = Counter(ex.name for ex in ep.context[:n])
    assert sorted(per_class.values()) == [shots] * ways and set(per_class) == set(ep.answer_space)
    for block in range(repeats + 1):  # every block is a permutation of the support set
        assert sorted(ex.image_id for ex in ep.context[block * n : (block + 1) * n]) == sorted(ep.support_ids)
    assert ep.query.image_id not in ep.support_ids and ep.answer in ep.answer_space
    assert ep.query.name == NAMES[ep.query.label] or ep.query.name == str(ep.query.label)


def test_episodes_are_seeded_and_paired_across_settings():
    images = tiny_corpus(per_class=5)
    a = sample_episodes(images, Setting(2, 1, 0, True, 2), 6, seed=3)
    b = sample_episodes(images, Setting(2, 1, 0, True, 2), 6, seed=3)
    c = sample_episodes(images, Setting(2, 1, 0, True, 2), 6, seed=4)
    assert a == b and a != c
    assert sample_episode(images, Setting(2, 1, 0, True, 2), 5, seed=3) == a[5]  # independent of the count
    # repeats, induction and layers keep the same classes, support and query (a paired comparison)
    for other in (Setting(2, 1, 3, True, 2), Setting(2, 1, 0, False, 1)):
        d = sample_episodes(images, other, 6, seed=3)
        for x, y in zip(a, d, strict=True):
            assert x.support_ids == y.support_ids and x.query.image_id == y.query.image_id
            assert x.answer_space == y.answer_space
            assert [e.image_id for e in y.context[:2]] == [e.image_id for e in x.context]
    # the queries are spread over classes and images
    assert len({e.query.image_id for e in sample_episodes(images, Setting(2, 1, layers=1), 40, seed=0)}) > 5


def test_class_names_real_and_nonsense():
    images = tiny_corpus()
    real = sample_episode(images, Setting(3, 1, 0, True, 1), 0, label_names=NAMES)
    assert set(real.answer_space) == set(NAMES)
    assert all(ex.name == NAMES[ex.label] for ex in real.context)
    plain = sample_episode(images, Setting(3, 1, 0, True, 1), 0)
    assert set(plain.answer_space) == {"0", "1", "2"}
    odd = sample_episode(images, Setting(3, 1, 0, True, 1), 0, names="nonsense")
    assert set(odd.answer_space) == set(NONSENSE_WORDS[:3])
    mapping = {ex.label: ex.name for ex in odd.context}
    assert len(set(mapping.values())) == 3 and odd.query.name == mapping[odd.query.label]


def test_sampling_errors_name_the_problem():
    images = tiny_corpus(per_class=2)
    with pytest.raises(ValueError, match="4 classes"):
        sample_episode(images, Setting(4, 1, layers=1), 0)
    with pytest.raises(ValueError, match="at least 3 images"):
        sample_episode(images, Setting(2, 2, layers=1), 0)
    with pytest.raises(ValueError, match="corpus holds 2"):
        sample_episode(images, Setting(2, 1, layers=3), 0)
    with pytest.raises(ValueError, match="ways >= 2"):
        Setting(1, 1)


@pytest.mark.parametrize(
    "name,setting,names",
    [
        ("prompt_2way_1shot_induction_l2.txt", Setting(2, 1, 0, True, 2), "real"),
        ("prompt_3way_1shot_repeat1_l1.txt", Setting(3, 1, 1, False, 1), "real"),
        ("prompt_2way_2shot_nonsense_l2.txt", Setting(2, 2, 0, True, 2), "nonsense"),
    ],
)
def test_prompts_match_golden_strings(name, setting, names):
    ep = sample_episode(tiny_corpus(), setting, index=0, seed=0, names=names, label_names=NAMES)
    prompt = build_prompt(ep)
    assert prompt == (GOLDEN / name).read_text()


def test_prompt_layout_by_hand():
    ep = sample_episode(tiny_corpus(), Setting(2, 1, 1, True, 1), 0, label_names=NAMES)
    lines = build_prompt(ep).split("\n")
    assert lines[0] == f"Answer with {ep.answer_space[0]} or {ep.answer_space[1]}."
    assert len(lines) == 1 + 2 * 4 + 2  # preamble, 4 examples of 2 lines, query of 2 lines
    assert lines[-1] == "Output:" and lines[-2] == f"Input: {ep.query.text}"
    assert answer_list(["a", "b", "c"]) == "a, b or c" and answer_list(["a"]) == "a"
    no_induction = build_prompt(sample_episode(tiny_corpus(), Setting(2, 1, 1, False, 1), 0))
    assert no_induction.startswith("Input: [L1] ")


def test_parse_prompt_inverts_build_prompt():
    ep = sample_episode(tiny_corpus(), Setting(3, 2, 1, True, 2), 2, label_names=NAMES)
    context, query = parse_prompt(build_prompt(ep))
    assert context == [(ex.text, ex.name) for ex in ep.context] and query == ep.query.text
    with pytest.raises(ValueError, match="query"):
        parse_prompt("no prompt here")
    with pytest.raises(ValueError, match="must contain"):
        PromptTemplate(example="{image} is")


def test_parse_answer():
    space = ("seven", "one", "dax")
    assert parse_answer(" seven", space) == "seven"
    assert parse_answer("This is a Dax. One more", space) == "dax"
    assert parse_answer("sevens everywhere", space) is None  # whole words only
    assert parse_answer("", space) is None


def test_tfidf_hand_computed():
    bags = [Counter({"a": 2, "b": 1}), Counter({"b": 1})]
    v = tfidf_vectors(bags)
    idf_a, idf_b = math.log(3 / 2) + 1, 1.0  # n = 2: a in 1 bag, b in both
    norm = math.sqrt((2 * idf_a) ** 2 + idf_b**2)
    assert v[0]["a"] == pytest.approx(2 * idf_a / norm) and v[0]["b"] == pytest.approx(1 / norm)
    assert v[1] == {"b": 1.0}
    assert cosine(v[0], v[1]) == pytest.approx(1 / norm)
    assert token_bag("[L1] x [L2] x y") == Counter({"1:x": 1, "2:x": 1, "2:y": 1})
    assert token_bag("[L1] x [L2] x y", by_layer=False) == Counter({"x": 2, "y": 1})


def test_nearest_neighbour_and_reference_learner():
    context = [("[L1] one [L2] a b", "one"), ("[L1] two [L2] c d", "two"), ("[L1] one [L2] a b", "one")]
    pred = nearest_neighbour(context, "[L1] two [L2] c x")
    assert pred.label == "two" and pred.scores["one"] == 0.0 and pred.score > 0
    assert nearest_neighbour(context, "[L1] zzz").label == "one"  # no overlap: the first class seen
    images = tiny_corpus(per_class=4)
    learner = ReferenceLearner()
    eps = sample_episodes(images, Setting(3, 1, 0, True, 2), 20, seed=1, label_names=NAMES)
    answers = [parse_answer(learner.complete(build_prompt(e), 4).text, e.answer_space) for e in eps]
    assert answers == [e.answer for e in eps]  # layer 1 is the class name: always right


def test_budget_overflow_is_reported():
    learner = ReferenceLearner()
    prompt = build_prompt(sample_episode(tiny_corpus(), Setting(2, 1, 0, True, 2), 0))
    n = len(prompt.split())
    ok = check_budget(learner, prompt, max_new_tokens=4, context_window=n + 4)
    assert ok.fits and ok.prompt_tokens == n and ok.overflow == 0 and ok.measured
    over = check_budget(learner, prompt, max_new_tokens=4, context_window=n + 3)
    assert not over.fits and over.overflow == 1 and "does not fit" in over.describe()
    assert check_budget(learner, prompt, 4, context_window=0).fits  # unknown window
