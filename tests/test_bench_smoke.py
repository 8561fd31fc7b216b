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


def test_scale_bench_makes_webdataset_tars_and_measures_its_ceilings(tmp_path):
    """``bench.scale_tokenize``'s steps without Ray: the tars hold every sample once (JPEG + class), the
    subsets link the first tars, and the ceilings step records both rates."""
    from bench import scale_tokenize as st
    from pipeline.inputs.webdataset import scan_tar

    base = ["--root", str(tmp_path), "--smoke", "--per-tar", "20", "--workers", "1"]
    assert st.main(["gen", *base, "--images", "50"]) == 0
    tars = sorted((tmp_path / "wds").glob("*.tar"))
    keys = []
    for tar in tars:
        with open(tar, "rb") as f:
            keys += [s.key for s in scan_tar(f, tar.stat().st_size)]
    assert keys == [f"{i:09d}" for i in range(50)]  # 20 + 20 + 10 samples, in order
    assert sorted(p.name for p in (tmp_path / "sub10k").iterdir()) == [t.name for t in tars]
    assert st.main(["tokenizer", *base]) == 0
    argv = ["ceilings", *base, "--batch", "4", "--reps", "1", "--warmup", "1", "--decode-tars", "2"]
    assert st.main(argv) == 0
    steps = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == ["gen", "tokenizer", "ceilings"]
    assert steps[0]["made_now"] == 50 and 5 < steps[0]["mean_jpeg_kb"] < 60
    assert steps[2]["decode_images"] == 40 and steps[2]["bare_encode_images_per_s"] > 0


def test_scale_bench_rates_and_memory_marks():
    from bench.scale_tokenize import _memory_at, _settled

    samples = [
        {"t": float(t), "rows": rows, "driver_mb": mb}
        for t, rows, mb in [(1, 0, 800), (2, 0, 900), (3, 10, 850), (4, 50, 860), (5, 90, 870), (6, 100, 880)]
    ]
    assert _settled(samples, 0, 100) == round((90 - 10) / (5 - 3), 1)  # first >= 10% to last <= 90%
    assert _memory_at(samples, (10, 100, 1000)) == {"10": 900, "100": 900}  # peak until each mark
