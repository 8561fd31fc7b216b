"""``spae.devices.resolve_device``: the one rule for ``device="auto"`` and device names."""

from __future__ import annotations

import pytest
import torch

from spae.devices import resolve_device


def test_auto_is_the_gpu_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")  # a device stays as it is


def test_names_are_checked_with_the_setting_named(monkeypatch):
    assert resolve_device("cpu", "scorer.device") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"scorer.device: 'gpu0' is not a device; use auto, cpu, cuda"):
        resolve_device("gpu0", "scorer.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"search.device: 'cuda' asks for a GPU but torch sees none"):
        resolve_device("cuda", "search.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device: 'cuda:2': torch sees 2 GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_every_component_resolves_devices_the_same_way(monkeypatch):
    from pipeline.steps.search import SearchConfig, TokenSearch
    from pipeline.steps.tokenize import load_tokenizer
    from spae.scorers import ScorerConfig, build_scorer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    vocab = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    with pytest.raises(ValueError, match="search.device: 'cuda' asks for a GPU"):
        TokenSearch(vocab, SearchConfig(backend="torch", device="cuda"))
    with pytest.raises(ValueError, match="scorer.device: 'tpu' is not a device"):
        build_scorer(ScorerConfig(kind="open_clip", arch="ViT-B-32", device="tpu"))
    with pytest.raises(ValueError, match="device: 'cuda' asks for a GPU"):
        load_tokenizer("some/folder", device="cuda")
    assert TokenSearch(vocab, SearchConfig(backend="torch", device="auto")).device == torch.device("cpu")
