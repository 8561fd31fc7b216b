"""The one rule for a device setting (``device="auto"`` in the scorer, search, tokenize and evaluate
configs): ``"auto"`` is the GPU when torch sees one, else the CPU; any other name is checked here, so a
typo or a GPU this process does not have fails at once with the setting's name, not deep in a model."""

from __future__ import annotations

import torch

AUTO = "auto"


def resolve_device(device: str | torch.device = AUTO, key: str = "device") -> torch.device:
    """``"auto"`` -> ``cuda`` if torch sees a GPU, else ``cpu``; ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    -> that device. ValueError naming ``key`` when the name is not a device, or names a GPU that torch
    does not see."""
    if isinstance(device, torch.device):
        return device
    if device == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{key}: {device!r} is not a device; use auto, cpu, cuda or cuda:<index>") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key}: {device!r} asks for a GPU but torch sees none; use auto or cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{key}: {device!r}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return dev
