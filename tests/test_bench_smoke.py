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
        ("bench.train_scaling", "RESULT train_scaling"),
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


def test_settled_throughput_times_only_the_batches_after_the_warmup(monkeypatch):
    from bench import ray_timing

    clock = iter([0.0, 10.0, 11.0, 12.0, 12.5, 13.0])  # start, then one arrival per batch

    class FakeDataset:
        def iter_batches(self, batch_size=None, batch_format="numpy"):
            yield from ({"n": n} for n in (8, 8, 8, 8, 4))  # a last, partial batch

    monkeypatch.setattr(ray_timing.time, "perf_counter", lambda: next(clock))
    r = ray_timing.settled_throughput(FakeDataset(), lambda b: b["n"], warmup=2)
    # clock from the 2nd arrival (11 s) to the last (13 s); rows of batches 3, 4, 5
    assert (r["rows"], r["batches"], r["seconds"], r["rows_per_s"]) == (20, 3, 2.0, 10.0)
    assert r["first_batch_s"] == 10.0 and r["median_gap_rows_per_s"] == 8 / 0.5
    clock = iter(range(10))
    with pytest.raises(ValueError, match="more rows"):  # 5 batches cannot time one after 5 warm-up batches
        ray_timing.settled_throughput(FakeDataset(), lambda b: b["n"], warmup=5)
