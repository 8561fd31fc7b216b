"""The console for a person: training progress travels from rank 0 to the driver's bar through a Ray
actor; ``spae demo``'s output (Python, C-level writes, child processes) goes to its log file while the
terminal keeps only the lines written to it."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import time

from pipeline.runtime.progress import BoardPoster, follow, set_console, start_board


def test_the_driver_bar_follows_rank_0s_posts(ray_cluster):
    board = start_board()
    post = BoardPoster(board)
    screen = io.StringIO()
    set_console(screen)
    try:
        with follow(board, 40, "train", "step", {"loss/total": "loss"}):
            for step in range(1, 41):
                post(step, {"loss/total": 0.5 / step, "ignored": 1.0}, last=step == 40)
                time.sleep(0.05)
            time.sleep(1.5)  # the poll after the last post
    finally:
        set_console(None)
    text = screen.getvalue()
    assert "train" in text and "40/40" in text and "loss=0.0125" in text
    assert "ignored" not in text


def test_posts_are_rate_limited_but_the_last_step_always_goes():
    class Board:
        def __init__(self):
            self.posted = []
            self.post = self

        def remote(self, step, metrics):
            self.posted.append(step)

    board = Board()
    post = BoardPoster(board)
    for step in range(1, 1001):
        post(step, {}, last=step == 1000)
    assert board.posted[0] == 1 and board.posted[-1] == 1000 and len(board.posted) < 10


LOGGED = """
    import logging, os, subprocess, sys
    from pathlib import Path
    from jobs.console import log_to_file

    with log_to_file(Path(sys.argv[1])) as terminal:
        terminal.write("stage 1 ...\\n")
        print("a print")
        os.write(2, b"a C-level write to fd 2\\n")
        subprocess.run(["sh", "-c", "echo a child process"], check=True)
        logging.getLogger("spae.x").info("a log record")
        import warnings; warnings.warn("a warning")
        terminal.write("stage 1: done\\n")
    print("after the block")
"""


def test_log_to_file_keeps_the_terminal_for_its_own_lines(tmp_path):
    log = tmp_path / "logs" / "demo.log"
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOGGED), str(log)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "stage 1 ...\nstage 1: done\nafter the block\n"
    assert run.stderr == ""
    text = log.read_text()
    for line in ("a print", "a C-level write to fd 2", "a child process", "a log record", "a warning"):
        assert line in text
    assert "stage 1" not in text


def test_ray_trains_report_dicts_are_quieted_on_the_logger_ray_uses(caplog):
    import logging

    from ray.train.v2._internal.execution import context

    from pipeline.steps.train import quiet_report_logs

    caplog.set_level(logging.DEBUG)  # a worker that logs everything
    context.logger.setLevel(logging.NOTSET)
    assert context.logger.isEnabledFor(logging.INFO)
    quiet_report_logs()
    assert not context.logger.isEnabledFor(logging.INFO)  # "Reporting training result N: TrainingReport(...)"
    assert context.logger.isEnabledFor(logging.WARNING)
