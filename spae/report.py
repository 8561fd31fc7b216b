"""The token pyramid as a picture and a web page, laid out like the paper's Fig. 4.

For each image, one row: the original, then layers 1..4 as grids of words (cell ``(i, j)`` of
layer ``l`` is the ``(i, j)``-th token of eq. 1, row-major), each cell shaded darker for a higher
score (the token's semantic score for the image when known, else its frequency in the corpus),
then reconstructions from the deeper (covering) prefixes. A layer whose grid is too large to read
is drawn, as in the paper, as a histogram of its most frequent tokens.

Clips (video SPAE): ``frame_strip`` lays a clip's frames side by side (the "original" and each
reconstruction of a panel), and ``layer_grid`` takes a ``(t_l, h_l, w_l)`` layer as an ``h_l x
(t_l * w_l)`` grid: the time steps of the layer side by side, left to right. In the figure a strip's
column is wider; on the page it keeps its aspect, and a panel's ``animations`` (GIF files next to the
page) play the clip.

Pure: numpy + matplotlib (Agg, no pyplot state) + string templates. Inputs are plain arrays
and words; the jobs compute shading and reconstructions.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from spae.fonts import add_stand_in_legend, legible, words_font

SHADE_SEMANTIC = "semantic score"
SHADE_FREQUENCY = "frequency"
MAX_GRID_SIDE = 8  # larger layers are drawn as a histogram of their most frequent tokens
HISTOGRAM_TOP = 8
MAX_WORD_CHARS = 10
MAX_STRIP_CELLS = 4.0  # a frame strip spans at most 4 figure cells
STRIP_HEIGHT_PX = 64  # a frame strip's height on the page


@dataclass(frozen=True)
class LayerGrid:
    """One pyramid layer of one image: ``words`` and ``shade`` are ``[h_l][w_l]``, shade in [0, 1]."""

    layer: int  # 1-indexed
    words: tuple[tuple[str, ...], ...]
    shade: tuple[tuple[float, ...], ...]
    shade_kind: str = SHADE_FREQUENCY

    @property
    def size(self) -> tuple[int, int]:
        return len(self.words), len(self.words[0]) if self.words else 0


@dataclass(frozen=True)
class Reconstruction:
    """A decode from the prefix of layers ``1..prefix`` (``tokens`` of them)."""

    prefix: int
    tokens: int
    image: np.ndarray  # [H, W, 3] uint8
    psnr: float | None = None

    @property
    def caption(self) -> str:
        text = f"layers 1-{self.prefix} ({self.tokens} tokens)"
        return text if self.psnr is None else f"{text}, {self.psnr:.1f} dB"


@dataclass(frozen=True)
class Animation:
    """A file next to the page that plays (a clip's animated GIF), linked by a relative ``href``."""

    href: str
    caption: str


@dataclass(frozen=True)
class PyramidPanel:
    """Everything shown for one image (for a clip: frame strips as ``original`` and reconstructions)."""

    image_id: str
    original: np.ndarray  # [H, W, 3] uint8 (a clip's frame strip: [H, k * W, 3])
    layers: tuple[LayerGrid, ...]
    reconstructions: tuple[Reconstruction, ...] = ()
    label: str | None = None
    animations: tuple[Animation, ...] = ()  # page only: e.g. the source and decoded clip as GIFs


# ----------------------------------------------------------------------------- building blocks


def to_uint8_image(image: object) -> np.ndarray:
    """``[3, H, W]`` / ``[H, W, 3]`` / ``[H, W]`` (float in [0, 1] or uint8) -> ``[H, W, 3]`` uint8."""
    arr = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)  # type: ignore[union-attr]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3:
        raise ValueError(f"an image must be [3, H, W], [H, W, 3] or [H, W]; got shape {arr.shape}")
    if arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # [H, W, c]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return np.ascontiguousarray(arr)


