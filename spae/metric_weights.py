"""The local weight files of the optional metrics (FID, IS, LPIPS in ``spae.metrics``, FVD in ``spae.fvd``):
what each ``weights.<key>`` file must hold, reading one, and the error that names the key and the file.
Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

# weights key -> what the local file must hold
WEIGHT_FILES: dict[str, str] = {
    "fid": "a torchvision inception_v3 state dict (aux_logits=True), e.g. inception_v3_google-0cc3c7bd.pth",
    "is": "a torchvision inception_v3 state dict (aux_logits=True), e.g. inception_v3_google-0cc3c7bd.pth",
    "lpips": "a torchvision vgg16 state dict (or its features.* part), e.g. vgg16-397923af.pth",
    "lpips_linear": "the LPIPS v0.1 linear-layer weights of the vgg variant (lin0..lin4), e.g. lpips vgg.pth",
    "fvd": "an Inception-I3D (Kinetics-400) state dict, e.g. rgb_imagenet.pt of the PyTorch I3D port",
}


class MissingMetricDependency(RuntimeError):
    """An optional metric was asked for without its local weights file (or the file is unusable)."""


def load_weights(key: str, path: str | Path) -> dict[str, Tensor]:
    """The state dict in ``path`` (``torch.load(weights_only=True)``); a clear error naming key and path."""
    if not path or not Path(path).is_file():
        raise MissingMetricDependency(
            f"weights.{key}={str(path)!r} is not a file; it must hold {WEIGHT_FILES[key]}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip / format errors all mean "not a state dict we can read"
        raise MissingMetricDependency(
            f"weights.{key}={str(path)!r} could not be read as a torch state dict ({err}); "
            f"it must hold {WEIGHT_FILES[key]}"
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise MissingMetricDependency(
            f"weights.{key}={str(path)!r} is not a state dict of tensors; it must hold {WEIGHT_FILES[key]}"
        )
    return dict(state)
