"""Search backends: FAISS-CPU and torch agree with each other and with a brute-force numpy top-K / min."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.steps import search as search_mod
from pipeline.steps.search import SearchConfig, SearchResult, TokenSearch, choose_backend, normalize_scores


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(q: np.ndarray, v: np.ndarray, k: int) -> SearchResult:
    s = q.astype(np.float64) @ v.astype(np.float64).T  # [b, v]
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    raw = np.take_along_axis(s, ids, axis=1)
    return SearchResult(ids, raw.astype(np.float32), s.min(1).astype(np.float32), s.max(1).astype(np.float32))


def _assert_same(a: SearchResult, b: SearchResult, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(a.topk_raw, b.topk_raw, atol=atol)
    np.testing.assert_allclose(a.s_min, b.s_min, atol=atol)
    np.testing.assert_allclose(a.s_max, b.s_max, atol=atol)
    # ids must agree wherever the score is separated from its neighbours (ties may swap)
    raw = b.topk_raw
    gap_prev = np.concatenate([np.full((raw.shape[0], 1), np.inf), raw[:, :-1] - raw[:, 1:]], axis=1)
    gap_next = np.concatenate([raw[:, :-1] - raw[:, 1:], np.full((raw.shape[0], 1), np.inf)], axis=1)
    distinct = (gap_prev > 10 * atol) & (gap_next > 10 * atol)
    assert distinct.mean() > 0.9
    np.testing.assert_array_equal(a.topk_ids[distinct], b.topk_ids[distinct])


@pytest.mark.parametrize("chunk", [65536, 37])  # one chunk, and a chunk smaller than k
def test_backends_match_brute_force(chunk: int) -> None:
    rng = np.random.default_rng(0)
    vocab, queries, k = _unit(rng, 1000, 32), _unit(rng, 50, 32), 64
    expected = _brute(queries, vocab, k)
    faiss_s = TokenSearch(vocab, SearchConfig(backend="faiss", device="cpu"))
    torch_s = TokenSearch(torch.from_numpy(vocab), SearchConfig(backend="torch", device="cpu", chunk=chunk))
    assert (faiss_s.backend, torch_s.backend) == ("faiss-cpu", "torch-cpu")
    got_f, got_t = faiss_s.search(queries, k), torch_s.search(torch.from_numpy(queries), k)
    for got in (got_f, got_t):
        assert got.topk_ids.shape == (50, k) and got.topk_ids.dtype == np.int64
        assert got.topk_raw.dtype == np.float32
        _assert_same(got, expected)
    _assert_same(got_f, got_t)


def test_min_is_over_the_whole_vocabulary_not_the_top_k() -> None:
    vocab = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.8, -0.6], [-0.6, -0.8]], dtype=np.float32)
    q = np.array([[1.0, 0.0], [0.0, -1.0]], dtype=np.float32)
    for backend in ("faiss", "torch"):
        res = TokenSearch(vocab, SearchConfig(backend=backend, device="cpu", chunk=2)).search(q, 2)
        np.testing.assert_array_equal(res.topk_ids, [[0, 1], [4, 3]])
        np.testing.assert_allclose(res.topk_raw, [[1.0, 0.8], [0.8, 0.6]], atol=1e-6)
        np.testing.assert_allclose(res.s_min, [-0.8, -1.0], atol=1e-6)  # rows 3 and 2, outside the top-2
        np.testing.assert_allclose(res.s_max, [1.0, 0.8], atol=1e-6)
        # eq. 6 by hand: (s' - min) / (max - min)
        np.testing.assert_allclose(normalize_scores(res), [[1.0, 1.6 / 1.8], [1.0, 1.6 / 1.8]], atol=1e-6)


def test_normalized_scores_match_the_full_matrix_reference() -> None:
    from spae.scorers import normalized_scores

    rng = np.random.default_rng(1)
    vocab, queries = _unit(rng, 300, 16), _unit(rng, 8, 16)
    res = TokenSearch(vocab, SearchConfig(backend="torch", device="cpu")).search(queries, 10)
    full = normalized_scores(torch.from_numpy(queries), torch.from_numpy(vocab)).numpy()  # [b, v]
    np.testing.assert_allclose(normalize_scores(res), np.take_along_axis(full, res.topk_ids, 1), atol=1e-5)


def test_auto_backend_choice() -> None:
    vocab = _unit(np.random.default_rng(2), 10, 4)
    assert TokenSearch(vocab, SearchConfig(backend="auto", device="cpu")).backend == "faiss-cpu"
    assert choose_backend("auto", on_gpu=True, faiss_gpu=True) == "faiss"
    assert choose_backend("auto", on_gpu=True, faiss_gpu=False) == "torch"  # no FAISS GPU: torch on the GPU
    assert choose_backend("auto", on_gpu=False, faiss_gpu=False) == "faiss"
    assert choose_backend("torch", on_gpu=False, faiss_gpu=True) == "torch"


def test_errors_name_the_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = _unit(np.random.default_rng(3), 10, 4)
    s = TokenSearch(vocab, SearchConfig(backend="torch", device="cpu"))
    with pytest.raises(ValueError, match="k: must lie in"):
        s.search(vocab[:2], 11)
    with pytest.raises(ValueError, match=r"expected \[b, 4\]"):
        s.search(np.zeros((2, 5), np.float32), 3)
    with pytest.raises(ValueError, match="non-empty"):
        TokenSearch(np.zeros((0, 4), np.float32))
    # FAISS asked for on a GPU without GPU support: a clear error naming the package to install
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(search_mod, "faiss_has_gpu", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install 'spae\[gpu\]'"):
        TokenSearch(vocab, SearchConfig(backend="faiss", device="cuda"))
