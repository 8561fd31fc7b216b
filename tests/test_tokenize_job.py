"""The tokenize job: MNIST -> corpus on S3 exactly once, bad images, MLflow lineage; the stage alone."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.inputs.images import DecodeOptions, decode_batch, decode_table, to_float
from pipeline.inputs.sources import SourceConfig, list_shards, read_shard
from pipeline.outputs.corpus import ids_from_table, parse_jsonl, read_corpus
from pipeline.outputs.shards import ShardError, read_errors, read_manifest
from pipeline.runtime.stages import TooManyErrors
from pipeline.runtime.storage import resolve
from pipeline.runtime.tracking import MlflowConfig
from pipeline.steps.tokenize import (
    InjectedFailure,
    TokenizeJobConfig,
    TokenizeStage,
    TokenizeStageConfig,
    load_tokenizer,
    run_tokenize_job,
    tokenize_spec,
)
from spae.codebook import FrozenCodebook
from spae.encode_options import EncodeOptions
from spae.model import preset
from spae.tokenizer import SPAETokenizer

NO_MLFLOW = MlflowConfig(enabled=False)


def make_tokenizer(folder: Path, vocab: int = 48, seed: int = 0) -> Path:
    """A random-weight ``tiny`` tokenizer (16px images, layers 1x1, 2x2, 4x4, 4x4) saved to ``folder``."""
    torch.manual_seed(seed)
    cfg = preset("tiny")
    words = [f"w{i}" for i in range(vocab)]
    codebook = FrozenCodebook.from_tensor(torch.randn(vocab, cfg.network.latent_dim), words=words)
    return SPAETokenizer.from_config(cfg, codebook).save_pretrained(folder)


def upload(folder: Path, uri: str) -> str:
    dest = resolve(uri)
    for path in folder.iterdir():
        dest.join(path.name).write_bytes(path.read_bytes())
    return uri


def library_and_corpus_rows(tokenizer, raw, table):
    """The library's token pyramid of a read shard's images, and the corpus rows of those images in
    the shard's order."""
    pixels = decode_table(raw, DecodeOptions(tokenizer.config.image_size))["pixels"]
    ref = tokenizer.encode(torch.from_numpy(to_float(pixels)))
    rows = {iid: i for i, iid in enumerate(table.column("image_id").to_pylist())}
    return ref, table.take([rows[i] for i in raw.column("image_id").to_pylist()])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _png(mode: str, size: tuple[int, int], value) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    return buf.getvalue()


def test_stage_encodes_ok_rows_and_passes_errors(tokenizer_dir):
    stage = TokenizeStage(TokenizeStageConfig(str(tokenizer_dir), layers=(1, 2)))
    pixels = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    batch = {
        "shard_id": np.array(["00000"] * 3, dtype=object),
        "image_id": np.array(["a", "b", "c"], dtype=object),
        "source": np.array(["s"] * 3, dtype=object),
        "label": np.array([1, None, 3], dtype=object),
        "path": np.array(["pa", "pb", "pc"], dtype=object),
        "error": np.array([None, "zero-byte file", float("nan")], dtype=object),  # NaN: Ray's null
        "error_stage": np.array([None, "decode", None], dtype=object),
        "pixels": pixels,
    }
    out = stage(batch)
    ref = stage.tokenizer.encode(torch.from_numpy(to_float(pixels[[0, 2]])), layers=(1, 2))
    np.testing.assert_array_equal(out["tokens_l2"][[0, 2]], ref.layer_ids(2).reshape(2, 4).numpy())
    assert out["tokens_l2"].dtype == np.int32 and out["tokens_l2"].shape == (3, 4)
    words, text = out["words_l2"].to_pylist(), out["text"].to_pylist()  # Arrow columns
    assert words[2] == ref.words(2)[1] and words[1] == []
    assert text[0] == ref.to_text()[0] and text[0].startswith("[L1] w")
    assert out["error"][1] == "zero-byte file" and out["error"][0] == ""
    assert "tokens_l3" not in out and "pixels" not in out


