"""Words of every script in the vocabulary are drawn legibly: the installed Noto fonts cover CJK, kana,
Hangul, Arabic, Thai, Devanagari and Tamil; a character no font draws is written as its code point, with
a legend saying so; drawing raises no missing-glyph warning."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pytest

from spae.fonts import STAND_IN_LEGEND, font_stack, legible, words_font
from spae.report import LayerGrid, PyramidPanel, Reconstruction, figure_png, pyramid_figure

SCRIPTS = {
    "CJK": "七",
    "kana": "ひらがな",
    "Hangul": "한국",
    "Arabic": "سبعة",
    "Thai": "เจ็ด",
    "Devanagari": "सात",
    "Tamil": "ஏழு",
    "Cyrillic": "семь",
    "Greek": "επτά",
    "Hebrew": "שבע",
    "Latin": "seven",
}
UNCOVERED = "\u0995"  # BENGALI LETTER KA: no installed font has it


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_the_stack_draws_every_script_of_the_vocabulary(script):
    word = SCRIPTS[script]
    assert font_stack().draws(word), f"{script}: {word!r} has characters no installed font draws"
    assert legible(word) == word


def test_an_uncovered_character_is_written_as_its_code_point():
    assert not font_stack().draws(UNCOVERED)
    assert legible(f"a{UNCOVERED}b") == "a[U+0995]b"


def _panel(words: list[str]) -> PyramidPanel:
    grid = LayerGrid(layer=1, words=(tuple(words[:2]), tuple(words[2:4])), shade=((0.2, 0.9), (0.5, 0.0)))
    image = np.zeros((8, 8, 3), np.uint8)
    return PyramidPanel("img-0", image, (grid,), (Reconstruction(1, 4, image),))


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def test_a_pyramid_of_many_scripts_draws_without_a_missing_glyph(caplog):
    words = [SCRIPTS["CJK"], SCRIPTS["Arabic"], SCRIPTS["Thai"], SCRIPTS["Hangul"]]
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")  # matplotlib's "Glyph N missing from font(s)" is a warning
        png = figure_png([_panel(words)])
    assert png.startswith(b"\x89PNG")
    assert not [r for r in caplog.records if "findfont" in r.getMessage() or "Glyph" in r.getMessage()]
    fig = pyramid_figure([_panel(words)])
    assert set(words) <= set(_texts(fig)) and STAND_IN_LEGEND not in _texts(fig)


def test_a_stand_in_comes_with_its_legend():
    words = ["seven", UNCOVERED, "7", SCRIPTS["CJK"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = pyramid_figure([_panel(words)])
        fig.savefig(io.BytesIO(), format="png")
    texts = _texts(fig)
    assert "[U+0995]" in texts and STAND_IN_LEGEND in texts


def test_words_font_sets_the_family_stack_only_inside():
    import matplotlib

    before = list(matplotlib.rcParams["font.family"])
    with words_font() as stack:
        assert list(matplotlib.rcParams["font.family"]) == list(stack.families)
        assert "Noto Sans CJK JP" in stack.families
    assert list(matplotlib.rcParams["font.family"]) == before
