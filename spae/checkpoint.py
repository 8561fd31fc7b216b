"""Training checkpoints as safetensors + JSON, loaded with weights-only semantics (no pickle).

A train state is a nested structure of dicts, lists, tuples, numbers, strings and tensors (model and
optimizer state dicts, RNG byte tensors, counters). ``save_train_state`` writes

    dir/state.safetensors   every tensor (and numpy array), keyed by its path in the structure
    dir/state.json          the structure, with {"__tensor__": key} where a tensor was
    dir/config.json         the run's config (a plain dict)

and ``load_train_state`` rebuilds the same structure. Dicts with non-string keys (optimizer
``state`` is keyed by parameter index) and tuples round-trip exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
CONFIG_JSON = "config.json"
FORMAT = "spae-train-state/1"

_TENSOR, _ARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"
_MARKERS = {_TENSOR, _ARRAY, _TUPLE, _ITEMS}


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        key = path or "root"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {_ARRAY: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (set(obj) & _MARKERS):
            return {k: _flatten(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {_ITEMS: [[_key(k), _flatten(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"checkpoint value at '{path or '/'}' has unsupported type {type(obj).__name__}")


def _key(k: Any) -> Any:
    if isinstance(k, bool | int | float | str) or k is None:
        return k
    raise TypeError(f"checkpoint dict key {k!r} has unsupported type {type(k).__name__}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _ARRAY in obj:
            return tensors[obj[_ARRAY]].numpy()
        if _TUPLE in obj:
            return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {k: _unflatten(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_train_state(
    directory: str | os.PathLike[str], state: dict[str, Any], config: dict[str, Any]
) -> Path:
    """Write ``state`` (nested, with tensors) and ``config`` (plain) into ``directory``; returns it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, "", tensors)
    save_file(tensors, str(out / STATE_TENSORS), metadata={"format": FORMAT})
    (out / STATE_JSON).write_text(json.dumps({"format": FORMAT, "state": structure}, indent=1))
    (out / CONFIG_JSON).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def load_train_state(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, config)`` as written by ``save_train_state``; tensors come back on the CPU."""
    src = Path(directory)
    for name in (STATE_TENSORS, STATE_JSON, CONFIG_JSON):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src} is not a train checkpoint: {name} is missing")
    doc = json.loads((src / STATE_JSON).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(
            f"{src / STATE_JSON}: unknown checkpoint format {doc.get('format')!r}; expected {FORMAT}"
        )
    tensors = load_file(str(src / STATE_TENSORS))
    state = _unflatten(doc["state"], tensors)
    config = json.loads((src / CONFIG_JSON).read_text())
    return state, config
