"""The reconstruction picture: originals and their reconstructions from every covering prefix.

One column per image. Row 0 holds the originals with the image's top-layer (layer 1) word under
it; row ``r`` holds the decoder's output from the first ``prefixes[r - 1]`` layers, labelled with
the prefix length and its token count. Drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from spae.fonts import add_stand_in_legend, legible, words_font  # noqa: E402


def reconstruction_figure(
    originals: Tensor,
    reconstructions: Mapping[int, Tensor],
    top_words: Sequence[str],
    token_counts: Mapping[int, int] | None = None,
    title: str = "",
) -> Figure:
    """originals [n, 3, H, W] and reconstructions {prefix l: [n, 3, H, W]} in [0, 1]; top_words [n]."""
    n = originals.shape[0]
    if len(top_words) != n:
        raise ValueError(f"{len(top_words)} top-layer words for {n} images")
    for l, r in reconstructions.items():
        if r.shape != originals.shape:
            raise ValueError(
                f"prefix {l}: reconstructions {tuple(r.shape)} != originals {tuple(originals.shape)}"
            )
    with words_font() as stack:
        return _draw(originals, reconstructions, top_words, token_counts, title, list(stack.families))


def _draw(originals, reconstructions, top_words, token_counts, title, family: list[str]) -> Figure:
    n = originals.shape[0]
    prefixes = sorted(reconstructions)
    rows = 1 + len(prefixes)
    fig, axes = plt.subplots(
        rows, n, figsize=(1.2 * n + 1.2, 1.35 * rows + (0.4 if title else 0)), squeeze=False
    )

    def show(ax, img: Tensor) -> None:
        ax.imshow(img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])

    for i in range(n):
        show(axes[0, i], originals[i])
        axes[0, i].set_xlabel(legible(top_words[i]), fontsize=8, family=family)
        for r, l in enumerate(prefixes, start=1):
            show(axes[r, i], reconstructions[l][i])
    axes[0, 0].set_ylabel("input", fontsize=8)
    for r, l in enumerate(prefixes, start=1):
        count = f"\n{token_counts[l]} tok" if token_counts and l in token_counts else ""
        axes[r, 0].set_ylabel(f"<= L{l}{count}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1) if add_stand_in_legend(fig, top_words) else None)
    return fig


def save_reconstruction_figure(path: str | Path, *args, **kwargs) -> Path:
    """``reconstruction_figure(...)`` written to ``path`` as PNG; returns the path."""
    fig = reconstruction_figure(*args, **kwargs)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
