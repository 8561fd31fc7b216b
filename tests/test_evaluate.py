import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.inputs.images import DecodeOptions
from pipeline.inputs.sources import SourceConfig, list_shards, read_shard
from pipeline.outputs.contracts import check_pools_cover
from pipeline.steps.evaluate import EvaluateJobConfig, run_evaluate
from pipeline.steps.evaluator import class_token_rows, class_words, evaluate_tokenizer, load_eval_data
from spae.codebook import FrozenCodebook
from spae.config import replace
from spae.data import MNIST_CLASS_WORDS
from spae.metrics import MissingMetricDependency
from spae.model import preset
from spae.tokenizer import SPAETokenizer

DIM = 16
WORDS = [*MNIST_CLASS_WORDS, *[str(i) for i in range(10)], *[f"filler{i}" for i in range(12)]]  # 32 rows


def tiny_codebook() -> FrozenCodebook:
    emb = torch.randn(len(WORDS), DIM, generator=torch.Generator().manual_seed(0))
    return FrozenCodebook.from_tensor(emb, tokens=WORDS, words=WORDS)


def write_vocab(root, codebook: FrozenCodebook, feature_dim: int = 8) -> str:
    """A vocab table as the vocab job writes it (parts + vocab_card.json), one-hot text features."""
    root.mkdir(parents=True, exist_ok=True)
    v = len(codebook)
    feats = np.zeros((v, feature_dim), dtype=np.float16)
    for row in range(v):
        feats[row, (row % 10) % feature_dim] = 1.0  # "seven" and "7" share an axis
    table = pa.table(
        {
            "token_id": pa.array(range(v), pa.int64()),
            "llm_id": pa.array(codebook.llm_ids, pa.int64()),
            "token": codebook.tokens,
            "word": codebook.words,
            "embedding": pa.array(codebook.embeddings.numpy().tolist(), pa.list_(pa.float32())),
            "text_feature": pa.array(feats.tolist(), pa.list_(pa.float16())),
        }
    )
    pq.write_table(table, str(root / "part-00000.parquet"))
    card = {"codebook": codebook.card, "rows": v, "dim": feature_dim, "job_digest": "vocabdigest01"}
    (root / "vocab_card.json").write_text(json.dumps(card))
    return str(root)


