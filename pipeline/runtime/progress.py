"""Progress for a person at a terminal: one bar per long stage, with its rate and ETA.

Bars are drawn on the console stream: stderr, unless a front end (``spae demo``) sends the process's
output to a log file and keeps the terminal for its own lines (``set_console``). Training runs in Ray
Train workers, so its bar is fed through a ``StepBoard`` actor: rank 0 posts its step, the driver follows
the board (``follow``) while ``fit()`` runs. Nothing here changes what a job computes.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

_console: TextIO | None = None
POLL_S = 1.0  # how often the driver reads the board
POST_S = 0.5  # how often rank 0 posts to it (the last step always)


def set_console(stream: TextIO | None) -> None:
    """Draw bars on ``stream`` from now on (``None``: stderr)."""
    global _console
    _console = stream


def console() -> TextIO:
    return _console if _console is not None else sys.stderr


def bar(total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> Any:
    """A tqdm bar on the console stream (count, rate, ETA)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, file=console())


class StepBoard:
    """The training step as rank 0 last posted it, with a few metrics (a Ray actor: ``start_board``)."""

    def __init__(self) -> None:
        self.step, self.metrics = 0, {}

    def post(self, step: int, metrics: Mapping[str, float]) -> None:
        self.step, self.metrics = step, dict(metrics)

    def read(self) -> tuple[int, dict[str, float]]:
        return self.step, self.metrics


def start_board() -> Any:
    """A ``StepBoard`` actor on the connected Ray cluster (no CPU reserved)."""
    import ray

    return ray.remote(num_cpus=0)(StepBoard).remote()


class BoardPoster:
    """Rank 0's side: post every ``POST_S`` seconds, and always the last step; never blocks the step."""

    def __init__(self, board: Any) -> None:
        self.board, self.last = board, 0.0

    def __call__(self, step: int, metrics: Mapping[str, float], last: bool) -> None:
        now = time.monotonic()
        if self.board is not None and (last or now - self.last >= POST_S):
            self.board.post.remote(step, {k: float(v) for k, v in metrics.items()})
            self.last = now


@contextmanager
def follow(board: Any, total: int, desc: str, unit: str, fields: Mapping[str, str]) -> Iterator[None]:
    """While the body runs, draw ``board``'s step as a bar, ``fields`` ({metric: short name}) beside it."""
    import ray

    if board is None:
        yield
        return
    done = threading.Event()

    def poll() -> None:
        with bar(total, desc, unit) as b:
            while True:
                stopping = done.wait(POLL_S)
                try:
                    step, metrics = ray.get(board.read.remote(), timeout=10)
                except Exception:  # the board is progress only: a lost read is the next poll's
                    step, metrics = b.n, {}
                if step > b.n:
                    b.update(step - b.n)
                shown = {short: f"{metrics[k]:.4g}" for k, short in fields.items() if k in metrics}
                if shown:
                    b.set_postfix(shown, refresh=False)
                if stopping:
                    return

    thread = threading.Thread(target=poll, name=f"{desc}-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=15)
