"""The `spae` CLI refuses bad configs before any work starts: fast, exit status 2, the key named."""

from __future__ import annotations

import socket
import time

import pytest

from jobs.cli import COMMANDS, main


def _run(argv: list[str], capsys) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        status = main(argv)
    except SystemExit as e:  # argparse / parser.exit
        status = int(e.code or 0)
    out = capsys.readouterr()
    return status, out.out + out.err, time.monotonic() - start


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_lists_every_command(capsys):
    status, text, _ = _run(["--help"], capsys)
    assert status == 0
    for name in COMMANDS:
        assert f"  {name}" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pools", "bogus.key=1"], "unknown config key bogus"),
        (["train", "steps=abc"], "steps: expected an integer, got 'abc'"),
        (["vocab", "scorer.kind=clip"], "scorer.kind: 'clip' is not one of"),
        (["demo", "output=s3://bucket/demo"], "the demo writes a local folder"),
    ],
)
def test_bad_config_fails_fast_naming_the_key(argv, message, capsys):
    status, text, seconds = _run(argv, capsys)
    assert status == 2
    assert message in text
    assert seconds < 5


def test_missing_input_fails_fast_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    status, text, seconds = _run(["pools", f"source.uri={missing}", f"vocab={tmp_path}"], capsys)
    assert status == 2
    assert f"source.uri={missing} does not exist" in text
    assert seconds < 5
    status, text, _ = _run(
        ["tokenize", "source.uri=mnist://test", f"tokenizer={missing}", "output=x"], capsys
    )
    assert status == 2 and f"tokenizer={missing} does not exist" in text


def test_unreachable_cluster_fails_fast_naming_it(tmp_path, capsys):
    port = _closed_port()
    argv = ["pools", "source.uri=mnist://test", f"vocab={tmp_path}", f"ray.address=127.0.0.1:{port}"]
    status, text, seconds = _run(argv, capsys)
    assert status == 2
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in text
    assert seconds < 5
