"""The vocabulary job on the local Ray cluster: MiniLM codebook, tiny open_clip scorer, S3 output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from pipeline.outputs.shards import read_manifest
from pipeline.runtime.storage import resolve
from pipeline.runtime.tracking import MlflowConfig
from pipeline.steps.vocab import (
    CARD,
    TextFeatureConfig,
    TextFeatureStage,
    VocabJobConfig,
    load_vocab,
    run_vocab_job,
)
from spae.codebook import CodebookConfig, load_codebook
from spae.scorers import ScorerConfig, build_scorer, prompt_templates, token_text_features

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
V = 300


class Interrupted(RuntimeError):
    pass


@pytest.fixture(scope="module")
def scorer_cfg(tmp_path_factory: pytest.TempPathFactory) -> ScorerConfig:
    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    return ScorerConfig(kind="open_clip", arch=f"local-dir:{folder}", device="cpu", templates="simple")


def _cfg(scorer: ScorerConfig, output: str, **kw) -> VocabJobConfig:
    return VocabJobConfig(
        codebook=CodebookConfig(source="minilm", top_n=V),
        scorer=scorer,
        output=output,
        batch_size=64,
        shard_size=128,  # 3 shards: 128 + 128 + 44 tokens
        progress=False,
        mlflow=MlflowConfig(enabled=False),
        **kw,
    )


def _listing(uri: str) -> dict[str, tuple[int, int]]:
    out = resolve(uri)
    infos = out.fs.get_file_info(pafs.FileSelector(out.path, recursive=True))
    return {i.path: (i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File}


def test_text_feature_stage_without_ray(scorer_cfg: ScorerConfig) -> None:
    stage = TextFeatureStage(TextFeatureConfig(scorer_cfg, ("a photo of a {}.", "{}"), prompt_batch=3))
    batch = {"word": np.array(["seven", "7", "cat"], dtype=object), "token_id": np.arange(3)}
    out = stage(batch)
    assert out["text_feature"].shape == (3, 32) and out["text_feature"].dtype == np.float16
    np.testing.assert_array_equal(out["token_id"], np.arange(3))


def test_vocab_job_on_s3_resumes_and_reruns_as_noop(ray_cluster, s3_prefix: str, scorer_cfg) -> None:
    uri = f"{s3_prefix}/vocab"
    cfg = _cfg(scorer_cfg, uri)

    # an interrupted first run commits one shard ...
    def stop(shard_id: str) -> None:
        raise Interrupted(shard_id)

    with pytest.raises(Interrupted):
        run_vocab_job(cfg, on_commit=stop)
    assert not resolve(uri).join(".spae", CARD).exists()
    # ... the second computes only the other two
    result = run_vocab_job(cfg)
    assert (result.rows, result.shards_total, result.shards_run, result.tokens_run) == (V, 3, 2, V - 128)

    codebook = load_codebook(cfg.codebook)
    table = load_vocab(uri)
    assert len(table) == V and table.words == codebook.words and table.tokens == codebook.tokens
    assert table.llm_ids == codebook.llm_ids
    torch.testing.assert_close(table.embeddings, codebook.embeddings, atol=0, rtol=0)
    assert table.codebook().hash == codebook.hash
    assert table.text_features.shape == (V, 32) and table.text_features.dtype == torch.float32

    # text features equal a direct eq. 5 computation for sampled tokens (float16 storage)
    scorer = build_scorer(scorer_cfg)
    templates = prompt_templates("simple")
    for k in (0, 7, 131, 200, V - 1):
        direct = torch.stack(
            [scorer.embed_texts([t.replace("{}", codebook.words[k])])[0] for t in templates]
        ).mean(0)
        torch.testing.assert_close(table.text_features[k], direct, atol=2e-3, rtol=0)
    torch.testing.assert_close(
        table.text_features, token_text_features(scorer, codebook.words, templates), atol=2e-3, rtol=0
    )

    card = table.card
    assert card.rows == V and card.dim == 32 and list(card.templates) == templates
    assert card.codebook_hash == codebook.hash
    assert card.scorer["random_weights"] is True and card.scorer["kind"] == "open_clip"
    assert list(card.shards) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    manifest = read_manifest(uri)
    assert manifest["rows_in"] == manifest["rows_written"] == V and manifest["errors"] == 0

    # a re-run of the finished job is a no-op: no Ray work, no object written
    before = _listing(uri)
    again = run_vocab_job(cfg)
    assert (again.shards_run, again.tokens_run) == (0, 0)
    assert _listing(uri) == before


def test_cli_logs_to_mlflow_and_config_errors_exit_2(
    ray_cluster, mlflow_server: str, scorer_cfg, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import mlflow

    from jobs import vocab as job

    with pytest.raises(SystemExit) as e:
        job.main(["batch_size=0"])
    assert e.value.code == 2
    assert "batch_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        job.main(["scorer.kindd=open_clip"])
    assert e.value.code == 2 and "scorer.kindd" in capsys.readouterr().err

    out = tmp_path / "vocab"
    args = [
        f"output={out}",
        "codebook.top_n=40",
        "scorer.kind=open_clip",
        f"scorer.arch={scorer_cfg.arch}",
        "scorer.device=cpu",
        "scorer.templates=simple",
        "shard_size=16",
        "progress=false",
        f"mlflow.tracking_uri={mlflow_server}",
        "mlflow.experiment=test-vocab",
    ]
    assert job.main(args) == 0
    printed = capsys.readouterr().out
    assert f"vocab table: {out}" in printed and CARD in printed
    assert len(load_vocab(str(out))) == 40

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("test-vocab")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["rows"] == 40 and run.data.metrics["shards_run"] == 3
    assert run.data.metrics["tokens_per_s"] > 0
    assert run.data.params["codebook.top_n"] == "40"


def test_text_feature_stage_on_prompt_tokens_made_elsewhere(scorer_cfg: ScorerConfig) -> None:
    from pipeline.steps.vocab import PROMPT_TOKENS, PromptTokensStage

    templates = ["a photo of a {}.", "{}", "art of the {}"]
    config = TextFeatureConfig(scorer_cfg, tuple(templates), prompt_batch=4)
    stage = TextFeatureStage(config)
    batch = {"word": np.array(["seven", "7", "cat", "##ing", "x-"], dtype=object), "token_id": np.arange(5)}
    tokenized = PromptTokensStage(config)(batch)  # the CPU stage of the job
    assert tokenized[PROMPT_TOKENS].shape == (5, 3, 77) and tokenized[PROMPT_TOKENS].dtype == np.int32
    out = stage(tokenized)
    assert PROMPT_TOKENS not in out  # not carried to the driver
    np.testing.assert_array_equal(out["text_feature"], stage(batch)["text_feature"])
    direct = token_text_features(stage.scorer, list(batch["word"]), templates, batch_size=4)  # eq. 5
    np.testing.assert_array_equal(out["text_feature"], direct.to(torch.float16).numpy())
