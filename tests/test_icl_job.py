"""``spae icl``: the grid over a synthetic corpus in the tokenize job's schema, with the reference learner."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from icl_helpers import NAMES, write_corpus

from jobs import icl as icl_job
from pipeline.llm.icl import GridConfig, ICLJobConfig, format_table, load_labelled, run_grid
from pipeline.llm.llm import LLMConfig


@pytest.fixture()
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def test_load_labelled_drops_unlabelled_rows_and_checks_layers(corpus, tmp_path):
    images = load_labelled(str(corpus), 2)
    assert len(images) == 30 and set(images.labels) == set(range(5)) and images.num_layers == 2
    assert [len(l) for l in images.words[0]] == [1, 4]
    with pytest.raises(ValueError, match=r"lacks layers \[4\]"):
        load_labelled(str(corpus), 4)
    with pytest.raises(FileNotFoundError, match="no corpus shards"):
        load_labelled(str(tmp_path), 1)


def test_grid_table1_layout_with_reference_learner(corpus, tmp_path):
    cfg = ICLJobConfig(
        corpus=str(corpus),
        output=str(tmp_path / "out"),
        episodes=6,
        label_names=tuple(NAMES),
        grid=GridConfig(ways=(2, 5), layers=(1, 3)),
    )
    res = run_grid(cfg)
    rows = res.results.to_pylist()
    assert len(rows) == 2 * 2 * 7 and res.episodes.num_rows == 28 * 6
    assert {(r["induction"], r["shots"], r["repeats"]) for r in rows} == {
        (False, 1, 0),
        (True, 1, 0),
        (True, 3, 0),
        (True, 5, 0),
        (True, 1, 1),
        (True, 1, 3),
        (True, 1, 5),
    }
    assert all(r["accuracy"] == 1.0 and r["scored"] == 6 for r in rows if r["layers"] == 1)  # layer 1 = name
    assert {r["tokens_per_image"] for r in rows} == {1, 21}
    lines = res.table.splitlines()
    assert lines[0].split()[:2] == ["Task", "Induction"] and lines[0].split()[2:] == [
        "0",
        "1",
        "1",
        "1",
        "1",
        "1",
        "1",
        "Avg",
    ]
    assert lines[1].split()[2:] == ["1", "1", "3", "5", "1", "1", "1"]
    assert lines[2].split()[-7:] == ["0", "0", "0", "0", "1", "3", "5"]
    assert lines[4] == "2-Way Classification" and lines[5].startswith("SPAE 1: 1 ")
    assert lines[5].split()[-8:] == ["100.0"] * 7 + ["100.00"]
    assert "5-Way Classification" in lines and lines[-1].startswith("SPAE 3: 21")


def test_overflow_and_budget_are_reported(corpus, tmp_path):
    grid = GridConfig(preset="product", ways=(2,), layers=(3,), shots=(1,), repeats=(0, 5), induction=(True,))
    cfg = ICLJobConfig(
        corpus=str(corpus),
        output=str(tmp_path / "o"),
        episodes=4,
        llm=LLMConfig(context_window=150),
        grid=grid,
    )
    res = run_grid(cfg)
    short, long = res.results.to_pylist()
    assert short["overflow"] == 0 and short["scored"] == 4
    assert long["overflow"] == 4 and long["scored"] == 0 and long["mean_prompt_tokens"] > 150
    over = [e for e in res.episodes.to_pylist() if e["status"] == "overflow"]
    assert len(over) == 4 and all("does not fit a context window of 150" in e["reason"] for e in over)
    assert all(e["completion"] == "" and e["prompt"] for e in over)  # kept whole, never sent
    assert "-" in res.table.splitlines()[-1]
    cfg = ICLJobConfig(
        corpus=str(corpus), output=str(tmp_path / "o"), episodes=4, llm=LLMConfig(max_requests=5), grid=grid
    )
    statuses = [e["status"] for e in run_grid(cfg).episodes.to_pylist()]
    assert statuses.count("ok") == 5 and statuses.count("budget") == 3  # one budget for the whole grid
    flagged = format_table([dict(r, overflow=1) for r in res.results.to_pylist()[:1]])
    assert "100.0*" in flagged


def test_job_main_writes_outputs_and_logs_to_mlflow(corpus, tmp_path, capsys):
    import mlflow

    out = tmp_path / "icl"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # artifacts under tmp_path (a SQLite store alone would put them in ./mlruns)
    mlflow.MlflowClient(uri).create_experiment(
        "icl-test", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    rc = icl_job.main(
        [
            f"corpus={corpus}",
            f"output={out}",
            "episodes=5",
            "grid.ways=[2]",
            "grid.layers=[2]",
            "label_names=[zero,one,two,three,four]",
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=icl-test",
            "class_names=nonsense",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "2-Way Classification" in printed and "SPAE 2: 5" in printed
    results = pq.read_table(out / "results.parquet").to_pylist()
    assert len(results) == 7 and (out / "table.txt").read_text().startswith("Task Induction")
    episodes = pq.read_table(out / "episodes.parquet").to_pylist()
    assert len(episodes) == 35 and all(e["answer"] in ("dax", "blicket") for e in episodes)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("icl-test")
    run = client.search_runs([exp.experiment_id])[0]
    assert run.data.params["grid.preset"] == "table1" and run.data.params["llm.backend"] == "reference"
    assert 0.0 <= run.data.metrics["accuracy.w2_s1_r0_i1_l2"] <= 1.0
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "icl")}
    assert {"icl/table.txt", "icl/examples.json"} <= arts
    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="icl/examples.json", tracking_uri=uri
    )
    ex = json.loads(Path(path).read_text())
    assert len(ex) == 14 and ex[0]["prompt"].startswith("Input: [L1] ") and ex[0]["completion"]
    assert icl_job.SUMMARY and icl_job.CONFIG_CLASS is ICLJobConfig


def test_config_errors_name_the_key(capsys):
    with pytest.raises(SystemExit) as err:
        icl_job.main(["episodes=5"])
    assert err.value.code == 2 and "corpus is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        icl_job.main(["corpus=x", "llm.backend=openai"])
    assert "llm.model is required" in capsys.readouterr().err