def test_tokenize_mnist_to_s3_exactly_once(ray_cluster, s3_prefix, mlflow_server, tokenizer_dir):
    tok_uri = upload(tokenizer_dir, f"{s3_prefix}/tokenizer")
    out_uri = f"{s3_prefix}/corpus"
    source = SourceConfig(uri="mnist://test?limit=64", shard_size=8)
    cfg = TokenizeJobConfig(
        source=source,
        tokenizer=tok_uri,
        output=out_uri,
        batch_size=8,
        roundtrip_sample=4,
        mlflow=MlflowConfig(tracking_uri=mlflow_server, experiment="tokenize-test"),
        progress=False,
    )
    # a run killed while committing its 3rd shard leaves 2 complete shards, each with its JSONL twin
    with pytest.raises(InjectedFailure):
        run_tokenize_job(TokenizeJobConfig(**{**cfg.__dict__, "fail_after_shards": 2}))
    names = {loc.name for loc in resolve(out_uri).list()}
    jsonl = {loc.name for loc in resolve(out_uri).join(".spae", "jsonl").list()}
    parts = {n[: -len(".parquet")] for n in names if n.startswith("part-") and n.endswith(".parquet")}
    assert len(parts) == 2 and {n[: -len(".jsonl")] for n in jsonl if n.endswith(".jsonl")} == parts
    assert not resolve(out_uri).join(".spae", "manifest.json").exists()

    result = run_tokenize_job(cfg)  # the re-run computes only what is missing
    assert (result.shards_total, result.shards_run) == (8, 8 - len(parts))
    assert result.rows_run == 8 * (8 - len(parts))
    table = read_corpus(out_uri)
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == [f"mnist-test-{i:06d}" for i in range(64)]  # every image exactly once

    # rows decode to the ids the library gives for the same images
    tokenizer = load_tokenizer(str(tokenizer_dir))
    shard = list_shards(SourceConfig(uri="mnist://test?limit=64", shard_size=16))[1]
    raw = read_shard(shard)
    ref, picked = library_and_corpus_rows(tokenizer, raw, table)
    got = ids_from_table(picked)
    for l in (1, 2, 3, 4):
        np.testing.assert_array_equal(got[l], ref.layer_ids(l).reshape(16, -1).numpy())
    assert picked.column("text").to_pylist() == ref.to_text()
    assert picked.column("label").to_pylist() == raw.column("label").to_pylist()

    manifest = read_manifest(out_uri)
    assert manifest["rows_in"] == 64 and manifest["rows_written"] + manifest["errors"] == 64
    assert manifest["errors"] == 0 and len(manifest["shards"]) == 8
    assert manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint()
    assert manifest["tokenizer"]["codebook_card"]["hash"] == tokenizer.codebook.card["hash"]
    assert manifest["input"]["uri"] == "mnist://test?limit=64" and manifest["layers"] == [1, 2, 3, 4]

    # the JSONL twin of every shard equals its Parquet text
    out = resolve(out_uri)
    for s in manifest["shards"]:
        part = pq.read_table(out.join(s["file"]).path, filesystem=out.fs)
        lines = parse_jsonl(out.join(".spae", "jsonl", s["file"].replace(".parquet", ".jsonl")).read_bytes())
        assert [r["text"] for r in lines] == part.column("text").to_pylist()
        assert [r["image_id"] for r in lines] == part.column("image_id").to_pylist()
    assert result.metrics["roundtrip/ids_match"] == 1.0 and np.isfinite(result.metrics["roundtrip/psnr"])
    _check_mlflow_run(mlflow_server, result.run_id, tok_uri, out_uri)

    # a re-run of a finished job writes nothing
    before = {loc.name: loc.fs.get_file_info(loc.path).mtime for loc in out.list(recursive=True)}
    again = run_tokenize_job(cfg)
    after = {loc.name: loc.fs.get_file_info(loc.path).mtime for loc in out.list(recursive=True)}
    assert again.shards_run == 0 and before == after


