"""Typed contracts between stages (pipeline.outputs.contracts): one reader each, errors naming the file
and field; one tokenizer loader for every URI kind; train, evaluate, report and decode do not import
each other."""

import ast
import json
from pathlib import Path

import pytest
import torch
from test_evaluate import tiny_tokenizer

from pipeline.outputs.contracts import (
    NEW_LAYOUT,
    OLD_LAYOUT,
    ContractError,
    CorpusManifest,
    PoolsManifest,
    VocabCard,
    layout_of,
    load_tokenizer,
)
from spae.tokenizer import SPAETokenizer

ROOT = Path(__file__).parents[1]
CARD = {"codebook": {"hash": "abc", "dim": 16, "source": "x"}, "rows": 32, "dim": 8, "job_digest": "d1"}
POOLS = {
    "output": "/p",
    "shards": [{"shard_id": "00000", "input_digest": "i0"}],
    "identity": {"vocab_job_digest": "d1", "vocab_rows": 32, "top_k": 4},
}
CORPUS = {
    "output": "/c",
    "input": {"uri": "mnist://test"},
    "rows_written": 3,
    "errors": 0,
    "layers": [1, 2],
    "tokenizer": {"uri": "/tok", "fingerprint": "f" * 16, "codebook_card": {"hash": "abc"}},
    "config": {"source": {"uri": "mnist://test", "shard_size": 8}, "fit": "pad"},
}


def _write(folder: Path, name: str, data: dict) -> str:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))
    return str(folder)


def test_each_contract_reads_either_layout(tmp_path):
    card = VocabCard.read(_write(tmp_path / "v", ".spae/vocab_card.json", CARD))
    assert (card.codebook_hash, card.codebook_dim, card.rows, card.scorer) == ("abc", 16, 32, {})
    assert VocabCard.read(_write(tmp_path / "vo", "vocab_card.json", CARD)) == VocabCard.from_dict(
        CARD, str(tmp_path / "vo" / "vocab_card.json")
    )
    pools = PoolsManifest.read(_write(tmp_path / "p", "_manifest.json", POOLS))
    assert pools.shards[0].input_digest == "i0" and pools.vocab_rows == 32
    pools.check_vocab(card, "/p")
    with pytest.raises(ValueError, match="vocab digest d1 .32 rows. but the vocab table has digest d2"):
        pools.check_vocab(VocabCard.from_dict({**CARD, "job_digest": "d2"}, "card"), "/p")
    hand_built = VocabCard.from_dict({**CARD, "codebook": {"dim": 16}}, "hand/vocab_card.json")
    with pytest.raises(ContractError, match=r"hand/vocab_card.json \(codebook\): field 'hash' is missing"):
        assert hand_built.codebook_hash  # checked where it is used (evaluation, training)
    corpus = CorpusManifest.read(_write(tmp_path / "c", ".spae/manifest.json", CORPUS))
    assert corpus.layers == (1, 2) and corpus.fit == "pad" and corpus.max_pixels == 50_000_000
    assert corpus.source is not None and corpus.source.shard_size == 8


@pytest.mark.parametrize(
    ("cls", "data", "field"),
    [
        (VocabCard, {k: v for k, v in CARD.items() if k != "rows"}, "'rows' is missing"),
        (VocabCard, {**CARD, "rows": "32"}, "'rows' must be int, found '32'"),
        (PoolsManifest, {**POOLS, "identity": {"vocab_rows": 32}}, "'identity.vocab_job_digest' is missing"),
        (PoolsManifest, {**POOLS, "shards": [{"shard_id": "0"}]}, r"shards\[0\]\): field 'input_digest'"),
        (CorpusManifest, {**CORPUS, "layers": [0]}, "'layers' must be a list of layers >= 1"),
        (CorpusManifest, {**CORPUS, "tokenizer": {"uri": "/t"}}, "'tokenizer.fingerprint' is missing"),
        (CorpusManifest, {**CORPUS, "rows_written": True}, "'rows_written' must be int"),
    ],
)
def test_a_wrong_or_missing_field_names_the_file_and_the_field(tmp_path, cls, data, field):
    name = ".spae/vocab_card.json" if cls is VocabCard else ".spae/manifest.json"
    folder = _write(tmp_path, name, data)
    with pytest.raises(ContractError, match=rf"{tmp_path / name}.*{field}"):
        cls.read(folder)


def test_missing_files_and_layout_detection(tmp_path):
    assert layout_of(str(tmp_path)) == NEW_LAYOUT  # an empty (or absent) folder is written new
    with pytest.raises(FileNotFoundError, match="run the vocab job"):
        VocabCard.read(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run the pools job"):
        PoolsManifest.read(str(tmp_path))
    (tmp_path / "part-00000.jsonl").write_text("")
    assert layout_of(str(tmp_path)) == OLD_LAYOUT  # a JSONL twin beside the parts
    (tmp_path / ".spae").mkdir()
    assert layout_of(str(tmp_path)) == NEW_LAYOUT


def test_one_tokenizer_loader_for_every_uri_kind(tmp_path, s3_prefix):
    from pipeline.runtime.storage import resolve

    tok = tiny_tokenizer()
    folder = tok.save_pretrained(tmp_path / "tok")
    images = torch.rand(2, 3, 16, 16)
    want = tok.encode(images).layer_ids(1)
    dest = resolve(f"{s3_prefix}/tok")
    for f in sorted(folder.iterdir()):
        dest.join(f.name).write_bytes(f.read_bytes())
    for uri in (str(folder), f"file://{folder}", str(tmp_path), f"{s3_prefix}/tok"):
        loaded = load_tokenizer(uri)
        assert loaded.fingerprint() == tok.fingerprint() and not loaded.training
        assert torch.equal(loaded.encode(images).layer_ids(1), want)
    with pytest.raises(ValueError, match="tokenizer: empty"):
        load_tokenizer("")
    with pytest.raises(
        ValueError, match="pipeline.outputs.contracts.load_tokenizer"
    ):  # the library takes folders
        SPAETokenizer.from_pretrained("runs:/abc/tokenizer")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_train_evaluate_report_and_decode_do_not_import_each_other():
    modules = {
        "pipeline.steps.train": ROOT / "pipeline/steps/train.py",
        "pipeline.steps.evaluate": ROOT / "pipeline/steps/evaluate.py",
        "pipeline.steps.report": ROOT / "pipeline/steps/report.py",
        "pipeline.steps.decode": ROOT / "pipeline/steps/decode.py",
        "jobs.report": ROOT / "jobs/report.py",
        "jobs.decode": ROOT / "jobs/decode.py",
    }
    stages = {"train", "evaluate", "report", "decode"}
    for name, path in modules.items():
        if not path.exists():
            continue
        own = name.rsplit(".", 1)[1]
        others = {f"{pkg}.{s}" for pkg in ("pipeline.steps", "jobs") for s in stages if s != own}
        assert not _imports(path) & others, f"{name} imports {_imports(path) & others}"
