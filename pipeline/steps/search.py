"""Exact inner-product search over the vocabulary's text features: top-K, max and min (eq. 4-6).

One interface, two backends:

- ``faiss``: ``IndexFlatIP`` on the CPU, or on a GPU (``StandardGpuResources`` + ``index_cpu_to_gpu``)
  when the installed FAISS has GPU support (``pip install 'spae[gpu]'``) and a GPU is present.
  The minimum over the whole vocabulary is the top-1 of the negated query.
- ``torch``: ``Q @ V.T`` + ``topk`` on the actor's device, over vocabulary chunks of ``chunk`` rows
  with a running top-K and a running min, so at most ``[b, chunk]`` scores exist at a time.

``auto`` picks FAISS GPU if it can, else torch on a GPU, else FAISS CPU. Both give the same ids and
scores on the same input (up to float rounding and the order of exact ties).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from spae.devices import resolve_device

GPU_INSTALL_HINT = "install FAISS with GPU support: pip install 'spae[gpu]' (faiss-gpu, CUDA 12)"


@dataclass(frozen=True)
class SearchConfig:
    backend: Literal["auto", "faiss", "torch"] = "auto"
    device: str = "auto"  # "auto" -> cuda if available; "cpu", "cuda", "cuda:1" (spae.devices)
    chunk: int = 65536  # vocabulary rows per scoring chunk (torch backend)

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"chunk: must be >= 1, got {self.chunk}")


@dataclass
class SearchResult:
    topk_ids: np.ndarray  # [b, k] int64, codebook rows, best first
    topk_raw: np.ndarray  # [b, k] float32, s'(I, k) = f_I(I) . f'_T(k)
    s_min: np.ndarray  # [b] float32, min_j s'(I, j) over the whole vocabulary
    s_max: np.ndarray  # [b] float32, max_j s'(I, j)


def normalize_scores(result: SearchResult) -> np.ndarray:
    """Eq. 6 on the top-K: ``(s' - min) / (max - min)`` -> ``[b, k]`` float32 in ``[0, 1]``."""
    span = np.maximum(result.s_max - result.s_min, 1e-12)[:, None]  # [b, 1]
    return ((result.topk_raw - result.s_min[:, None]) / span).astype(np.float32)  # eq. 6


def faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_backend(backend: str, on_gpu: bool, faiss_gpu: bool) -> str:
    """``auto``: FAISS GPU if it can run, else torch on a GPU, else FAISS CPU."""
    if backend != "auto":
        return backend
    if on_gpu:
        return "faiss" if faiss_gpu else "torch"
    return "faiss"


def _as_float32(x: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class TokenSearch:
    """Built once per actor from the vocab table's text features ``[v, d]``."""

    def __init__(self, text_features: np.ndarray | Tensor, cfg: SearchConfig = SearchConfig()):
        vocab = _as_float32(text_features)  # [v, d]
        if vocab.ndim != 2 or vocab.shape[0] == 0:
            raise ValueError(f"text_features: expected a non-empty [v, d] matrix, got shape {vocab.shape}")
        self.cfg = cfg
        self.v, self.d = vocab.shape
        self.device = resolve_device(cfg.device, "search.device")
        on_gpu = self.device.type == "cuda"

        backend = choose_backend(cfg.backend, on_gpu, faiss_has_gpu() if on_gpu else False)
        if backend == "faiss":
            self._init_faiss(vocab, on_gpu)
        elif backend == "torch":
            self.vocab = torch.from_numpy(vocab).to(self.device)  # [v, d]
            self.backend = f"torch-{self.device.type}"
        else:
            raise ValueError(f"search.backend: {cfg.backend!r} is not one of 'auto', 'faiss', 'torch'")

    def _init_faiss(self, vocab: np.ndarray, on_gpu: bool) -> None:
        try:
            import faiss
        except ImportError as e:
            raise ImportError(
                "search.backend='faiss' needs FAISS: pip install faiss-cpu (or 'spae[gpu]')"
            ) from e
        index = faiss.IndexFlatIP(self.d)
        index.add(vocab)
        if on_gpu:
            if not faiss_has_gpu():
                raise RuntimeError(
                    f"search.backend='faiss' on device {self.device}: the installed FAISS has no GPU support "
                    f"or sees no GPU; {GPU_INSTALL_HINT}, or set search.backend=torch"
                )
            self._gpu_resources = faiss.StandardGpuResources()  # kept alive with the index
            index = faiss.index_cpu_to_gpu(self._gpu_resources, self.device.index or 0, index)
            self.backend = "faiss-gpu"
        else:
            self.backend = "faiss-cpu"
        self.index = index

    def search(self, image_features: np.ndarray | Tensor, k: int) -> SearchResult:
        """Top-``k`` tokens by dot product, plus min and max over the whole vocabulary."""
        if not 1 <= k <= self.v:
            raise ValueError(f"k: must lie in [1, {self.v}] (the vocabulary size), got {k}")
        if self.backend == "faiss-gpu" and k > 2048:
            raise ValueError(
                f"k: FAISS GPU indexes return at most 2048 neighbours, got {k}; use search.backend=torch"
            )
        if self.backend.startswith("faiss"):
            q = _as_float32(image_features)  # [b, d]
            self._check(q)
            raw, ids = self.index.search(q, k)  # [b, k], [b, k]
            neg, _ = self.index.search(-q, 1)  # [b, 1]: max_j (-q . v_j) = -min_j q . v_j
            return SearchResult(ids.astype(np.int64), raw.astype(np.float32), (-neg[:, 0]).astype(np.float32),
                                raw[:, 0].astype(np.float32))  # fmt: skip
        return self._search_torch(image_features, k)

    def _check(self, q: np.ndarray | Tensor) -> None:
        if q.ndim != 2 or q.shape[1] != self.d:
            raise ValueError(f"image_features: expected [b, {self.d}], got {tuple(q.shape)}")

    @torch.no_grad()
    def _search_torch(self, image_features: np.ndarray | Tensor, k: int) -> SearchResult:
        if isinstance(image_features, np.ndarray):
            image_features = torch.from_numpy(image_features)
        q = image_features.to(self.device, torch.float32)  # [b, d]
        self._check(q)
        best_raw = best_ids = None
        s_min = torch.full((q.shape[0],), float("inf"), device=self.device)
        for start in range(0, self.v, self.cfg.chunk):
            s = q @ self.vocab[start : start + self.cfg.chunk].T  # [b, chunk]  s'
            s_min = torch.minimum(s_min, s.min(dim=1).values)
            raw, ids = s.topk(min(k, s.shape[1]), dim=1)  # [b, k']
            ids = ids + start
            if best_raw is not None:
                merged = torch.cat([best_raw, raw], dim=1)  # [b, <= 2k]
                raw, order = merged.topk(min(k, merged.shape[1]), dim=1)
                ids = torch.cat([best_ids, ids], dim=1).gather(1, order)
            best_raw, best_ids = raw, ids
        assert best_raw is not None and best_raw.shape[1] == k
        return SearchResult(
            best_ids.cpu().numpy().astype(np.int64),
            best_raw.cpu().numpy().astype(np.float32),
            s_min.cpu().numpy().astype(np.float32),
            best_raw[:, 0].cpu().numpy().astype(np.float32),
        )