def test_bad_images_go_to_errors(ray_cluster, tokenizer_dir, tmp_path):
    src = tmp_path / "images"
    (src / "cls").mkdir(parents=True)
    good = np.random.default_rng(1).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    for i in range(3):
        Image.fromarray(good).save(src / "cls" / f"good{i}.png")
    (src / "cls" / "zero.png").write_bytes(b"")
    (src / "cls" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (src / "cls" / "truncated.png").write_bytes((src / "cls" / "good0.png").read_bytes()[:60])
    (src / "cls" / "huge.png").write_bytes(_png("L", (400, 400), 128))
    (src / "cls" / "palette.png").write_bytes(_png("P", (12, 12), 3))  # an unusual mode that decodes
    (src / "cls" / "cmyk.tif").write_bytes(_png("CMYK", (12, 12), (0, 50, 100, 0)))
    out = tmp_path / "corpus"
    cfg = TokenizeJobConfig(
        source=SourceConfig(uri=str(src), shard_size=4),
        tokenizer=str(tokenizer_dir),
        output=str(out),
        layers=(1, 2),
        max_pixels=100_000,
        mlflow=NO_MLFLOW,
        progress=False,
    )
    # 4 of 9 images are bad: above the default max_error_fraction, the job fails after committing them
    with pytest.raises(
        TooManyErrors, match=r"4 of 9 images \(44.4%\) are error rows.*max_error_fraction=0.05"
    ):
        run_tokenize_job(cfg)
    assert read_manifest(str(out))["errors"] == 4  # committed: the error rows are real data errors
    cfg = replace(cfg, max_error_fraction=0.5)
    result = run_tokenize_job(cfg)
    assert result.shards_run == 0
    errors = {r["image_id"]: r for r in read_errors(str(out)).to_pylist()}
    assert set(errors) == {"cls/zero.png", "cls/corrupt.png", "cls/truncated.png", "cls/huge.png"}
    assert errors["cls/zero.png"]["reason"] == "zero-byte file"
    assert errors["cls/huge.png"]["reason"].startswith("too large")
    assert errors["cls/truncated.png"]["reason"].startswith(("truncated", "undecodable"))
    assert all(r["stage"] == "decode" and r["path"].endswith(i) for i, r in errors.items())
    table = read_corpus(str(out))
    assert sorted(table.column("image_id").to_pylist()) == [
        "cls/cmyk.tif",
        "cls/good0.png",
        "cls/good1.png",
        "cls/good2.png",
        "cls/palette.png",
    ]
    assert table.column_names == [
        "image_id",
        "source",
        "label",
        "tokens_l1",
        "words_l1",
        "tokens_l2",
        "words_l2",
        "text",
    ]
    m = result.manifest
    assert (m["rows_in"], m["rows_written"], m["errors"]) == (9, 5, 4)
    # the good images are tokenized like the library does it (all three are the same picture)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    pixels = decode_batch(
        {"image_bytes": np.array([(src / "cls" / "good0.png").read_bytes()], dtype=object)}, DecodeOptions(16)
    )
    ref = tokenizer.encode(torch.from_numpy(to_float(pixels["pixels"])), layers=(1, 2)).to_text()[0]
    texts = dict(zip(table.column("image_id").to_pylist(), table.column("text").to_pylist(), strict=True))
    assert texts["cls/good0.png"] == texts["cls/good2.png"] == ref and "[L3]" not in ref

    # the user fixes two images; retry_errors recomputes the shards with error rows, replacing them
    (src / "cls" / "zero.png").write_bytes((src / "cls" / "good0.png").read_bytes())
    (src / "cls" / "corrupt.png").write_bytes((src / "cls" / "good1.png").read_bytes())
    with pytest.raises(ShardError, match="different input items"):  # a changed input is refused ...
        run_tokenize_job(cfg)
    retried = run_tokenize_job(replace(cfg, retry_errors=True))  # ... unless its shard is retried
    assert retried.shards_run == 3  # every shard had an error row
    errors = {r["image_id"] for r in read_errors(str(out)).to_pylist()}
    assert errors == {"cls/truncated.png", "cls/huge.png"}
    assert sorted(p.name for p in (out / ".spae" / "errors").iterdir()) == ["part-00001.pq"]
    ids = read_corpus(str(out)).column("image_id").to_pylist()
    assert len(ids) == 7 and {"cls/zero.png", "cls/corrupt.png"} <= set(ids)


