"""A console for a person: the process's output goes to a log file, the terminal keeps a few lines.

``spae demo`` runs every stage in one process next to a local Ray cluster, whose workers, C++ core,
Ray Data and Ray Train write to the process's stdout/stderr file descriptors. ``log_to_file(path)`` points
descriptors 1 and 2 at ``path`` (so everything, Python or not, this process or its children, lands there)
and yields a stream on the original terminal for the stage lines and the progress bars
(``pipeline.runtime.progress.set_console``). Leaving the block puts the descriptors back.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from pipeline.runtime.progress import set_console

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def log_to_file(path: Path) -> Iterator[TextIO]:
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    handler = logging.StreamHandler(sys.stderr)  # fd 2 from here on: the log file
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    level = root.level
    with open(path, "a", buffering=1, encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        root.addHandler(handler)
        root.setLevel(min(level, logging.INFO) if level else logging.INFO)
        set_console(terminal)
        try:
            yield terminal
        finally:
            set_console(None)
            root.removeHandler(handler)
            root.setLevel(level)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()
