"""Fonts for vocabulary words in figures: every script of the codebook legible, no tofu, no warnings.

LLM vocabularies hold CJK, kana, Hangul, Arabic, Thai, Devanagari, Tamil, ... besides Latin; matplotlib's
default DejaVu Sans draws none of those (a box per glyph and a "Glyph N missing" warning each). The project
installs Noto fonts for them (``FONT_PACKAGES``, pinned in requirements.lock). ``font_stack()`` registers
the installed ones with matplotlib once; its ``families`` go to ``font.family`` (matplotlib falls back
glyph by glyph along the list) and ``legible(word)`` writes each character that no font of the stack draws
as its code point, ``[U+0F40]``, which the figure's legend explains (``add_stand_in_legend``).

    with words_font():            # figure built (and saved) inside
        ax.text(x, y, legible(word))
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BASE_FAMILY = "DejaVu Sans"  # matplotlib's own: Latin, Greek, Cyrillic, Armenian, Georgian, Hebrew, symbols
# font-only packages (no code imported): CJK + kana + Hangul, then scripts DejaVu lacks, in fallback order
FONT_PACKAGES = (
    "noto_cjk_sans_otc",
    "fontpkg_noto_sans_arabic",
    "fontpkg_noto_sans_thai",
    "fontpkg_noto_sans_devanagari",
    "fontpkg_noto_sans_tamil",
)
FONT_SUFFIXES = (".ttf", ".otf", ".ttc")
STAND_IN_LEGEND = "[U+XXXX]: a character that no installed font draws, written as its Unicode code point"


@dataclass(frozen=True)
class FontStack:
    families: tuple[str, ...]  # font.family, in fallback order
    covered: frozenset[int]  # code points some family of the stack draws

    def draws(self, word: str) -> bool:
        return all(ord(ch) in self.covered for ch in word)

    def legible(self, word: str) -> str:
        """``word`` with each character no font draws written as ``[U+XXXX]``."""
        if self.draws(word):
            return word
        return "".join(ch if ord(ch) in self.covered else f"[U+{ord(ch):04X}]" for ch in word)


def font_files(packages: Iterable[str] = FONT_PACKAGES) -> list[Path]:
    """The font files the installed ``packages`` carry (a missing package is skipped, with a debug line)."""
    files = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            log.debug("font package %s is not installed: its scripts are written as code points", name)
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        files += sorted(p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES)
    return files


@functools.cache
def font_stack() -> FontStack:
    """Register the installed fonts with matplotlib (once per process) and return the stack."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    families = [BASE_FAMILY]
    covered = set(FT2Font(font_manager.findfont(BASE_FAMILY, fallback_to_default=False)).get_charmap())
    for path in font_files():
        font_manager.fontManager.addfont(str(path))
        font = FT2Font(str(path))  # the first face of a collection: the one addfont names first
        if font.family_name not in families:
            families.append(font.family_name)
        covered |= set(font.get_charmap())
    return FontStack(tuple(families), frozenset(covered))


def legible(word: str) -> str:
    return font_stack().legible(word)


@contextlib.contextmanager
def words_font() -> Iterator[FontStack]:
    """matplotlib's ``font.family`` set to the stack while a figure of words is built and drawn."""
    import matplotlib

    stack = font_stack()
    with matplotlib.rc_context({"font.family": list(stack.families)}):
        yield stack


def add_stand_in_legend(fig, words: Iterable[str]) -> bool:
    """Explain ``[U+XXXX]`` under ``fig`` when any of ``words`` needed it; True if a legend was added."""
    stack = font_stack()
    if all(stack.draws(w) for w in words):
        return False
    fig.text(0.005, 0.002, STAND_IN_LEGEND, fontsize=6, ha="left", va="bottom", color="0.3")
    return True