def test_retry_errors_recomputes_the_shards_with_error_rows(ray_cluster, tokenizer_dir, tmp_path):
    """Errors that came from elsewhere than the images (here: an older bug, simulated by rewriting a
    committed shard's errors) are recomputed by ``retry_errors=true``; the other shards are kept."""
    out = tmp_path / "corpus"
    cfg = TokenizeJobConfig(
        source=SourceConfig(uri="mnist://test?limit=24", shard_size=8),
        tokenizer=str(tokenizer_dir),
        output=str(out),
        layers=(1, 2),
        roundtrip_sample=0,
        mlflow=NO_MLFLOW,
        progress=False,
    )
    run_tokenize_job(cfg)
    good = pq.read_table(out / "part-00001.parquet")
    _fake_old_bug(out, "00001", good, bad_ids=["mnist-test-000009", "mnist-test-000012"])
    shard_files = [*out.glob("part-0000[02].*"), *out.glob(".spae/jsonl/part-0000[02].*")]
    before = {p.name: p.stat().st_mtime_ns for p in shard_files}
    with pytest.raises(TooManyErrors, match=r"2 of 24 images"):
        run_tokenize_job(replace(cfg, max_error_fraction=0.01))  # finish rewrites the manifest: 2 errors
    result = run_tokenize_job(replace(cfg, retry_errors=True))
    assert (result.shards_run, result.rows_run) == (1, 8)
    assert {p.name: p.stat().st_mtime_ns for p in shard_files} == before  # kept
    again = pq.read_table(out / "part-00001.parquet")
    assert again.drop_columns([]).equals(good.replace_schema_metadata(again.schema.metadata))
    assert not (out / ".spae" / "errors" / "part-00001.pq").exists() and read_errors(str(out)).num_rows == 0
    assert [
        r["image_id"] for r in parse_jsonl((out / ".spae" / "jsonl" / "part-00001.jsonl").read_bytes())
    ] == again.column("image_id").to_pylist()
    ids = read_corpus(str(out)).column("image_id").to_pylist()
    assert sorted(ids) == [f"mnist-test-{i:06d}" for i in range(24)]
    assert read_manifest(str(out))["errors"] == 0
    assert run_tokenize_job(replace(cfg, retry_errors=True)).shards_run == 0  # nothing left to retry


def _fake_old_bug(out: Path, shard_id: str, table, bad_ids: list[str]) -> None:
    """Rewrite a committed shard as an older bug would have: ``bad_ids`` as error rows."""
    import pyarrow as pa

    from pipeline.outputs.corpus import jsonl_bytes
    from pipeline.outputs.schemas import ERRORS_SCHEMA

    keep = pa.array([i not in bad_ids for i in table.column("image_id").to_pylist()])
    meta = dict(table.schema.metadata)
    meta[b"spae.errors"] = str(len(bad_ids)).encode()
    (out / ".spae" / "errors").mkdir(exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "image_id": bad_ids,
                "path": bad_ids,
                "stage": ["tokenize"] * 2,
                "reason": ["tokenize failed: OOM"] * 2,
            },
            schema=ERRORS_SCHEMA,
        ),
        out / ".spae" / "errors" / f"part-{shard_id}.pq",
    )
    kept = table.filter(keep)
    (out / ".spae" / "jsonl" / f"part-{shard_id}.jsonl").write_bytes(jsonl_bytes(kept))
    pq.write_table(kept.replace_schema_metadata(meta), out / f"part-{shard_id}.parquet")


