"""A hand-built vocab table for stage tests: random unit text features, no text encoder needed."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.runtime.storage import resolve
from pipeline.steps.vocab import CARD, VOCAB_SCHEMA
from spae.scorers import ScorerConfig, describe_scorer


def write_hand_vocab(
    uri: str,
    scorer: ScorerConfig,
    rows: int,
    seed: int = 0,
    digest: str = "",
    words: list[str] | None = None,
    features: np.ndarray | None = None,
) -> None:
    """``rows`` tokens ``w0..`` with random unit text features in the scorer's 384-d space, plus a card
    naming ``scorer`` (so the pool job accepts the table); ``words`` and ``features`` ``[rows, 384]``
    replace the names and the features."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((rows, 384)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    feats = feats if features is None else np.asarray(features, np.float32)
    names = words or [f"w{i}" for i in range(rows)]
    table = pa.table(
        {
            "token_id": np.arange(rows),
            "llm_id": np.arange(rows) + 1000,
            "token": names,
            "word": names,
            "embedding": [np.zeros(4, np.float32)] * rows,
            "text_feature": list(feats.astype(np.float16)),
        },
        schema=VOCAB_SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out = resolve(uri)
    out.join("part-00000.parquet").write_bytes(buf.getvalue())
    card = {
        "rows": rows,
        "scorer": describe_scorer(scorer),
        "job_digest": digest or f"hand-built-{seed}",
        "codebook": {},
    }
    out.join(CARD).write_text(json.dumps(card))
