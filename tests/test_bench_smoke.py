"""Every benchmark's ``--smoke`` mode runs on the CPU in seconds and prints its result line."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.mark.parametrize(
    ("module", "result"),
    [
        ("bench.saq_search", "RESULT saq_search"),
        ("bench.train_step", "RESULT train_step"),
        ("bench.tokenize_stage", "RESULT tokenize_bare"),
        ("bench.pool_stage", "bare tower"),
        ("bench.vocab_stage", "bare tower"),
    ],
)
def test_bench_smoke(module, result, tmp_path, capsys):
    pytest.importorskip("open_clip") if module in ("bench.pool_stage", "bench.vocab_stage") else None
    out = tmp_path / "out.json"
    argv = ["--smoke", "--json", str(out)] + (["--no-ray"] if module != "bench.saq_search" else [])
    if module == "bench.train_step":
        argv = ["--smoke", "--json", str(out)]
    assert importlib.import_module(module).main(argv) == 0
    assert result in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["bench"] == module.split(".")[1]
    assert record["results"]