def write_pools(root, source: SourceConfig, vocab_rows: int = 32, k: int = 4, feature_dim: int = 8) -> str:
    """A pools table as the pools job writes it: a label probe's pools (class word + numeral first)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = list_shards(source)
    for shard in shards:
        rows = read_shard(shard)
        labels = rows.column("label").to_pylist()
        ids = [[lab, 10 + lab, 20 + lab % 12, 21] for lab in labels]
        scores = [[1.0, 0.97, 0.5, 0.1] for _ in labels]
        feats = np.zeros((len(labels), feature_dim), dtype=np.float16)
        feats[np.arange(len(labels)), [lab % feature_dim for lab in labels]] = 1.0
        table = pa.table(
            {
                "image_id": rows.column("image_id"),
                "source": rows.column("source"),
                "label": rows.column("label"),
                "image_feature": pa.array(feats.tolist(), pa.list_(pa.float16())),
                "s_min": pa.array([0.0] * len(labels), pa.float32()),
                "s_max": pa.array([1.0] * len(labels), pa.float32()),
                "topk_ids": pa.array(ids, pa.list_(pa.int32())),
                "topk_scores": pa.array(scores, pa.list_(pa.float32())),
            }
        )
        pq.write_table(table, str(root / f"part-{shard.shard_id}.parquet"))
    manifest = {
        "output": str(root),
        "shards": [{"shard_id": s.shard_id, "input_digest": s.digest} for s in shards],
        "identity": {"vocab_job_digest": "vocabdigest01", "vocab_rows": vocab_rows, "top_k": k},
    }
    (root / "_manifest.json").write_text(json.dumps(manifest))
    return str(root)


def tiny_tokenizer() -> SPAETokenizer:
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg = replace(cfg, network={"latent_dim": DIM})
    return SPAETokenizer.from_config(cfg, tiny_codebook())


EVAL = SourceConfig(uri="mnist://test?limit=24", shard_size=16)


def test_evaluate_metrics_and_files(tmp_path):
    tok = tiny_tokenizer()
    folder = tok.save_pretrained(tmp_path / "tok")
    cfg = EvaluateJobConfig(
        tokenizer=str(folder),
        source=EVAL,
        pools=write_pools(tmp_path / "pools", EVAL),
        vocab=write_vocab(tmp_path / "vocab", tiny_codebook()),
        limit=20,
        batch_size=8,
        picture_images=4,
        output=str(tmp_path / "eval"),
    )
    result = run_evaluate(cfg)
    m = result.metrics
    assert m["images"] == 20
    for l in tok.pyramid.covering_layers:  # (3, 4) for the tiny pyramid
        assert 0 < m[f"psnr/p{l}"] < 60 and -1 <= m[f"ssim/p{l}"] <= 1
    for l in range(1, tok.pyramid.num_layers + 1):
        assert 0 < m[f"utilization/l{l}"] <= 1 and 1 <= m[f"perplexity/l{l}"] <= m[f"distinct/l{l}"] + 1e-6
        assert 0 <= m[f"relevance/l{l}"] <= 1
    assert m["distinct/l1"] <= 20  # one token per image on layer 1
    assert 0 <= m["label_word_accuracy/l1"] <= 1
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == pytest.approx(m)
    assert (tmp_path / "eval" / "reconstructions.png").stat().st_size > 1000


def test_relevance_and_label_accuracy_by_hand(tmp_path):
    """A tokenizer whose layer-1 token we know: relevance and accuracy follow from the pools by hand."""
    tok = tiny_tokenizer()
    data = load_eval_data(EVAL, DecodeOptions(16), write_pools(tmp_path / "pools", EVAL), limit=8)
    text = torch.zeros(len(WORDS), 8)
    text[:, 0] = 1.0  # every token scores 1 against an image feature on axis 0, 0 otherwise
    rows = class_token_rows([[w, str(i)] for i, w in enumerate(MNIST_CLASS_WORDS)], tok.vocabulary.words)
    assert rows[7] == {7, 17}
    m = evaluate_tokenizer(tok, data, text, rows, batch_size=4)
    expected_rel = float((data.image_features[:, 0] > 0).float().mean())  # images whose feature is axis 0
    assert m["relevance/l1"] == pytest.approx(expected_rel, abs=1e-6)
    top = tok.encode(data.images, layers=[1]).layer_ids(1).reshape(-1)
    hits = sum(int(t) in rows[int(lab)] for t, lab in zip(top, data.labels, strict=True))
    assert m["label_word_accuracy/l1"] == pytest.approx(hits / len(data))


def test_refuses_foreign_pools_and_vocab(tmp_path):
    pools = write_pools(tmp_path / "pools", EVAL)
    with pytest.raises(ValueError, match="computed from other images|no part"):
        check_pools_cover(list_shards(SourceConfig(uri="mnist://test?limit=24", shard_size=8)), pools)
    other = FrozenCodebook.from_tensor(torch.randn(len(WORDS), DIM), tokens=WORDS, words=WORDS)
    tok = tiny_tokenizer()
    cfg = EvaluateJobConfig(
        tokenizer=str(tok.save_pretrained(tmp_path / "tok")),
        source=EVAL,
        pools=pools,
        vocab=write_vocab(tmp_path / "vocab", other),
        output=str(tmp_path / "eval"),
    )
    with pytest.raises(ValueError, match="codebook"):
        run_evaluate(cfg)


def test_optional_metrics_need_their_weights_file(tmp_path):
    cfg = EvaluateJobConfig(tokenizer="unused", optional_metrics=("fid",), output=str(tmp_path))
    with pytest.raises(MissingMetricDependency, match=r"weights\.fid=PATH"):
        run_evaluate(cfg)


def test_optional_lpips_on_the_deepest_prefix(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    vgg = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, vgg)
    tok = tiny_tokenizer()
    cfg = EvaluateJobConfig(
        tokenizer="unused",
        source=EVAL,
        limit=8,
        picture_images=0,
        optional_metrics=("lpips",),
        weights={"lpips": str(vgg)},
        output=str(tmp_path / "eval"),
    )
    metrics = run_evaluate(cfg, tokenizer=tok).metrics
    deepest = max(tok.pyramid.covering_layers)
    assert [k for k in metrics if "lpips" in k] == [f"lpips_uncalibrated/p{deepest}"]
    assert 0 < metrics[f"lpips_uncalibrated/p{deepest}"] < float("inf")


def test_evaluate_job_entry_logs_to_mlflow(tmp_path, capsys):
    import mlflow

    from jobs.evaluate import main

    folder = tiny_tokenizer().save_pretrained(tmp_path / "tok")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(
        [
            f"tokenizer={folder}",
            "source.uri=mnist://test?limit=8",
            "limit=8",
            "picture_images=2",
            f"output={tmp_path / 'eval'}",
            f"mlflow.tracking_uri={uri}",
            "run_name=eval-test",
        ]
    )
    assert rc == 0 and "psnr" in capsys.readouterr().out
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["spae"], filter_string="tags.`spae.run_name` = 'eval-test'")
    assert len(runs) == 1 and "metrics.psnr/p3" in runs.columns
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs.run_id[0])}
    assert {"metrics.json", "reconstructions.png"} <= artifacts


def test_label_accuracy_of_a_one_layer_vq_baseline_uses_its_most_frequent_word(tmp_path):
    """A plain-VQ tokenizer has one full-resolution layer: an image's word is that layer's commonest token."""
    torch.manual_seed(0)
    cfg = replace(
        preset("tiny"),
        network={"latent_dim": DIM},
        pyramid={"layer_sizes": [[4, 4]]},
    )
    tok = SPAETokenizer.from_config(cfg, tiny_codebook())
    data = load_eval_data(EVAL, DecodeOptions(16), write_pools(tmp_path / "pools", EVAL), limit=8)
    rows = class_token_rows([[w, str(i)] for i, w in enumerate(MNIST_CLASS_WORDS)], tok.vocabulary.words)
    m = evaluate_tokenizer(tok, data, torch.zeros(len(WORDS), 8), rows, batch_size=4)
    ids = tok.encode(data.images).layer_ids(1).flatten(1)  # [b, 16]
    top = ids.mode(dim=1).values
    hits = sum(int(t) in rows[int(lab)] for t, lab in zip(top, data.labels, strict=True))
    assert m["label_word_accuracy/l1"] == pytest.approx(hits / len(data))


def test_digit_folders_score_the_top_word_against_the_digits_words(tmp_path):
    """A folder of MNIST digits in class folders 0..9: with label_words=mnist, the top word of an image in
    folder 7 counts as right when it is "seven" or "7" (as for mnist://), not only "7"."""
    import io

    from PIL import Image

    from spae.data import load_mnist

    images, labels = load_mnist("test")
    for i in range(24):
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG")
        (tmp_path / "digits" / str(labels[i])).mkdir(parents=True, exist_ok=True)
        (tmp_path / "digits" / str(labels[i]) / f"{i:03d}.png").write_bytes(buf.getvalue())
    tok = tiny_tokenizer()
    by_name = load_eval_data(SourceConfig(uri=str(tmp_path / "digits")), DecodeOptions(16))
    by_digit = load_eval_data(
        SourceConfig(uri=str(tmp_path / "digits"), label_words="mnist"), DecodeOptions(16)
    )
    names, digits = class_words(by_name), class_words(by_digit)
    assert names == [[c] for c in by_name.classes]
    assert digits == [[MNIST_CLASS_WORDS[int(c)], c] for c in by_digit.classes]
    top = tok.encode(by_digit.images, layers=[1]).layer_ids(1).reshape(-1)
    folder = tok.save_pretrained(tmp_path / "tok")
    for label_words, words, data in (("names", names, by_name), ("mnist", digits, by_digit)):
        source = SourceConfig(uri=str(tmp_path / "digits"), label_words=label_words)
        cfg = EvaluateJobConfig(
            tokenizer=str(folder), source=source, picture_images=0, output=str(tmp_path / label_words)
        )
        m = run_evaluate(cfg, log=lambda *_: None).metrics
        rows = class_token_rows(words, tok.vocabulary.words)
        hits = sum(int(t) in rows[int(lab)] for t, lab in zip(top, data.labels, strict=True))
        assert m["label_word_accuracy/l1"] == pytest.approx(hits / len(data))
    seven = by_digit.classes.index("7")  # folder "7" is scored against the rows of "seven" and "7"
    assert class_token_rows(digits, tok.vocabulary.words)[seven] == {WORDS.index("seven"), WORDS.index("7")}


def test_evaluate_decodes_with_its_max_pixels(tmp_path):
    tok = tiny_tokenizer()
    folder = tok.save_pretrained(tmp_path / "tok")
    cfg = EvaluateJobConfig(
        tokenizer=str(folder), source=EVAL, limit=4, picture_images=0, output=str(tmp_path / "eval")
    )
    assert run_evaluate(cfg).metrics["images"] == 4
    small = EvaluateJobConfig(**{**cfg.__dict__, "max_pixels": 28 * 28 - 1})  # MNIST is 28 x 28
    with pytest.raises(ValueError, match="no decodable images"):
        run_evaluate(small)


def test_a_source_with_groups_gets_each_groups_metrics_beside_the_overall_ones(tmp_path, capsys):
    """mnist-shifted:// ids carry the shift: the evaluator reports PSNR, SSIM and the top word per shift,
    each the mean over that shift's images, and the job's JSON and summary carry them."""
    from pipeline.steps.evaluate import format_metrics
    from spae.metrics import psnr
    from spae.shifts import SHIFTS

    tok = tiny_tokenizer()
    source = SourceConfig(uri="mnist-shifted://test?limit=18", shard_size=9)
    data = load_eval_data(source, DecodeOptions(16))
    assert data.groups == tuple(i.rsplit("-", 2)[1] for i in data.image_ids)
    assert sorted(set(data.groups)) == sorted(SHIFTS)
    rows = class_token_rows(class_words(data), tok.vocabulary.words)
    m = evaluate_tokenizer(tok, data, class_rows=rows, batch_size=5)
    last = tok.pyramid.covering_layers[-1]
    top = tok.encode(data.images, layers=[1]).layer_ids(1).reshape(-1)
    recon = tok.decode(tok.encode(data.images)).float().clamp(0, 1)
    by_image = psnr(recon, data.images)
    for g in SHIFTS:
        mask = torch.tensor([x == g for x in data.groups])
        assert m[f"group/{g}/images"] == 2
        assert m[f"group/{g}/psnr/p{last}"] == pytest.approx(float(by_image[mask].mean()), abs=1e-3)
        hits = [int(t) in rows[int(lab)] for t, lab in zip(top[mask], data.labels[mask], strict=True)]
        assert m[f"group/{g}/label_word_accuracy/l1"] == pytest.approx(sum(hits) / 2)
    mean_of_groups = sum(m[f"group/{g}/psnr/p{last}"] for g in SHIFTS) / len(SHIFTS)
    assert m[f"psnr/p{last}"] == pytest.approx(mean_of_groups, abs=1e-6)  # equal groups: the overall mean
    assert "group/rotate/ssim/p3" in m
    assert "group rotate         images=2  label_word_accuracy/l1=" in format_metrics(m)

    plain = load_eval_data(EVAL, DecodeOptions(16), limit=8)  # mnist:// ids carry no group
    assert plain.groups == ()
    assert not any(k.startswith("group/") for k in evaluate_tokenizer(tok, plain, class_rows=rows))

    folder = tok.save_pretrained(tmp_path / "tok")
    cfg = EvaluateJobConfig(
        tokenizer=str(folder), source=source, picture_images=0, output=str(tmp_path / "e")
    )
    run_evaluate(cfg)
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert saved["group/font/images"] == 2 and "group/font/label_word_accuracy/l1" in saved