def frequency_shade(ids: Sequence[int], counts: Mapping[int, int]) -> list[float]:
    """Shade per token: ``log(1 + count) / log(1 + max count)`` over ``counts`` (e.g. corpus counts)."""
    top = max(counts.values(), default=0)
    if top <= 0:
        return [0.0 for _ in ids]
    return [math.log1p(counts.get(int(t), 0)) / math.log1p(top) for t in ids]


def score_shade(ids: Sequence[int], scores: Mapping[int, float]) -> list[float]:
    """Shade per token from a ``token_id -> score`` map (e.g. an image's pool), clipped to [0, 1]."""
    return [float(min(1.0, max(0.0, scores.get(int(t), 0.0)))) for t in ids]


def layer_grid(
    layer: int, words: Sequence[str], size: tuple[int, ...], shade: Sequence[float], kind: str
) -> LayerGrid:
    """Row-major flat words and shades (serialization order) -> a ``[h_l][w_l]`` grid; a clip layer
    ``(t_l, h_l, w_l)`` becomes ``[h_l][t_l * w_l]``, time step ``k`` in columns ``k*w_l`` to
    ``(k+1)*w_l - 1``."""
    if len(size) == 3:
        t, h, w = size
        if len(words) != t * h * w or len(shade) != t * h * w:
            raise ValueError(
                f"layer {layer}: {len(words)} words / {len(shade)} shades for a {t}x{h}x{w} grid"
            )
        order = [k * h * w + i * w + j for i in range(h) for k in range(t) for j in range(w)]  # (i, k, j)
        words, shade, size = [words[n] for n in order], [shade[n] for n in order], (h, t * w)
    h, w = size
    if len(words) != h * w or len(shade) != h * w:
        raise ValueError(f"layer {layer}: {len(words)} words / {len(shade)} shades for a {h}x{w} grid")
    rows = tuple(tuple(words[i * w : (i + 1) * w]) for i in range(h))
    shades = tuple(tuple(float(s) for s in shade[i * w : (i + 1) * w]) for i in range(h))
    return LayerGrid(layer=layer, words=rows, shade=shades, shade_kind=kind)


def _short(word: str) -> str:
    word = legible(word)
    return word if len(word) <= MAX_WORD_CHARS else word[: MAX_WORD_CHARS - 1] + "\u2026"


def _shade_rgb(value: float) -> tuple[float, float, float]:
    """0 -> near white, 1 -> dark orange (the paper's darker = more similar)."""
    v = min(1.0, max(0.0, value))
    light, dark = np.array([1.0, 0.97, 0.92]), np.array([0.75, 0.30, 0.02])
    return tuple(float(c) for c in light + (dark - light) * v)  # type: ignore[return-value]


def _top_words(grid: LayerGrid, k: int = HISTOGRAM_TOP) -> list[tuple[str, int]]:
    return Counter(w for row in grid.words for w in row).most_common(k)


# ----------------------------------------------------------------------------- the figure


def pyramid_figure(panels: Sequence[PyramidPanel], title: str = ""):  # -> matplotlib.figure.Figure
    """One row per image: original | layer grids | reconstructions (Fig. 4 of the paper). Words are drawn
    in ``spae.fonts``' stack; a character no font draws is written as its code point, with a legend."""
    if not panels:
        raise ValueError("pyramid_figure needs at least one panel")
    with words_font() as stack:
        return _draw_pyramids(panels, title, list(stack.families))