def _check_mlflow_run(tracking_uri: str, run_id: str, tok_uri: str, out_uri: str) -> None:
    """The run shows lineage (input and output datasets), counts, histograms and the round trip."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    same_output = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`spae.output` = '{out_uri}'"
    )
    assert [r.info.run_id for r in same_output] == [run_id]  # the killed run was resumed, not duplicated
    m = run.data.metrics
    assert m["rows_in"] == 64 and m["rows_written"] == 64 and m["errors"] == 0 and m["images_per_s"] > 0
    assert m["roundtrip/images"] == 4 and m["roundtrip/ids_match"] == 1.0 and "roundtrip/psnr" in m
    assert 0 < m["layer1/utilization"] <= 1 and "layer4/perplexity" in m and m["layer2/distinct_tokens"] >= 1
    assert (
        run.data.params["source.uri"] == "mnist://test?limit=64"
        and run.data.tags["spae.tokenizer"] == tok_uri == run.data.params["tokenizer"]
    )
    sources = {i.tags[0].value: i.dataset.source for i in run.inputs.dataset_inputs}
    assert "mnist://test?limit=64" in sources["input"] and out_uri in sources["output"]
    files = {f.path for f in client.list_artifacts(run_id, "histograms")}
    assert files == {f"histograms/layer_{l}.png" for l in (1, 2, 3, 4)}
    assert {"roundtrip.png", "roundtrip.json", "corpus_manifest.json"} <= {
        f.path for f in client.list_artifacts(run_id)
    }
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="roundtrip.png", tracking_uri=tracking_uri
    )
    picture = Image.open(local)
    assert picture.size[0] == 2 * picture.size[1]  # 4 originals over 4 decodes, 16 px each, upscaled


def test_words_stage_equals_the_token_pyramid_on_a_hand_made_pyramid():
    from pipeline.steps.tokenize import WordsStage
    from spae.pyramid import PyramidSpec
    from spae.tokenizer import TokenPyramid, Vocabulary

    spec = PyramidSpec(preset("tiny").pyramid)  # layers 1x1, 2x2, 4x4, 4x4
    vocab = Vocabulary(["cat", "dog", "sun", "red", "##ing", "7"])
    l1 = torch.tensor([[[3]], [[5]], [[0]]])  # [b, 1, 1]
    l2 = torch.tensor([[[0, 1], [2, 5]], [[4, 4], [4, 4]], [[1, 1], [1, 1]]])  # [b, 2, 2]
    l3 = torch.arange(48).remainder(6).view(3, 4, 4)  # [b, 4, 4]
    pyramid = TokenPyramid([l1, l2, l3], (1, 2, 3), vocab, spec)
    batch = {
        "error": np.array([None, "", "zero-byte file"], dtype=object),  # row 2 failed upstream
        "tokens_l1": l1.reshape(3, -1).numpy().astype(np.int32),
        "tokens_l2": l2.reshape(3, -1).numpy().astype(np.int32),
        "tokens_l3": l3.reshape(3, -1).numpy().astype(np.int32),
    }
    out = {k: v.to_pylist() for k, v in WordsStage(vocab.words, (1, 2, 3))(batch).items() if k not in batch}
    assert out["text"][0].startswith("[L1] red [L2] cat dog sun 7 [L3] cat dog sun red ##ing 7 cat")
    assert out["text"][:2] == pyramid.to_text()[:2]  # the per-token path, exactly
    for l in (1, 2, 3):
        assert out[f"words_l{l}"][:2] == pyramid.words(l)[:2]
        assert out[f"words_l{l}"][2] == []
    assert out["words_l2"][1] == ["##ing"] * 4 and out["text"][2] == ""
    only_two = WordsStage(vocab.words, (2,))(batch)  # a subset of layers keeps its own tags
    assert only_two["text"][0].as_py() == "[L2] cat dog sun 7" and "words_l1" not in only_two


def test_ids_only_stage_then_words_equals_the_whole_stage(tokenizer_dir):
    from pipeline.steps.tokenize import WordsStage

    pixels = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    batch = {
        "shard_id": np.array(["00000"] * 4, dtype=object),
        "image_id": np.array(["a", "b", "c", "d"], dtype=object),
        "error": np.array([None, None, "undecodable: x", None], dtype=object),
        "error_stage": np.array([None, None, "decode", None], dtype=object),
        "pixels": pixels,
    }
    whole = TokenizeStage(TokenizeStageConfig(str(tokenizer_dir)))(batch)
    ids_only = TokenizeStage(TokenizeStageConfig(str(tokenizer_dir), words=False))
    part = ids_only(batch)
    assert "text" not in part and "words_l1" not in part
    split = WordsStage(ids_only.tokenizer.vocabulary.words, ids_only.layers)(part)  # the job's two stages
    assert sorted(split) == sorted(whole)
    for key, value in whole.items():
        if isinstance(value, pa.Array):  # words and text
            assert split[key].equals(value), key
        elif value.dtype == object:
            assert list(split[key]) == list(value), key
        else:
            np.testing.assert_array_equal(split[key], value)


def test_encode_options_reach_the_stage_and_the_job_identity(tokenizer_dir, tmp_path):
    source = SourceConfig(uri="mnist://test?limit=24", shard_size=8)
    bf16 = EncodeOptions(dtype="bfloat16")
    cfg = TokenizeJobConfig(
        source=source,
        tokenizer=str(tokenizer_dir),
        output=str(tmp_path / "bf16"),
        encode=bf16,
        batch_size=8,
        roundtrip_sample=0,
        in_process=True,
        progress=False,
        mlflow=NO_MLFLOW,
    )
    run_tokenize_job(cfg)
    manifest = read_manifest(cfg.output)
    assert manifest["identity"]["encode"]["dtype"] == "bfloat16"
    assert manifest["config"]["encode"] == manifest["identity"]["encode"]
    # the corpus holds the ids the library gives with the same options
    tokenizer = load_tokenizer(str(tokenizer_dir))
    tokenizer.encode_options = bf16
    ref, picked = library_and_corpus_rows(
        tokenizer, read_shard(list_shards(source)[0]), read_corpus(cfg.output)
    )
    got = ids_from_table(picked)
    for l in (1, 2, 3, 4):
        np.testing.assert_array_equal(got[l], ref.layer_ids(l).reshape(8, -1).numpy())
    # a re-run into the same corpus with other encode options is refused, naming the cause
    with pytest.raises(ShardError, match="different configuration"):
        run_tokenize_job(TokenizeJobConfig(**{**cfg.__dict__, "encode": EncodeOptions()}))
    # the default options leave the identity as it was before the option existed (old corpora resume)
    run_tokenize_job(
        TokenizeJobConfig(**{**cfg.__dict__, "encode": EncodeOptions(), "output": str(tmp_path / "d")})
    )
    assert "encode" not in read_manifest(str(tmp_path / "d"))["identity"]
    stage = TokenizeStage(
        TokenizeStageConfig(str(tokenizer_dir), encode=bf16)
    )  # what the Ray job's actors are built with
    assert stage.tokenizer.encode_options == bf16


def test_a_compiled_stage_warms_up_at_build_and_keeps_the_ids(tokenizer_dir):
    """``warmup`` makes the stage's first encode call (a compilation) when it is built, for a batch of
    that size: the actor's first real batch pays nothing more, and its ids are the eager stage's."""
    compiled = EncodeOptions(compile=True, compile_backend="aot_eager")
    stage = TokenizeStage(TokenizeStageConfig(str(tokenizer_dir), words=False, encode=compiled, warmup=4))
    assert stage.tokenizer._compiled["float32/aot_eager/None"][1] == 4  # compiled for 4 rows already
    eager = TokenizeStage(TokenizeStageConfig(str(tokenizer_dir), words=False))
    assert not eager.tokenizer._compiled
    pixels = np.random.default_rng(1).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    batch = {
        "shard_id": np.array(["00000"] * 3, dtype=object),
        "image_id": np.array(["a", "b", "c"], dtype=object),
        "error": np.array([None] * 3, dtype=object),
        "pixels": pixels,
    }
    got, want = stage(batch), eager(batch)
    for l in (1, 2, 3, 4):
        np.testing.assert_array_equal(got[f"tokens_l{l}"], want[f"tokens_l{l}"])
    # the job asks for a warm-up of one batch exactly when the encoder is compiled
    cfg = TokenizeJobConfig(tokenizer=str(tokenizer_dir), output="x", batch_size=32, encode=compiled)
    assert tokenize_spec(cfg, (1,)).config.warmup == 32
    assert tokenize_spec(TokenizeJobConfig(tokenizer="t", output="x"), (1,)).config.warmup == 0
