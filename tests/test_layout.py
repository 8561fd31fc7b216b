"""Output folders the data ecosystem reads as they are (docs/CORPUS.md, "Layout"), and the old layout.

A corpus written by the tokenize job (in-process, with error rows) is read from its folder path by pandas,
pyarrow.dataset, DuckDB and Hugging Face ``datasets``: each sees exactly the project's own rows and
columns. A corpus of the old layout (manifest, errors and JSONL beside the parts) is still read by every
reader of the project, and a resumed run keeps writing it in the old layout.
"""

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_decode_report import make_tokenizer

from pipeline.inputs.sources import SourceConfig
from pipeline.outputs.contracts import NEW_LAYOUT, OLD_LAYOUT, CorpusManifest, layout_of
from pipeline.outputs.corpus import read_corpus, read_manifest
from pipeline.outputs.shards import committed_sidecars, read_errors
from pipeline.runtime.tracking import MlflowConfig
from pipeline.steps.tokenize import TokenizeJobConfig, run_tokenize_job

IMAGES = 14  # 2 of them broken: 12 rows, 2 errors, 3 shards of 5


def _images(root: Path) -> Path:
    root.mkdir(parents=True)
    for i in range(IMAGES - 2):
        buf = io.BytesIO()
        Image.new("L", (16, 16), 17 * i).save(buf, format="PNG")
        (root / f"img{i:02d}.png").write_bytes(buf.getvalue())
    (root / "zero.png").write_bytes(b"")
    (root / "junk.png").write_bytes(b"not an image" * 5)
    return root


def _config(root: Path, tokenizer: Path, output: Path) -> TokenizeJobConfig:
    return TokenizeJobConfig(
        source=SourceConfig(uri=str(root / "images"), shard_size=5),
        tokenizer=str(tokenizer),
        output=str(output),
        in_process=True,
        roundtrip_sample=0,
        max_error_fraction=0.5,
        mlflow=MlflowConfig(enabled=False),
        progress=False,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("layout")
    _images(root / "images")
    tokenizer = make_tokenizer(root / "tokenizer")
    result = run_tokenize_job(_config(root, tokenizer, root / "corpus"))
    assert (result.manifest["rows_written"], result.manifest["errors"]) == (IMAGES - 2, 2)
    return root, tokenizer


def test_four_readers_read_exactly_the_data_rows(corpus, tmp_path, monkeypatch):
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset

    folder = str(corpus[0] / "corpus")
    ours = read_corpus(folder)
    assert ours.num_rows == IMAGES - 2 and read_errors(folder).num_rows == 2
    assert layout_of(folder) == NEW_LAYOUT
    ids = sorted(ours.column("image_id").to_pylist())

    frame = pd.read_parquet(folder)
    assert list(frame.columns) == ours.column_names and sorted(frame["image_id"]) == ids

    table = ds.dataset(folder).to_table()
    assert table.column_names == ours.column_names and sorted(table.column("image_id").to_pylist()) == ids

    con = duckdb.connect()
    rel = con.execute(f"select * from read_parquet('{folder}/**/*.parquet')")
    assert [d[0] for d in rel.description] == ours.column_names
    assert (
        sorted(
            r[0]
            for r in con.execute(f"select image_id from read_parquet('{folder}/**/*.parquet')").fetchall()
        )
        == ids
    )

    hf = load_dataset("parquet", data_dir=folder, cache_dir=str(tmp_path / "hf"))
    assert list(hf) == ["train"]
    assert hf["train"].column_names == ours.column_names and sorted(hf["train"]["image_id"]) == ids


def test_the_dataset_card_and_the_metadata_sit_under_the_dot_folder(corpus):
    root, tokenizer = corpus
    folder = root / "corpus"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("part-")) == [".spae"]
    manifest = CorpusManifest.read(str(folder))
    card = (folder / ".spae" / "README.md").read_text()
    assert f"| {IMAGES} | {IMAGES - 2} | 2 | 3 |" in card  # rows in, rows out, errors, shards
    assert manifest.tokenizer_fingerprint in card and "`words_l1` | `list<item: string>`" in card
    assert json.dumps(manifest.raw["config"], indent=2, sort_keys=True) in card
    assert sorted(p.name for p in (folder / ".spae" / "jsonl").iterdir()) == [
        f"part-{i:05d}.jsonl" for i in range(3)
    ]
    errors = pq.read_table(folder / ".spae" / "errors.pq")
    assert sorted(errors.column("image_id").to_pylist()) == ["junk.png", "zero.png"]