def _draw_pyramids(panels: Sequence[PyramidPanel], title: str, family: list[str]):
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n_layers = max(len(p.layers) for p in panels)
    n_recon = max(len(p.reconstructions) for p in panels)
    cols = 1 + n_layers + n_recon
    widths = [_aspect(p.original) for p in panels]
    ratios = [max(widths)] + [1.0] * n_layers
    ratios += [max(_aspect(p.reconstructions[k].image) for p in panels if k < len(p.reconstructions))
               for k in range(n_recon)]  # fmt: skip
    fig = Figure(figsize=(2.3 * sum(ratios), 2.5 * len(panels) + (0.4 if title else 0.0)), dpi=100)
    axes = fig.subplots(len(panels), cols, squeeze=False, gridspec_kw={"width_ratios": ratios})
    for r, panel in enumerate(panels):
        row = axes[r]
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        row[0].imshow(panel.original, interpolation="nearest")
        head = panel.image_id if panel.label is None else f"{panel.image_id} ({panel.label})"
        row[0].set_title(_short_id(head), fontsize=8)
        for c, grid in enumerate(panel.layers, start=1):
            ax = row[c]
            h, w = grid.size
            ax.set_title(f"layer {grid.layer} ({h}x{w})", fontsize=8)
            if max(h, w) > MAX_GRID_SIDE:
                top = _top_words(grid)
                ax.barh(range(len(top)), [n for _, n in top], color=_shade_rgb(0.6))
                ax.set_yticks(range(len(top)), [_short(wd) for wd, _ in top], fontsize=6, family=family)
                ax.invert_yaxis()
                continue
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_aspect("equal")
            size = max(3.0, min(11.0, 44.0 / max(h, w)))
            for i in range(h):
                for j in range(w):
                    s = grid.shade[i][j]
                    ax.add_patch(Rectangle((j, i), 1, 1, facecolor=_shade_rgb(s), edgecolor="0.6", lw=0.4))
                    ax.text(
                        j + 0.5,
                        i + 0.5,
                        _short(grid.words[i][j]),
                        ha="center",
                        va="center",
                        fontsize=size,
                        color="white" if s > 0.55 else "black",
                        clip_on=True,
                        family=family,
                    )
        for c, recon in enumerate(panel.reconstructions, start=1 + n_layers):
            row[c].imshow(recon.image, interpolation="nearest")
            row[c].set_title(recon.caption, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    words = [w for p in panels for g in p.layers for row in g.words for w in row]
    fig.tight_layout(rect=(0, 0.02, 1, 1) if add_stand_in_legend(fig, words) else None)
    return fig


def _aspect(image: np.ndarray) -> float:
    """Column width of a picture in figure cells: 1 if square, up to ``MAX_STRIP_CELLS`` for strips."""
    h, w = np.asarray(image).shape[:2]
    return float(min(MAX_STRIP_CELLS, max(1.0, w / max(1, h))))


def _short_id(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else "\u2026" + text[-(limit - 1) :]


def figure_png(panels: Sequence[PyramidPanel], title: str = "") -> bytes:
    """``pyramid_figure`` rendered to PNG bytes."""
    fig = pyramid_figure(panels, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def frame_strip(clip: object, max_frames: int = 16) -> np.ndarray:
    """A clip ``[3, T, H, W]`` (float in [0, 1]) or ``[T, H, W, 3]`` (uint8) -> its frames side by side,
    ``[H, k * W, 3]`` uint8, with at most ``max_frames`` frames spread evenly over the clip."""
    arr = np.asarray(clip.detach().cpu() if hasattr(clip, "detach") else clip)  # type: ignore[union-attr]
    if arr.ndim != 4:
        raise ValueError(f"a clip must be [3, T, H, W] or [T, H, W, 3]; got shape {arr.shape}")
    if arr.shape[-1] != 3 and arr.shape[0] in (1, 3):
        arr = arr.transpose(1, 2, 3, 0)  # [T, H, W, c]
    t = arr.shape[0]
    keep = sorted({round(i * (t - 1) / max(1, min(t, max_frames) - 1)) for i in range(min(t, max_frames))})
    return np.concatenate([to_uint8_image(arr[i]) for i in keep], axis=1)


def image_png(image: np.ndarray, scale: int = 1) -> bytes:
    """``[H, W, 3]`` uint8 -> PNG bytes (nearest-neighbour upscaled by ``scale``)."""
    from PIL import Image

    arr = to_uint8_image(image)
    if scale > 1:
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- the page

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table.meta td {{ padding: 0.1em 0.8em 0.1em 0; vertical-align: top; font-size: 0.9em; }}
section.image {{ display: flex; gap: 1.2em; align-items: flex-start; margin: 1.2em 0;
  padding-top: 0.8em; border-top: 1px solid #ddd; flex-wrap: wrap; }}
figure {{ margin: 0; text-align: center; font-size: 0.8em; }}
figure img {{ image-rendering: pixelated; width: 112px; height: 112px; }}
table.grid {{ border-collapse: collapse; }}
table.grid td {{ border: 1px solid #bbb; padding: 2px 4px; font-size: 0.75em; text-align: center;
  min-width: 2.5em; }}
ol.hist {{ font-size: 0.8em; margin: 0; padding-left: 1.5em; }}
</style>
</head>
<body>
<h1>{title}</h1>
<table class="meta">
{meta}
</table>
{figure}
{sections}
</body>
</html>
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _grid_html(grid: LayerGrid) -> str:
    h, w = grid.size
    head = f"<figcaption>layer {grid.layer} ({h}x{w}), shaded by {html.escape(grid.shade_kind)}</figcaption>"
    if max(h, w) > MAX_GRID_SIDE:
        items = "".join(f"<li>{html.escape(wd)} &times;{n}</li>" for wd, n in _top_words(grid))
        return f'<figure class="layer" data-layer="{grid.layer}"><ol class="hist">{items}</ol>{head}</figure>'
    rows = []
    for i in range(h):
        cells = []
        for j in range(w):
            s = grid.shade[i][j]
            r, g, b = (round(255 * c) for c in _shade_rgb(s))
            fg = "#fff" if s > 0.55 else "#000"
            cells.append(
                f'<td style="background: rgb({r},{g},{b}); color: {fg}" title="{s:.3f}">'
                f"{html.escape(grid.words[i][j])}</td>"
            )
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = '<table class="grid">' + "".join(rows) + "</table>"
    return f'<figure class="layer" data-layer="{grid.layer}">{table}{head}</figure>'


def _img_style(image: np.ndarray) -> str:
    """Square pictures keep the page's 112 px boxes; a frame strip keeps its aspect at a fixed height."""
    h, w = np.asarray(image).shape[:2]
    return "" if w <= 1.5 * h else f' style="width: auto; height: {STRIP_HEIGHT_PX}px"'


def _panel_html(panel: PyramidPanel) -> str:
    label = "" if panel.label is None else f" &mdash; label {html.escape(str(panel.label))}"
    original = _data_uri(image_png(panel.original))
    parts = [
        f'<figure><img alt="original {html.escape(panel.image_id)}" src="{original}"'
        f"{_img_style(panel.original)}><figcaption>original</figcaption></figure>"
    ]
    parts += [
        f'<figure class="animation"><img alt="{html.escape(a.caption)}" src="{html.escape(a.href)}">'
        f"<figcaption>{html.escape(a.caption)}</figcaption></figure>"
        for a in panel.animations
    ]
    parts += [_grid_html(g) for g in panel.layers]
    parts += [
        f'<figure><img alt="{html.escape(r.caption)}" src="{_data_uri(image_png(r.image))}"'
        f"{_img_style(r.image)}><figcaption>{html.escape(r.caption)}</figcaption></figure>"
        for r in panel.reconstructions
    ]
    return (
        f'<h2 id="{html.escape(panel.image_id)}">{html.escape(panel.image_id)}{label}</h2>\n'
        f'<section class="image" data-image-id="{html.escape(panel.image_id)}">\n'
        + "\n".join(parts)
        + "\n</section>"
    )


def report_html(
    panels: Sequence[PyramidPanel],
    title: str = "SPAE token pyramids",
    meta: Mapping[str, str] | None = None,
    figure_href: str | None = None,
) -> str:
    """A self-contained HTML page (images inlined as data URIs); ``figure_href`` links the PNG figure."""
    meta_rows = "\n".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in (meta or {}).items()
    )
    figure = ""
    if figure_href:
        href = html.escape(figure_href)
        figure = (
            f'<p><a href="{href}"><img alt="pyramid figure" src="{href}" style="max-width: 100%"></a></p>'
        )
    return _PAGE.format(
        title=html.escape(title),
        meta=meta_rows,
        figure=figure,
        sections="\n".join(_panel_html(p) for p in panels),
    )
