"""bench/video_preset.py: its ``--smoke`` run on the CPU, and its reading of a demo's clip pools table."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def test_video_preset_smoke_writes_metrics_with_commit_card_and_seed(tmp_path, capsys):
    from bench import video_preset

    out = tmp_path / "video.json"
    assert video_preset.main(["--smoke", "--seed", "3", "--commit", "abc1234", "--json", str(out)]) == 0
    assert "RESULT video_preset seed 3 step 3" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert (record["bench"], record["commit"], record["card"], record["seed"]) == (
        "video_preset",
        "abc1234",
        "cpu",
        3,
    )
    assert record["completed"] and record["step"] == record["schedule"]["steps"] == 3
    # tiny3d: layers 3 and 4 cover the latent; PSNR and SSIM per prefix over the 4 clips' frames
    assert {k for k in record if k.startswith(("psnr/", "ssim/"))} == {
        "psnr/p3",
        "psnr/p4",
        "ssim/p3",
        "ssim/p4",
    }
    assert all(math.isfinite(record[k]) and record[k] > 0 for k in ("psnr/p3", "psnr/p4"))
    assert (record["clips"], record["frames_per_clip"]) == (4, 4)
    assert 0.0 <= record["label_word_accuracy/l1"] <= 1.0
    # the accuracy is the share of the first clips' layer-1 words that name their digit (word or numeral)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    hits = [
        w in (names[lab], str(lab))
        for w, lab in zip(record["layer1_words_first10"], record["labels_first10"], strict=True)
    ]
    assert record["label_word_accuracy/l1"] == pytest.approx(sum(hits) / len(hits))
    assert len(record["evaluations"]) == 1 and record["evaluations"][0]["step"] == 3


def test_clip_pools_are_read_by_clip_index_with_padding(tmp_path):
    from bench.video_preset import read_clip_pools

    pools = tmp_path / "pools-train"
    pools.mkdir()
    table = pa.table(
        {
            "image_id": ["mmnist-train-000007-d3", "mmnist-train-000002-d5"],
            "topk_ids": [[4, 9, 1], [8]],
            "topk_scores": [[1.0, 0.5, 0.25], [0.75]],
        }
    )
    pq.write_table(table, pools / "part-00000.parquet")
    index, ids, scores = read_clip_pools(str(pools))
    assert index.tolist() == [2, 7]  # sorted by clip index
    assert ids.tolist() == [[8, -1, -1], [4, 9, 1]]
    assert scores[0, 0] == 0.75 and np.isnan(scores[0, 1:].numpy()).all()
    pq.write_table(
        table.set_column(0, "image_id", pa.array(["mnist-train-3", "x"])), pools / "part-00000.parquet"
    )
    with pytest.raises(ValueError, match="not a Moving MNIST training clip id"):
        read_clip_pools(str(pools))