def _to_old_layout(folder: Path) -> None:
    """What the tokenize job wrote before ``.spae/``: the same files, beside the parts."""
    meta = folder / ".spae"
    (meta / "manifest.json").rename(folder / "_manifest.json")
    (meta / "errors.pq").rename(folder / "_errors.parquet")
    (folder / "_errors").mkdir()
    for p in (meta / "errors").iterdir():
        p.rename(folder / "_errors" / p.name.replace(".pq", ".parquet"))
    for p in (meta / "jsonl").iterdir():
        p.rename(folder / p.name)
    shutil.rmtree(meta)


def test_an_old_layout_corpus_is_read_and_resumed_in_its_layout(corpus, tmp_path):
    from jobs.decode import DecodeConfig, run_decode
    from pipeline.llm.icl import load_labelled

    root, tokenizer = corpus
    old = tmp_path / "old"
    shutil.copytree(root / "corpus", old)
    _to_old_layout(old)
    new_rows = read_corpus(str(root / "corpus"))
    assert layout_of(str(old)) == OLD_LAYOUT
    assert read_corpus(str(old)).equals(new_rows)
    assert read_manifest(str(old))["rows_written"] == IMAGES - 2 and read_errors(str(old)).num_rows == 2
    assert [loc.name for loc in committed_sidecars(str(old), ".jsonl")] == [
        f"part-{i:05d}.jsonl" for i in range(3)
    ]
    done = run_decode(DecodeConfig(corpus=str(old), rows=(0,), output=str(tmp_path / "decoded")))
    assert len(done) == 1 and Path(done[0].png).exists()
    with pytest.raises(ValueError, match="no labelled rows"):  # a folder source has no labels
        load_labelled(str(old), 1)

    # a run killed after its first commit left shard 00001 without its part (its JSONL and errors orphaned)
    (old / "part-00001.parquet").unlink()
    (old / "_manifest.json").unlink()
    part0 = (old / "part-00000.parquet").read_bytes()
    result = run_tokenize_job(_config(root, tokenizer, old))
    assert result.shards_run == 1 and layout_of(str(old)) == OLD_LAYOUT and not (old / ".spae").exists()
    assert (old / "part-00000.parquet").read_bytes() == part0  # committed shards are kept
    assert read_corpus(str(old)).equals(new_rows)  # the same rows, byte for byte in the recomputed part
    assert (old / "part-00001.parquet").read_bytes() == (root / "corpus" / "part-00001.parquet").read_bytes()
    assert (old / "part-00001.jsonl").read_bytes() == (
        root / "corpus" / ".spae/jsonl/part-00001.jsonl"
    ).read_bytes()
    assert read_manifest(str(old))["errors"] == 2 and read_errors(str(old)).num_rows == 2


def test_a_rerun_of_a_finished_corpus_writes_nothing(corpus, tmp_path):
    root, tokenizer = corpus
    copy = tmp_path / "copy"
    assert run_tokenize_job(_config(root, tokenizer, copy)).shards_run == 3
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    assert run_tokenize_job(_config(root, tokenizer, copy)).shards_run == 0
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()} == before


def test_pools_like_outputs_hide_their_errors_from_duckdb(tmp_path):
    """Any sharded output (pools, vocab) has the same layout: its failed rows are never data to DuckDB."""
    import duckdb

    from pipeline.inputs.sources import list_shards
    from pipeline.outputs.shards import ShardWriter

    _images(tmp_path / "images")
    shards = list_shards(SourceConfig(uri=str(tmp_path / "images"), shard_size=7))
    schema = pa.schema([("image_id", pa.string()), ("value", pa.int64())])
    writer = ShardWriter(str(tmp_path / "out"), shards, schema, identity={"kind": "test"})
    for shard in shards:
        ids = [f"{shard.shard_id}-{i}" for i in range(shard.num_rows)]
        bad = [i == 0 for i in range(shard.num_rows)]
        writer.add(
            {
                "shard_id": [shard.shard_id] * shard.num_rows,
                "image_id": ids,
                "path": ids,
                "value": list(range(shard.num_rows)),
                "error": ["broken" if b else None for b in bad],
                "error_stage": ["decode" if b else None for b in bad],
            }
        )
    manifest = writer.finish()
    folder = tmp_path / "out"
    got = duckdb.connect().execute(f"select count(*) from read_parquet('{folder}/**/*.parquet')").fetchone()
    assert got[0] == manifest["rows_written"] == IMAGES - len(shards)
    assert read_errors(str(folder)).num_rows == manifest["errors"] == len(shards)
    assert "# spae output" in (folder / ".spae" / "README.md").read_text()
